"""Medusa heads and drafter: structure, persistence, checkpoint interchange, lossless generation."""

import pytest
import torch

import specdec
from conftest import hf_greedy, tiny_model
from specdec.drafters.medusa import (
    DEFAULT_TREES, MedusaConfig, MedusaDrafter, MedusaHeads, export_medusa_checkpoint, import_medusa_checkpoint,
    tree_from_accuracies,
)


def random_heads(model, num_heads=3, draft=None, own=False, seed=0):
    torch.manual_seed(seed)
    w = model.get_output_embeddings().weight.detach()
    vocab = w.shape[0]
    dv = torch.randperm(vocab)[:draft].sort().values if draft else None
    cfg = MedusaConfig(hidden_size=w.shape[1], vocab_size=vocab, num_heads=num_heads, num_layers=2, own_projection=own,
                       draft_vocab_size=draft)
    heads = MedusaHeads(cfg, lm_head_weight=w.float(), draft_vocab=dv)
    for p in heads.blocks.parameters():  # non-trivial heads
        torch.nn.init.normal_(p, std=0.3)
    return heads.to(w.dtype)


def test_layers_have_distinct_weights_and_start_as_identity():
    model = tiny_model("llama")
    w = model.get_output_embeddings().weight.detach()
    heads = MedusaHeads(MedusaConfig(hidden_size=32, vocab_size=96, num_heads=2, num_layers=3), lm_head_weight=w).to(w.dtype)
    ptrs = {b.linear.weight.data_ptr() for seq in heads.blocks for b in seq}
    assert len(ptrs) == 6  # never `[ResBlock(h)] * n`
    h = torch.randn(5, 32, dtype=w.dtype)
    torch.testing.assert_close(heads(h), torch.stack([h @ w.T] * 2))  # zero init: each head is lm_head


@pytest.mark.parametrize("own, draft", [(False, None), (False, 40), (True, 40)])
def test_save_and_load_round_trip(tmp_path, own, draft):
    model = tiny_model("llama")
    heads = random_heads(model, draft=draft, own=own)
    heads.save_pretrained(tmp_path)
    loaded = MedusaHeads.from_pretrained(tmp_path).to(torch.float64)
    if not own:
        loaded.attach_lm_head(model.get_output_embeddings().weight.detach())
    h = torch.randn(3, 32, dtype=torch.float64)
    torch.testing.assert_close(loaded(h), heads(h))
    assert loaded.config.draft_vocab_size == draft


def test_original_medusa_checkpoint_round_trip(tmp_path):
    model = tiny_model("qwen2")
    w = model.get_output_embeddings().weight.detach()
    heads = random_heads(model, own=True)
    export_medusa_checkpoint(heads, tmp_path, base_model="tiny")
    raw = __import__("json").loads((tmp_path / "config.json").read_text())
    assert raw["medusa_num_heads"] == 3 and raw["medusa_num_layers"] == 2
    back = import_medusa_checkpoint(tmp_path).to(torch.float64)
    h = torch.randn(4, 32, dtype=torch.float64)
    torch.testing.assert_close(back(h), heads(h))
    # heads sharing a draft-vocabulary lm_head export as full projections that give the same draft logits
    small = random_heads(model, draft=30)
    export_medusa_checkpoint(small, tmp_path / "b", lm_head_weight=w)
    full = import_medusa_checkpoint(tmp_path / "b").to(torch.float64)
    torch.testing.assert_close(full(h)[..., small.draft_vocab], small(h))


def test_tree_from_accuracies_is_a_tree_in_value_order():
    acc = [[0.5, 0.2, 0.1], [0.4, 0.1], [0.3]]
    paths = tree_from_accuracies(acc, 6)
    assert paths[:3] == [(0,), (0, 0), (1,)]
    assert all(p[:-1] in paths or len(p) == 1 for p in paths)
    for size, tree in DEFAULT_TREES.items():
        assert len(tree) == size and all(p[:-1] in tree or len(p) == 1 for p in tree)


@pytest.mark.parametrize("sized", [False, True], ids=["as-proposed", "sized"])
@pytest.mark.parametrize("kind", ["static", "dynamic", "draft-vocab"])
def test_medusa_greedy_equals_hf_greedy(tiny, kind, sized):
    heads = random_heads(tiny, draft=48 if kind == "draft-vocab" else None)
    drafter = MedusaDrafter(heads, budget=12 if kind == "dynamic" else 0, topk=4)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        ids = torch.randint(0, 96, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g)
        ref = hf_greedy(tiny, ids, 30, min_new_tokens=30)
        out = specdec.generate(tiny, None, ids, drafter=drafter, max_new_tokens=30, size_trees=sized)
        assert out.token_ids == ref
        if not sized:  # random heads rarely pay: sized trees may rightly draft nothing
            assert out.stats.drafted_tokens > 0


def test_untrained_identity_heads_stay_lossless():
    """Zero-initialised heads re-predict the root (almost never right); output must still be exact."""
    model = tiny_model("llama")
    heads = random_heads(model, num_heads=1)
    for p in heads.blocks.parameters():
        torch.nn.init.zeros_(p)  # identity block: head 0 predicts the root again, rarely right
    drafter = MedusaDrafter(heads, paths=[(0,), (1,), (2,)])
    ids = torch.tensor([3, 4, 5])
    assert specdec.generate(model, None, ids, drafter=drafter, max_new_tokens=20).token_ids == hf_greedy(model, ids, 20, min_new_tokens=20)


def test_heads_for_another_model_are_a_clear_error(tmp_path):
    model = tiny_model("llama")
    other = tiny_model("llama", vocab_size=100)
    heads = random_heads(other)
    with pytest.raises(ValueError, match="vocabulary of 100"):
        specdec.generate(model, None, torch.tensor([1, 2]), drafter=MedusaDrafter(heads))
    wide = MedusaHeads(MedusaConfig(hidden_size=64, vocab_size=96))
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="hidden size 64"):
        specdec.generate(model, None, torch.tensor([1, 2]), drafter=f"medusa:{tmp_path / 'wide'}")
    with pytest.raises(FileNotFoundError, match="not a Medusa drafter"):
        specdec.generate(model, None, torch.tensor([1, 2]), drafter=f"medusa:{tmp_path}")


def test_fused_medusa_and_prompt_lookup_is_lossless(tiny, tmp_path, monkeypatch):
    from specdec.drafters import build_drafter
    from specdec.drafters.fused import FusedDrafter

    # the sized run trims with a fixed, mild cost curve: one measured under a loaded machine can price every node
    # out, and this test is about losslessness, not about this machine's costs
    monkeypatch.setattr(specdec.engine, "_cost_of", lambda profile: (lambda n: 1.0 + 0.02 * (n - 1)))

    heads = random_heads(tiny)
    heads.save_pretrained(tmp_path / "h")
    drafter = build_drafter(f"medusa:{tmp_path / 'h'}+prompt-lookup:adaptive=false")
    assert isinstance(drafter, FusedDrafter) and drafter.needs_hidden_states
    ids = torch.tensor([4, 5, 6, 7, 4, 5, 6, 7, 4, 5])
    ref = hf_greedy(tiny, ids, 30, min_new_tokens=30)
    for sized in (False, True):
        out = specdec.generate(tiny, None, ids, drafter=drafter, max_new_tokens=30, size_trees=sized)
        assert out.token_ids == ref
        assert out.stats.drafted_tokens > 0  # prompt lookup's unscored candidates are always verified
