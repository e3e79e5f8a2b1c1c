"""Clover heads: lossless drafting on two architectures, persistence, fit checks, training (clover and clover2)."""

import json

import pytest
import torch

import specdec
from conftest import assert_greedy_equals_hf_on_random_prompts, save_tiny_target, tiny_model, write_conversations
from specdec.drafters.clover import AttentionDecoder, CloverConfig, CloverDrafter, CloverHeads, decoder_parts


def random_heads(model, depth=3, draft=None, augment=True, seed=0):
    torch.manual_seed(seed)
    layer, rotary = decoder_parts(model)
    cfg = CloverConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size, num_heads=depth,
                       attention_heads=model.config.num_attention_heads, draft_vocab_size=draft, augment=augment)
    dv = torch.arange(draft) * (model.config.vocab_size // draft) if draft else None
    heads = CloverHeads(cfg, layer if augment else None, rotary, model.get_input_embeddings(), model.get_output_embeddings().weight, dv)
    for p in heads.parameters():  # random, so drafts are not all the same token
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3)
    torch.nn.init.uniform_(heads.aug_gate, 0.2, 1.0)  # the Augmenting Block open, so drafting runs through it
    return heads.to(model.dtype)


def test_attention_decoder_starts_as_the_identity_and_mixes_per_head():
    ad = AttentionDecoder(8, 2, 1e-6)
    s, e = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(ad(s, e), s)  # W_v = 0 at start
    torch.nn.init.normal_(ad.v.weight)
    gate = 1 + torch.nn.functional.cosine_similarity(ad.q(ad.norm(s)).view(3, 2, 4), ad.k(e).view(3, 2, 4), dim=-1)
    expected = s + (ad.v(e).view(3, 2, 4) * gate[..., None]).reshape(3, 8)
    torch.testing.assert_close(ad(s, e), expected)


def test_untrained_heads_start_from_the_targets_own_head():
    """A, B and W_v start at zero and the Augmenting Block's gate is shut, so every depth first predicts what the
    target's own head predicts from h (training starts from the target, as Medusa's residual blocks do)."""
    model = tiny_model("llama")
    layer, rotary = decoder_parts(model)
    cfg = CloverConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size, num_heads=3,
                       attention_heads=model.config.num_attention_heads)
    w = model.get_output_embeddings().weight
    heads = CloverHeads(cfg, layer, rotary, model.get_input_embeddings(), w).to(model.dtype)
    hidden = torch.randn(1, 5, cfg.hidden_size, dtype=model.dtype)
    z = heads.encode(hidden, torch.tensor([[3, 4, 5, 6, 7]]), torch.arange(5)[None])
    expected = (hidden @ w.T).argmax(-1)
    assert torch.equal(heads.logits(heads.head_first(z)).argmax(-1), expected)
    _, o = heads.head_next(z, torch.tensor([[8, 9, 10, 11, 12]]))
    assert torch.equal(heads.logits(o).argmax(-1), expected)


def test_first_layout_checkpoints_are_a_clear_error(tmp_path):
    model = tiny_model("llama")
    random_heads(model).save_pretrained(tmp_path / "old")
    raw = json.loads((tmp_path / "old" / "config.json").read_text())
    (tmp_path / "old" / "config.json").write_text(json.dumps({**raw, "format_version": 1}))
    with pytest.raises(ValueError, match="first layout.*retrain"):
        specdec.drafters.build_drafter(f"clover:{tmp_path / 'old'}")


@pytest.mark.parametrize("kind", ["augment", "no-augment", "draft-vocab", "fused"])
def test_clover_greedy_equals_hf_greedy(tiny, kind):
    heads = random_heads(tiny, augment=kind != "no-augment", draft=48 if kind == "draft-vocab" else None)
    drafter = CloverDrafter.from_heads(heads)
    if kind == "fused":
        from specdec.drafters.fused import FusedDrafter
        from specdec.drafters.prompt_lookup import PromptLookupDrafter

        drafter = FusedDrafter([drafter, PromptLookupDrafter()])
    assert_greedy_equals_hf_on_random_prompts(tiny, drafter, kind)


def test_siblings_are_conditioned_on_their_own_parent():
    """Two depth-1 nodes with different tokens get different children distributions."""
    model = tiny_model("llama")
    drafter = CloverDrafter.from_heads(random_heads(model, depth=2))
    specdec.generate(model, None, torch.tensor([1, 2, 3]), drafter=drafter, max_new_tokens=1)  # binds
    drafter.reset(torch.tensor([1, 2, 3]))
    z = torch.randn(model.config.hidden_size, dtype=model.dtype)
    h = drafter.heads
    s, o = h.head_next(z.expand(2, -1), torch.tensor([5, 6]))
    assert not torch.allclose(h.logits(o)[0], h.logits(o)[1])


