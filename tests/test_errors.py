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
