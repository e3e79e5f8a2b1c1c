"""RAPID: retrieval over the prompt's chunks, the shortened context, lossless drafting with the target's own
weights and with a separate draft model."""

import pytest
import torch

import specdec
from conftest import hf_greedy, tiny_model
from specdec.drafters.base import Target
from specdec.drafters.rapid import BM25, RapidConfig, RapidDrafter, line_breaks, split_prompt

# small settings, so that prompts of a few dozen tokens are "long": 4 head tokens, chunks of 6, 2 chunks kept,
# the last 8 tokens (the question) kept
SMALL = dict(chunk=6, top_chunks=2, head=4, tail=8, recent=8, period=4, fast=False, k=3)


def _documents(tokenizer, needle: int):
    """Twelve short notes about made-up people, one per paragraph; note ``needle`` holds the answer."""
    names = ["Arvid", "Belka", "Corwin", "Dessa", "Emrik", "Fenna", "Gisli", "Hedda", "Ivor", "Jorun", "Kaspar", "Liesel"]
    facts = ["grows tomatoes in a greenhouse near the river", "repairs old bicycles every weekend",
             "teaches chess to children at the library", "collects stamps from island nations",
             "bakes rye bread before sunrise", "paints lighthouses in watercolour", "restores antique clocks",
             "keeps bees on a rooftop downtown", "builds model ships from driftwood", "sings in a harbour choir",
             "writes crossword puzzles for a newspaper", "knits scarves for the winter market"]
    notes = [f"{n} {f}. Neighbours call {n} friendly and punctual." for n, f in zip(names, facts)]
    notes[needle] = f"{names[needle]}'s secret passphrase is marmalade-quartz-seventeen, kept in a drawer."
    return names, notes


def test_bm25_ranks_the_document_that_shares_the_rare_query_tokens_first():
    docs = [[1, 2, 3, 4], [1, 2, 5, 6], [1, 7, 8, 9], [1, 2, 3, 10]]
    ranker = BM25(docs)
    scores = ranker.scores([8, 9, 1])  # 1 is everywhere (idf ~0); 8 and 9 only in document 2
    assert max(range(4), key=scores.__getitem__) == 2
    assert ranker.top([8, 9, 1], 2)[0] == 2 or 2 in ranker.top([8, 9, 1], 2)
    assert ranker.top([5], 1) == [1] and ranker.top([3, 4], 2) == [0, 3]  # document order among the kept


@pytest.mark.parametrize("needle", [2, 9])
def test_retrieval_picks_the_chunk_that_holds_the_answer(default_tokenizer, needle):
    names, notes = _documents(default_tokenizer, needle)
    question = f"What is {names[needle]}'s secret passphrase?"
    msgs = [{"role": "user", "content": "Notes:\n\n" + "\n\n".join(notes) + f"\n\nQuestion: {question}"}]
    prompt = specdec.engine.prepare_input_ids(default_tokenizer, msgs)
    cfg = RapidConfig(chunk=64, top_chunks=2, head=8, tail=24, fast=False)
    breaks = line_breaks(default_tokenizer)
    head, chunks, tail = split_prompt(prompt.tolist(), cfg, breaks)
    assert len(chunks) >= 4 and sum(map(len, chunks)) + len(head) + len(tail) == prompt.numel()
    assert sum(c[-1] in breaks for c in chunks[:-1]) >= len(chunks) // 2  # most chunks end at a paragraph's end
    target = tiny_model("llama", vocab_size=len(default_tokenizer), dtype=torch.float32)
    d = RapidDrafter(tiny_model("llama", vocab_size=len(default_tokenizer), dtype=torch.float32, seed=1), config=cfg)
    d.bind(Target.of(target, default_tokenizer))
    d.reset(prompt)
    short = default_tokenizer.decode(d.short_context())
    assert "marmalade-quartz-seventeen" in short  # the answer's chunk is in the drafter's context ...
    assert len(d.short_context()) <= 8 + 2 * 64 + 24 < prompt.numel() * 0.6  # ... which is much shorter
    assert d.short_context()[:8] == prompt[:8].tolist() and d.short_context()[-24:] == prompt[-24:].tolist()