def test_drafting_stops_early_only_where_extra_nodes_cost_something():
    """With a measured cost that grows with the nodes, depths whose nodes all score below min_score are not
    drafted; with no cost or a flat one (a node budget: the best N nodes are kept whatever they score) they are."""
    from specdec.drafters.clover import CloverDrafterConfig

    model = tiny_model("llama")
    heads = random_heads(model, depth=3)
    drafter = CloverDrafter.from_heads(heads, CloverDrafterConfig(min_score=1.0, beam=2, topk=2))
    specdec.generate(model, None, torch.tensor([1, 2, 3]), drafter=drafter, max_new_tokens=1)  # binds
    z = torch.randn(model.config.hidden_size, dtype=model.dtype)
    depths = {}
    for name, cost in (("none", None), ("flat", lambda n: 1.0), ("growing", lambda n: 1.0 + 0.1 * (n - 1))):
        drafter.target.cost = cost
        drafter.reset(torch.tensor([1, 2, 3]))
        depths[name] = int(drafter._tree(3, z).depths.max())
    assert depths == {"none": 3, "flat": 3, "growing": 1}


def test_deepening_pays_only_while_the_newest_depth_makes_the_trim():
    """Worked example: v(n) = 1 up to 3 nodes, then 1.5. Drafts [.6, .3] at depth 1: the trim keeps both
    (1.9 / 1), so a depth below them may pay; when the newest depth's best node (.05) ranks below the kept
    ones, its children cannot make the cut and drafting stops."""
    from specdec.drafters.clover import deepening_pays

    cost = lambda n: 1.0 if n <= 3 else 1.5
    assert deepening_pays([1.0, 0.6, 0.3], [1, 2], cost, 64)
    assert not deepening_pays([1.0, 0.6, 0.3, 0.05, 0.04], [3, 4], cost, 64)
    assert deepening_pays([1.0, 0.6, 0.3, 0.4], [3], cost, 64)  # .4 is kept before .3
    assert not deepening_pays([1.0, 0.6, 0.3, 0.4], [3], cost, 2)  # one draft fits: only .6 is kept
    assert not deepening_pays([1.0, 0.01], [1], lambda n: float(n), 64)  # no draft pays: a plain step


def test_a_steep_cost_stops_drafting_where_the_trim_would_cut_and_keeps_the_same_trimmed_tree():
    from specdec.drafters.clover import CloverDrafterConfig
    from specdec.sizing import trim

    model = tiny_model("llama")
    heads = random_heads(model, depth=5)
    drafter = CloverDrafter.from_heads(heads, CloverDrafterConfig(min_score=0.0, beam=4, topk=4))
    specdec.generate(model, None, torch.tensor([1, 2, 3]), drafter=drafter, max_new_tokens=1)  # binds
    torch.manual_seed(0)
    steep = lambda n: 1.0 if n <= 2 else 1.0 + 2.0 * (n - 2)
    stopped = 0
    for _ in range(8):
        z = torch.randn(model.config.hidden_size, dtype=model.dtype)
        drafter.target.cost = None
        drafter.reset(torch.tensor([1, 2, 3]))
        full = drafter._tree(3, z)
        drafter.target.cost = steep
        drafter.reset(torch.tensor([1, 2, 3]))
        short = drafter._tree(3, z)
        assert int(full.depths.max()) == 5
        stopped += int(short.depths.max()) < 5
        # with no history the scores are the same priors in both trees, so the engine keeps the same nodes
        a, b = trim(full, steep), trim(short, steep)
        assert set(a.token_paths) == set(b.token_paths)
    assert stopped == 8


def test_checkpoint_round_trip_gives_the_same_drafts(tmp_path):
    model = tiny_model("qwen2")
    heads = random_heads(model, draft=32)
    heads.save_pretrained(tmp_path / "c")
    ids = torch.tensor([4, 5, 6, 4, 5])
    a = CloverDrafter.from_heads(heads)
    b = specdec.drafters.build_drafter(f"clover:{tmp_path / 'c'},beam=4")
    outs = []
    for d in (a, b):
        d.options.beam = 4
        r = specdec.generate(model, None, ids, drafter=d, max_new_tokens=12, size_trees=False)
        outs.append((r.token_ids, r.stats.drafted_tokens, r.stats.tokens_per_step))
    assert outs[0] == outs[1]
    saved = json.loads((tmp_path / "c" / "config.json").read_text())
    assert saved["num_heads"] == 3 and saved["draft_vocab_size"] == 32
    assert not any(k.startswith("_frozen") for k in heads.state_dict())  # the target's embedding is not saved


