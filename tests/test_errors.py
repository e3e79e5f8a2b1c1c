"""Bad input fails early, with a message that says what was wrong, before any model work."""

import pytest
import torch

import specdec
from specdec.drafters.base import Drafter
from specdec.tree import TokenTree


class ForwardCounter:
    """Wraps a model and fails the test if it is ever run."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *a, **k):
        raise AssertionError("the model ran before the input was validated")

    def __getattr__(self, name):
        return getattr(self.model, name)


class ForeignDrafter(Drafter):
    name = "foreign"
    vocab_size = 12345

    def propose(self, state):
        return TokenTree.root_only(state.root)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=""), "empty"),
        (dict(prompt=[]), "empty"),
        (dict(prompt=torch.tensor([], dtype=torch.long)), "no tokens"),
        (dict(prompt=torch.arange(600) % 50), "context"),
        (dict(prompt=torch.tensor([1, 2]), max_new_tokens=-1), "max_new_tokens"),
        (dict(prompt=torch.tensor([1, 2]), drafter="no-such-drafter"), "unknown drafter"),
        (dict(prompt=torch.tensor([1, 2]), drafter=ForeignDrafter()), "vocabulary of 12345"),
        (dict(prompt=torch.tensor([1, 999])), r"\[0, 96\)"),
        (dict(prompt=torch.tensor([1, 2]), temperature=-1.0), "temperature"),
        (dict(prompt=torch.tensor([1, 2]), bogus_option=3), "unknown generation option"),
        (dict(prompt="hello"), "tokenizer"),
    ],
)
def test_bad_input_is_a_clear_error_before_model_work(tiny, kwargs, match):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt")
    with pytest.raises(ValueError, match=match):
        specdec.generate(ForwardCounter(tiny), None, prompt, **kwargs)


def test_missing_paths_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        specdec.load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        specdec.load_model(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="notes.txt"):
        specdec.load_model(tmp_path / "notes.txt")


def test_truncated_gguf_is_a_clear_error_and_leaves_no_cache_behind(tmp_path, monkeypatch):
    from specdec.models import default_gguf_path

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(default_gguf_path().read_bytes()[:200_000])
    with pytest.raises(ValueError, match="broken.gguf"):
        specdec.load_model(broken)
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not any(models.iterdir())


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    from specdec.drafters.medusa import MedusaConfig, MedusaHeads

    path = tmp_path_factory.mktemp("heads")
    MedusaHeads(MedusaConfig(hidden_size=32, vocab_size=96)).save_pretrained(path / "ok")
    MedusaHeads(MedusaConfig(hidden_size=32, vocab_size=96)).save_pretrained(path / "cut")
    data = (path / "cut" / "model.safetensors").read_bytes()
    (path / "cut" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (path / "bad-json").mkdir()
    (path / "bad-json" / "config.json").write_text("{not json")
    (path / "bad-json" / "model.safetensors").write_bytes(b"")
    return path


BAD_SPECS = [  # (spec, words the one-line message must hold)
    ("prompt-lookup:adaptive=ture", ["adaptive", "true or false"]),
    ("prompt-lookup:nope=1", ["nope", "max_ngram"]),
    ("prompt-lookup:num_tokens=x", ["num_tokens", "int"]),
    ("prompt-lookup:max_ngram=0", ["max_ngram"]),
    ("prompt-lookup:max_ngram=3,min_ngram=4", ["min_ngram"]),
    ("bogus", ["bogus", "prompt-lookup"]),
    ("medusa:{heads}/ok,tree=-5", ["tree"]),
    ("medusa:{heads}/ok,tree=five", ["tree", "int"]),
    ("medusa:{heads}/ok,budget=1.5", ["budget", "int"]),
    ("medusa:{heads}/ok,decay=2", ["decay"]),
    ("medusa:{heads}/cut", ["model.safetensors", "truncated"]),
    ("medusa:{heads}/bad-json", ["config.json"]),
    ("medusa:{heads}/missing", ["missing"]),
]


@pytest.mark.parametrize("spec, words", BAD_SPECS, ids=[s for s, _ in BAD_SPECS])
def test_bad_drafter_specs_are_one_line_errors_naming_the_option(spec, words, heads_dir, capsys):
    from specdec.cli import main

    rc = main(["generate", "--model", "/nonexistent-model-dir", "--prompt", "hi", "--drafter", spec.format(heads=heads_dir)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("specdec: error:") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


BAD_FLAGS = [  # CLI flags that parse but hold a bad value, checked before the model loads
    (["--temperature", "-1"], ["temperature"]),
    (["--top-p", "1.5", "--temperature", "1"], ["top_p", "(0, 1]"]),
    (["--top-k", "0", "--temperature", "1"], ["top_k"]),
    (["--max-new-tokens", "-3"], ["max_new_tokens"]),
    (["--stop", ""], ["stop"]),
]


@pytest.mark.parametrize("flags, words", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_cli_values_are_one_line_errors(flags, words, capsys):
    from specdec.cli import main

    rc = main(["generate", "--model", "/nonexistent-model-dir", "--prompt", "hi", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("specdec: error:") and "\n" not in err, err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("flags", [["--attn", "flash"], ["--dtype", "float8"], ["--acceptance", "lossy"]])
def test_bad_cli_choices_are_argparse_errors(flags, capsys):
    from specdec.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "hi", *flags])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "invalid choice" in err and flags[0] in err and "Traceback" not in err


BAD_RECIPE_KEYS = [
    ("lr=abc", ["lr", "number"]),
    ("shuffle=maybe", ["shuffle", "true or false"]),
    ("nope=1", ["nope", "valid settings"]),
    ("method=eagle9", ["method", "medusa1"]),
    ("epochs=0", ["epochs"]),
    ("loss_type=mse", ["loss_type", "ce"]),
    ("draft_vocab_size=lots", ["draft_vocab_size", "int"]),
]


@pytest.mark.parametrize("override, words", BAD_RECIPE_KEYS, ids=[o for o, _ in BAD_RECIPE_KEYS])
def test_bad_recipe_settings_are_one_line_errors(override, words, capsys):
    from specdec.cli import main

    extra = ["max_steps=0"] if override == "epochs=0" else []
    rc = main(["train", "--recipe", "medusa1-smollm2-cpu", override, *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("specdec: error:") and "\n" not in err, err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("kind", ["medusa", "gad"])
def test_path_option_loads_that_directory_and_every_format_is_checked(kind, tmp_path):
    """``medusa:path=DIR`` means DIR (it once loaded the shipped heads); a directory without a format version
    (or another one) is a clear error for every trained drafter."""
    import json

    from conftest import tiny_model

    import specdec

    model = tiny_model("llama")
    if kind == "medusa":
        from test_medusa import random_heads

        random_heads(model).save_pretrained(tmp_path / "d")
    else:
        from test_gad import random_block

        random_block(model).save_pretrained(tmp_path / "d")
    d = specdec.drafters.build_drafter(f"{kind}:path={tmp_path / 'd'}")
    assert d.vocab_size == 96  # the tiny model's, not the shipped drafter's
    with pytest.raises(FileNotFoundError):
        specdec.drafters.build_drafter(f"{kind}:path={tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="one path"):
        specdec.drafters.build_drafter(f"{kind}:{tmp_path / 'd'},path={tmp_path / 'd'}")
    raw = json.loads((tmp_path / "d" / "config.json").read_text())
    del raw["format_version"]
    (tmp_path / "d" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="format None.*retrain"):
        specdec.drafters.build_drafter(f"{kind}:{tmp_path / 'd'}")