def test_a_short_prompt_is_drafted_over_whole():
    d = RapidDrafter(tiny_model("llama"), config=RapidConfig(**SMALL))
    prompt = torch.arange(10, 30)  # 20 tokens <= head 4 + tail 8 + 2 chunks of 6
    d.reset(prompt)
    assert split_prompt(prompt.tolist(), d.config) is None and d.retrievals == 0
    from specdec.drafters.base import DraftState

    state = DraftState(torch.cat([prompt, torch.tensor([5])]), prompt_len=20)
    assert d._context(state) == state.token_ids.tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("draft", ["self", "self-recompute", "separate"])
def test_rapid_greedy_equals_hf_greedy(arch, draft):
    """``self`` drafts with the target's own KV (gathered from its prompt cache, copied from its live cache),
    ``self-recompute`` runs the target's weights over the short context (RAPID as published), ``separate`` a
    draft model over it."""
    target = tiny_model(arch)
    model = None if draft.startswith("self") else tiny_model(arch, seed=1)
    kv = "recompute" if draft == "self-recompute" else "auto"
    g = torch.Generator().manual_seed(5)
    for i in range(3):
        ids = torch.randint(0, 96, (int(torch.randint(30, 60, (1,), generator=g)),), generator=g)
        ref = hf_greedy(target, ids, 24, min_new_tokens=24)
        d = RapidDrafter(model, config=RapidConfig(**SMALL, kv=kv))
        out = specdec.generate(target, None, ids, drafter=d, max_new_tokens=24, size_trees=False)
        assert out.token_ids == ref, (arch, draft, i)
        assert out.stats.drafted_tokens > 0
        assert d.retrievals >= 2  # the first retrieval, then at least one more with the output in the query
    # fused with prompt lookup, trees sized by the measured cost
    from specdec.drafters.fused import FusedDrafter

    fused = FusedDrafter([RapidDrafter(model, config=RapidConfig(**SMALL, kv=kv)), specdec.drafters.build_drafter("prompt-lookup")])
    out = specdec.generate(target, None, ids, drafter=fused, max_new_tokens=24)
    assert out.token_ids == ref


def test_self_drafting_over_the_whole_prompt_accepts_every_draft():
    """With a prompt too short to cut, ``rapid`` with the target's own weights drafts exactly what the target
    would write: every draft is accepted (a check that the draft cache follows the target's)."""
    target = tiny_model("llama")
    ids = torch.tensor([3, 9, 27, 81, 3, 9])
    out = specdec.generate(target, None, ids, drafter=RapidDrafter(None, config=RapidConfig(k=3, fast=False)), max_new_tokens=16,
                           size_trees=False)
    assert out.token_ids == hf_greedy(target, ids, 16, min_new_tokens=16)
    accepted = sum(n - 1 for n in out.stats.tokens_per_step)  # each step's tokens past the one it always gives
    assert out.stats.drafted_tokens > 0 and accepted >= out.stats.drafted_tokens - 3  # (the last chain may be cut)


def test_drafts_with_the_targets_kv_read_its_prompt_cache_and_its_live_cache():
    """kv=target on a prompt long enough to cut: the draft cache holds the target's own entries for the kept prompt
    positions (bit for bit) and for the committed output, then the root and the chain it computes."""
    target = tiny_model("llama")
    ids = torch.randint(0, 96, (50,), generator=torch.Generator().manual_seed(9))
    d = RapidDrafter(None, config=RapidConfig(**{**SMALL, "period": 0}))
    seen = []
    catch_up = RapidDrafter._catch_up

    def spy(self, ids_, keep, state=None):
        out = catch_up(self, ids_, keep, state)
        n, committed = len(self._positions), len(ids_) - 1 - len(self._positions)
        assert state is not None and state.target_kv is not None
        keys, values = state.target_kv(0, self._prompt_len + committed)
        layer = self.runner.cache.layers[1]
        want = torch.cat([keys[1][:, :, self._positions], keys[1][:, :, self._prompt_len:]], dim=2)
        assert torch.equal(layer.keys[:, :, : n + committed], want)
        seen.append(committed)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RapidDrafter, "_catch_up", spy)
        out = specdec.generate(target, None, ids, drafter=d, max_new_tokens=20, size_trees=False)
    assert out.token_ids == hf_greedy(target, ids, 20, min_new_tokens=20)
    assert d._parts is not None and len(seen) > 3 and seen[-1] > 5  # cut, and the output copied as it grew