def test_vocab_option_drafts_over_the_most_frequent_tokens_and_stays_lossless(tmp_path):
    from specdec.drafters.base import add_draft_counts

    model = tiny_model("qwen2")
    heads = random_heads(model, draft=32)
    add_draft_counts(heads, torch.arange(32) % 7)  # rows 6, 13, 20, 27 the most frequent (ties: the lower row first)
    heads.save_pretrained(tmp_path / "c")
    drafter = specdec.drafters.build_drafter(f"clover:{tmp_path / 'c'},vocab=6")
    proposed, propose = [], drafter.propose
    drafter.propose = lambda state: proposed.append(propose(state)) or proposed[-1]
    ids = torch.tensor([4, 5, 6, 4, 5])
    out = specdec.generate(model, None, ids, drafter=drafter, max_new_tokens=12, size_trees=False)
    assert out.token_ids == specdec.generate(model, None, ids, drafter="none", max_new_tokens=12).token_ids
    kept = heads.draft_vocab[[5, 6, 12, 13, 20, 27]].tolist()
    assert drafter.heads.draft_vocab.tolist() == kept and drafter.heads._head.shape[0] == 6
    drafted = {t for tree in proposed for t in tree.tokens[1:].tolist()}
    assert drafted and drafted <= set(kept)
    random_heads(model, draft=32).save_pretrained(tmp_path / "old")  # saved without counts
    with pytest.raises(ValueError, match="holds none"):
        specdec.generate(model, None, ids, drafter=f"clover:{tmp_path / 'old'},vocab=6", max_new_tokens=2)


def test_heads_for_another_model_are_a_clear_error(tmp_path):
    model = tiny_model("llama")
    heads = random_heads(tiny_model("llama", vocab_size=100))
    with pytest.raises(ValueError, match="vocabulary of 100"):
        specdec.generate(model, None, torch.tensor([1, 2]), drafter=CloverDrafter.from_heads(heads))
    wide = tiny_model("llama")
    wide_heads = random_heads(wide)
    wide_heads.config.hidden_size = 64
    with pytest.raises(ValueError, match="hidden size 64"):
        specdec.generate(model, None, torch.tensor([1, 2]), drafter=CloverDrafter(wide_heads.config, wide_heads.state_dict()))
    with pytest.raises(FileNotFoundError):
        specdec.drafters.build_drafter(f"clover:{tmp_path / 'none'}")


@pytest.mark.parametrize("method", ["clover", "clover2"])
def test_training_fits_clover_and_ships_a_drafter(method, tmp_path, default_tokenizer):
    from specdec.training import load_recipe, train

    target = save_tiny_target(tmp_path / "target", default_tokenizer)
    data = write_conversations(tmp_path / "convs.jsonl", [(f"Say something about topic {i}.", f"Topic {i} is a fine topic. " * 3) for i in range(16)])
    cfg = load_recipe(f"{method}-smollm2-cpu", dict(model=str(target), data=str(data), output_dir=str(tmp_path / "run"), features_dir="",
                                                    num_conversations=12, heldout=4, max_len=40, depth=3, draft_vocab_size=128,
                                                    batch_size=4, max_steps=4, epochs=1, save_steps=100, logging_steps=2, progress=False))
    final = train(cfg)
    saved = json.loads((final / "config.json").read_text())
    assert saved["version"] == (2 if method == "clover2" else 1) and len(saved["extra"]["heldout_accuracy"]) == 3
    counts = specdec.drafters.base.read_drafter_weights(final / "model.safetensors")["draft_counts"]
    assert counts.shape == (128,) and counts.sum() > 0  # label counts kept for vocab=N
    model, tok = specdec.load_model(target)
    msgs = [{"role": "user", "content": "Say something about topic 3."}]
    ids = specdec.engine.prepare_input_ids(tok, msgs)
    out = specdec.generate(model, tok, msgs, drafter=f"clover:{final}", max_new_tokens=12)
    assert out.token_ids == specdec.generate(model, tok, msgs, drafter="none", max_new_tokens=12).token_ids
    assert len(ids) > 0
