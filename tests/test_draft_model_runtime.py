"""What the engine gives drafters with a model of their own and how they use it: the target's committed keys/values
(``DraftState.target_kv``, per batch row), drafting judged by what steps return (tokens per second from one proposal
to the next), and deferring to the other drafters of a fusion (drafting only where they proposed nothing)."""

import torch

import specdec
from conftest import hf_greedy, tiny_model
from specdec.drafters.base import Drafter
from specdec.drafters.draft_model import DraftModelConfig, DraftModelDrafter, _Yield
from specdec.drafters.fused import FusedDrafter
from specdec.tree import TokenTree


def test_yield_weighs_drafted_steps_against_the_others_and_skips_one_off_work():
    y = _Yield(decay=0.5)
    y.begin(0.0, True)
    y.end(0.03, 3)  # a drafted step: 3 tokens in 30 ms
    assert round(y.rate(True)) == 100 and y.rate(False) is None and not y.loses()
    y.begin(0.03, False)
    y.end(0.04, 1)  # a step without drafts: 1 token in 10 ms
    assert round(y.rate(False)) == 100 and not y.loses()
    y.begin(0.04, True, clean=False)
    y.end(0.3, 2)  # carried a prefill: not what a drafted step costs
    y.end(0.4, 2)  # a verdict without a proposal before it counts nothing
    assert y.steps == [1, 1]
    y.begin(0.4, True)
    y.end(0.45, 1)  # a drafted step that returned little: (0.5 * 3 + 1) / (0.5 * 0.03 + 0.05) < 100
    assert y.rate(True) < y.rate(False) and y.loses()


class _Counting(Drafter):
    """A deferring drafter that proposes one fixed token and counts its proposals and the steps it heard."""

    name = "counting"
    defers = True

    def __init__(self):
        self.proposed = self.heard = 0

    def propose(self, state):
        self.proposed += 1
        return TokenTree(torch.tensor([state.root, 7]), torch.tensor([-1, 0]))

    def observe(self, result):
        self.heard += 1


class _Every(Drafter):
    """Proposes one draft on every other step."""

    name = "every"
    stateless = True

    def __init__(self):
        self.calls = 0

    def propose(self, state):
        self.calls += 1
        if self.calls % 2:
            return TokenTree.root_only(state.root)
        return TokenTree(torch.tensor([state.root, 5]), torch.tensor([-1, 0]))


def test_a_deferring_drafter_proposes_only_where_the_others_proposed_nothing():
    target = tiny_model("llama")
    ids = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(3))
    deferring, other = _Counting(), _Every()
    out = specdec.generate(target, None, ids, drafter=FusedDrafter([deferring, other]), max_new_tokens=16, size_trees=False)
    assert out.token_ids == hf_greedy(target, ids, 16, min_new_tokens=16)
    steps = out.stats.target_forwards
    assert other.calls == steps  # asked first on every step, whatever its place in the spec
    assert deferring.proposed == deferring.heard == (steps + 1) // 2  # the steps the other left empty, heard only those


def test_draft_models_defer_and_still_equal_plain_decoding():
    assert DraftModelDrafter.defers and specdec.drafters.build_drafter("rapid").defers
    target = tiny_model("qwen2")
    ids = torch.tensor([4, 8, 15, 16, 23, 42, 4, 8, 15, 16])
    fused = FusedDrafter([DraftModelDrafter(tiny_model("qwen2", seed=2), config=DraftModelConfig(k=3, fast=False)),
                          specdec.drafters.build_drafter("prompt-lookup")])
    for sized in (True, False):
        out = specdec.generate(target, None, ids, drafter=fused, max_new_tokens=24, size_trees=sized)
        assert out.token_ids == hf_greedy(target, ids, 24, min_new_tokens=24)


class _Reader(Drafter):
    """Reads the target's committed keys/values at every proposal and keeps layer 0's, with the tokens they are for."""

    name = "reader"

    def __init__(self):
        self.seen = []

    def propose(self, state):
        keys, values = state.target_kv(0, state.token_ids.numel() - 1)
        self.seen.append((state.token_ids[:-1].clone(), keys[0].clone(), values[0].clone()))
        return TokenTree.root_only(state.root)


def test_target_kv_gives_each_batch_row_its_own_committed_keys_and_values():
    target = tiny_model("llama", dtype=torch.float32)
    prompts = [torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 17)]
    reader = _Reader()  # (each sequence's session appends to the same list: spawn shares it)
    specdec.generate(target, None, prompts, drafter=reader, max_new_tokens=6, size_trees=False)
    assert len(reader.seen) >= 8 and {int(seq.numel()) for seq, _, _ in reader.seen} >= {9, 17}
    if True:
        for seq, k, v in reader.seen:
            with torch.no_grad():
                ref = target(input_ids=seq[None], use_cache=True).past_key_values
            rk, rv = (ref.layers[0].keys, ref.layers[0].values) if hasattr(ref, "layers") else ref[0]
            assert k.shape == rk.shape
            torch.testing.assert_close(k, rk, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v, rv, rtol=1e-4, atol=1e-5)


def test_the_draft_model_spec_builds_a_draft_model(monkeypatch):
    from specdec import models

    model = tiny_model("llama", dtype=torch.float32)
    monkeypatch.setattr(models, "load_model", lambda path: (model, None))
    d = specdec.drafters.build_drafter("draft-model:some/dir,k=2")
    assert type(d) is DraftModelDrafter and d.model is model and d.config.k == 2
