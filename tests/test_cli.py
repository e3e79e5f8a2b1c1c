import json

import pytest

from conftest import tiny_model
from specdec.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    model = tiny_model("llama", vocab_size=len(default_tokenizer), dtype=__import__("torch").float32)
    model.generation_config.eos_token_id = default_tokenizer.eos_token_id
    model.save_pretrained(path)
    default_tokenizer.save_pretrained(path)
    return path


def test_generate_json(tiny_dir, capsys):
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "Say it again: abc abc abc", "--max-new-tokens", "12", "--json", "--compare"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["new_tokens"] <= 12
    assert out["stats"]["target_forwards"] >= 1
    assert out["hf_greedy"]["identical"] is True
    assert abs(out["stats"]["mean_accepted_length"] - out["stats"]["new_tokens"] / out["stats"]["target_forwards"]) < 1e-3


def test_generate_text_and_errors(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hello", "--max-new-tokens", "5"]) == 0
    assert "target forwards" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hello", "--drafter", "bogus"]) == 2
    assert "unknown drafter" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir / "missing"), "--prompt", "hello"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "  "]) == 2


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for opt in ("--model", "--drafter", "--prompt", "--max-new-tokens", "--temperature", "--json"):
        assert opt in text


@pytest.mark.parametrize("args, message", [
    (["--prefill-chunk", "lots"], "--prefill-chunk must be 'auto'"),
    (["--port", "0"], "--port must lie in"),
    (["--drafter", "no-such-drafter"], "unknown drafter"),
    (["--max-batch", "0"], "max_batch"),
])
def test_serve_rejects_bad_options_before_loading_a_model(tiny_dir, capsys, args, message):
    assert main(["serve", "--model", str(tiny_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_serve_says_when_its_port_is_taken(tiny_dir, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--model", str(tiny_dir), "--drafter", "none", "--port", str(port), "--log-level", "critical"]) == 2
    assert "--port" in capsys.readouterr().err
    assert __import__("torch").is_grad_enabled()  # the engine ran on this thread and left its grad mode as it was
