"""The lean native decode forward (specdec/lean.py, csrc/step.c): the model's own forward up to float rounding, a
tree node bit for bit a plain step at its place, each batch row as if alone, speculation equal to plain decoding,
and a stated reason wherever it does not apply."""

import pytest
import torch

import specdec
from conftest import tiny_model
from drafters_for_tests import OracleDrafter, RandomDrafter
from specdec import lean as lean_mod
from specdec import native
from specdec.batch import BatchKVCache, BatchRunner
from specdec.cache import TreeKVCache
from specdec.kernels import ROW_BUCKETS, FastLinears, LinearPlan
from specdec.lean import LeanForward, lean_forward_for, lean_unavailable_reason
from specdec.tree import TokenTree

PARENTS = [-1, 0, 0, 1, 2, 3, 3, 5, 1, 8]  # a branchy tree: depths up to 5, siblings at several levels


@pytest.fixture(autouse=True)
def _needs_native():
    if lean_mod.step_lib() is None or native.rows_linear_lib() is None or native.attention_lib() is None:
        pytest.skip(f"the native kernels are not available here: {native.unavailable_reason()}")


def _fast(model) -> FastLinears:
    return FastLinears(model, LinearPlan({b: "rows-avx512" for b in ROW_BUCKETS}, invariant=True))


def _path(parents, i):
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


def _runner_after(model, fast, prefix: torch.Tensor) -> BatchRunner:
    runner = BatchRunner(model, fast=fast)
    single = TreeKVCache()
    runner.extend(single, prefix)
    runner.cache = BatchKVCache.stack([single])
    return runner


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_tree_forward_equals_the_models_own_forward_and_each_node_its_plain_steps(arch):
    model = tiny_model(arch, vocab_size=96, seed=3, dtype=torch.float32)
    fast = _fast(model)
    assert fast.lean is not None, lean_unavailable_reason()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 96, (23,), generator=g)
    tree = TokenTree(torch.randint(0, 96, (len(PARENTS),), generator=g), torch.tensor(PARENTS))
    calls = []
    forward = LeanForward.forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LeanForward, "forward", lambda self, *a, **k: calls.append(a[1].shape) or forward(self, *a, **k))
        with torch.inference_mode(), _runner_after(model, fast, prefix) as runner:
            out = runner.forward([tree], hidden=(0, 1, -1))
            assert calls == [(1, len(PARENTS))]  # the lean forward ran it
            for i in range(len(PARENTS)):
                path = _path(PARENTS, i)
                seq = torch.cat([prefix, tree.tokens[path]])
                ref = model(input_ids=seq[None], output_hidden_states=True)
                torch.testing.assert_close(out.logits[0, i], ref.logits[0, -1], rtol=1e-4, atol=1e-4)
                h = torch.cat([ref.hidden_states[0][0, -1], ref.hidden_states[1][0, -1], ref.hidden_states[-1][0, -1]])
                torch.testing.assert_close(out.hidden_states[0, i], h, rtol=1e-4, atol=1e-4)
                # the same node by plain steps along its path: bit for bit
                runner.commit([torch.arange(0)])
                for j in path:
                    step = runner.forward([TokenTree.root_only(int(tree.tokens[j]))], hidden=(0, 1, -1))
                    runner.commit([torch.arange(1)])
                assert torch.equal(step.logits[0, 0], out.logits[0, i]), i
                assert torch.equal(step.hidden_states[0, 0], out.hidden_states[0, i]), i
                for layer in runner.cache.layers:  # back to the prefix for the next node (a pointer move)
                    layer.lengths, layer.length = [prefix.numel()], prefix.numel()


def test_batch_rows_are_computed_as_if_alone():
    """Rows of different lengths and trees in one lean forward: each row's logits equal its own forward, bit for bit."""
    model = tiny_model("llama", vocab_size=96, seed=4, dtype=torch.float32)
    fast = _fast(model)
    g = torch.Generator().manual_seed(2)
    prefixes = [torch.randint(0, 96, (n,), generator=g) for n in (5, 31, 17)]
    trees = [TokenTree(torch.randint(0, 96, (n,), generator=g), torch.tensor(PARENTS[:n])) for n in (4, 10, 1)]
    with torch.inference_mode():
        alone = []
        for p, t in zip(prefixes, trees):
            with _runner_after(model, fast, p) as runner:
                alone.append(runner.forward([t]).logits[0, : len(t)])
        with BatchRunner(model, fast=fast) as runner:
            runner.prefill(prefixes, rows=3)
            out = runner.forward(trees).logits
    for b, t in enumerate(trees):
        assert torch.equal(out[b, : len(t)], alone[b]), b