def test_kv_target_needs_the_targets_own_weights():
    with pytest.raises(ValueError, match="kv=target"):
        specdec.drafters.build_drafter("rapid:/some/draft/model,kv=target")
    with pytest.raises(ValueError, match="kv must be"):
        specdec.drafters.build_drafter("rapid:kv=both")


def test_spec_and_options():
    d = specdec.drafters.build_drafter("rapid:chunk=128,top_chunks=3,period=0")
    assert isinstance(d, RapidDrafter) and d.model is None and (d.config.chunk, d.config.top_chunks, d.config.period) == (128, 3, 0)
    with pytest.raises(ValueError, match="chunk"):
        specdec.drafters.build_drafter("rapid:chunk=0")
    with pytest.raises(ValueError, match="at most one argument"):
        specdec.drafters.build_drafter("rapid:a,b")
    assert d.open({"top_chunks": "2"}).config.top_chunks == 2
    with pytest.raises(ValueError, match="per-request"):
        d.open({"chunk": 5})


def test_knowledge_transfer_at_strength_zero_is_exact_speculative_sampling():
    target = tiny_model("llama")
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(2))
    runs = {}
    for acceptance, strength in (("exact", 1.0), ("rapid", 0.0), ("rapid", 2.0)):
        d = RapidDrafter(None, config=RapidConfig(**{**SMALL, "sample": True}))
        runs[(acceptance, strength)] = specdec.generate(target, None, ids, drafter=d, max_new_tokens=24, temperature=1.0, seed=5,
                                                        acceptance=acceptance, rapid_strength=strength,
                                                        size_trees=False).token_ids  # (chains of fixed length, not timed)
    assert runs[("rapid", 0.0)] == runs[("exact", 1.0)]
    assert len(runs[("rapid", 2.0)]) == 24


def test_knowledge_transfer_tilts_the_target_toward_the_drafters_plausible_tokens():
    from specdec.tree import TokenTree
    from specdec.verifiers import KnowledgeTransferSampler, SamplingConfig

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64))
    tree = TokenTree(torch.tensor([0, 2]), torch.tensor([-1, 0]))
    q = torch.tensor([0.0, 0.05, 0.9, 0.05], dtype=torch.float64)  # the drafter is sure of token 2
    tree.draft_probs = torch.stack([q, q])
    exact = KnowledgeTransferSampler(SamplingConfig(), strength=0.0).target_probs(tree, logits, None)
    tilted = KnowledgeTransferSampler(SamplingConfig(), strength=2.0, threshold=0.1).target_probs(tree, logits, None)
    torch.testing.assert_close(exact, torch.softmax(logits, -1))
    assert tilted[0, 2] > exact[0, 2]  # toward the drafter where it is confident
    assert torch.isclose(tilted[0, 0] / tilted[0, 3], exact[0, 0] / exact[0, 3])  # tokens below threshold keep their ratio
    torch.testing.assert_close(tilted[1], exact[1])  # a leaf (no children drawn from q) keeps p
    torch.testing.assert_close(tilted.sum(-1), torch.ones(2, dtype=torch.float64))


def test_knowledge_transfer_needs_sampling():
    with pytest.raises(ValueError, match="temperature > 0"):
        specdec.generate(tiny_model("llama"), None, torch.tensor([1, 2, 3]), drafter="none", max_new_tokens=2, acceptance="rapid")
    with pytest.raises(ValueError, match="rapid_strength"):
        specdec.generate(tiny_model("llama"), None, torch.tensor([1, 2, 3]), drafter="none", max_new_tokens=2, temperature=1.0,
                         acceptance="rapid", rapid_strength=-1.0)


@pytest.mark.parametrize("draft", ["self", "separate"])
def test_the_models_attention_is_restored_when_a_generation_ends(draft):
    """The draft runner routes its model to tree attention; at the end the model (with ``self``: the target, which a
    plain HF ``generate`` may use next) has its own implementation back."""
    target = tiny_model("llama", dtype=torch.float32)
    other = None if draft == "self" else tiny_model("llama", dtype=torch.float32, seed=1)
    before = target.config._attn_implementation, (other.config._attn_implementation if other is not None else None)
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(3))
    specdec.generate(target, None, ids, drafter=RapidDrafter(other, config=RapidConfig(**{**SMALL, "fast": True})), max_new_tokens=12,
                     size_trees=False)
    assert (target.config._attn_implementation, other.config._attn_implementation if other is not None else None) == before