@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_drafters_single_sequence_runner_through_the_lean_forward(arch):
    """TreeRunner(lean=True), what a draft model runs: a prompt longer than a piece is appended in pieces (the first
    a prefill by the model's own forward, the rest lean), a tree's nodes get the model's own logits to float
    rounding, the cache grows by the tree and commits/rolls back as with the model's forward."""
    from specdec.runner import TreeRunner

    model = tiny_model(arch, vocab_size=96, seed=7, dtype=torch.float32)
    fast = _fast(model)
    g = torch.Generator().manual_seed(8)
    prompt = torch.randint(0, 96, (150,), generator=g)
    tree = TokenTree(torch.randint(0, 96, (len(PARENTS),), generator=g), torch.tensor(PARENTS))
    calls, forward = [], LeanForward.forward_single
    with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
        mp.setattr(LeanForward, "forward_single", lambda self, cache, tokens, *a, **k: calls.append(tokens.numel()) or forward(self, cache, tokens, *a, **k))
        with TreeRunner(model, fast=fast, lean=True) as runner:
            first = runner.extend(prompt)
            assert calls == [64, 22] and runner.prefix_len == 150  # pieces of 64 after the first
            ref = model(input_ids=prompt[None]).logits[0, -1]
            torch.testing.assert_close(first.logits[-1], ref, rtol=1e-4, atol=1e-4)
            out = runner.forward(tree)
            assert calls[-1] == len(PARENTS) and runner.prefix_len == 150 + len(PARENTS)
            for i in range(len(PARENTS)):
                seq = torch.cat([prompt, tree.tokens[_path(PARENTS, i)]])
                torch.testing.assert_close(out.logits[i], model(input_ids=seq[None]).logits[0, -1], rtol=1e-4, atol=1e-4)
            path = torch.tensor(_path(PARENTS, 7))
            runner.commit(150, path)
            assert runner.prefix_len == 150 + path.numel()
            step = runner.forward(TokenTree.root_only(5))
            seq = torch.cat([prompt, tree.tokens[path], torch.tensor([5])])
            torch.testing.assert_close(step.logits[0], model(input_ids=seq[None]).logits[0, -1], rtol=1e-4, atol=1e-4)
        with TreeRunner(model, fast=fast) as runner:  # not asked for: the model's own forward
            n = len(calls)
            runner.extend(prompt)
            runner.forward(tree)
            assert len(calls) == n

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_speculation_through_the_lean_forward_equals_plain_decoding(arch, monkeypatch):
    from specdec import profile

    model = tiny_model(arch, vocab_size=96, seed=6, dtype=torch.float32)
    plan = LinearPlan({b: "rows-avx512" for b in ROW_BUCKETS}, invariant=True)
    monkeypatch.setattr(profile, "measure_plan", lambda *a, **k: plan)
    monkeypatch.setenv("SPECDEC_CACHE", str(profile._profile_dir().parent / "lean-test"))
    rows, forward = [], LeanForward.forward
    monkeypatch.setattr(LeanForward, "forward", lambda self, cache, tokens, *a, **k: rows.append(tokens.numel()) or forward(self, cache, tokens, *a, **k))
    g = torch.Generator().manual_seed(5)
    for i in range(3):
        ids = torch.randint(0, 96, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g)
        plain = specdec.generate(model, None, ids, drafter="none", max_new_tokens=24, size_trees=False).token_ids
        for drafter in (OracleDrafter(ids.numel(), plain), RandomDrafter(96, seed=i), "prompt-lookup"):
            out = specdec.generate(model, None, ids, drafter=drafter, max_new_tokens=24, size_trees=False)
            assert out.token_ids == plain, (i, drafter)
    assert 1 in rows and max(rows) > 1  # plain steps and tree forwards both ran through it


def test_where_it_does_not_apply_it_says_why(monkeypatch):
    table = ["rows-avx512"] * 65
    assert lean_forward_for(tiny_model("llama", dtype=torch.float64), table) is None
    assert "fp32" in lean_unavailable_reason()
    assert lean_forward_for(tiny_model("llama", dtype=torch.float32), ["torch"] * 65) is None
    assert "own kernels" in lean_unavailable_reason()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    assert lean_forward_for(qwen3, table) is None
    assert "q/k norms" in lean_unavailable_reason()
    # a layer that computes something else than its layout suggests is caught by the check against its own forward
    model = tiny_model("llama", dtype=torch.float32)
    model.model.layers[1].mlp.act_fn = torch.nn.GELU()
    assert lean_forward_for(model, table) is None
    assert "differ" in lean_unavailable_reason()
    monkeypatch.setenv("SPECDEC_LEAN", "0")
    assert lean_forward_for(tiny_model("llama", dtype=torch.float32), table) is None
    assert "SPECDEC_LEAN=0" in lean_unavailable_reason()
    monkeypatch.delenv("SPECDEC_LEAN")
    ok = lean_forward_for(tiny_model("llama", dtype=torch.float32), ["torch"] * 9 + ["rows-avx512"] * 56)
    assert ok is not None and not ok.serves(1) and ok.serves(9) and not ok.serves(65)
