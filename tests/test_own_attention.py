"""specdec's own CPU attention: SDPA's result up to fp32 summation order, and row-invariant (a tree node's output
equals the plain step's bit for bit, branchy trees included); with it, bf16 and fp16 speculation equals plain
decoding token for token."""

import pytest
import torch
import torch.nn.functional as F

import specdec
from conftest import tiny_model
from drafters_for_tests import OracleDrafter, RandomDrafter
from specdec import native
from specdec.tree_attention.own import own_attention, own_attention_available

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tree(parents):
    n = len(parents)
    anc = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        anc[i, i], j = True, p
        while j >= 0:
            anc[i, j], j = True, parents[j]
    return anc


@pytest.fixture(autouse=True)
def _needs_kernel():
    if native.attention_lib() is None:
        assert native.unavailable_reason()
        assert not own_attention_available(torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16))
        pytest.skip(f"the attention kernel is not available here: {native.unavailable_reason()}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 40, 128])  # 40: a head dimension with a tail; 64 and 128: the unrolled tiles
def test_own_attention_equals_sdpa_and_tree_nodes_equal_their_plain_step(dtype, d):
    g = torch.Generator().manual_seed(d)
    prefix, parents = 29, [-1, 0, 0, 1, 2, 3, 3, 5, 1, 8]
    anc = _tree(parents)
    n, s = len(parents), prefix + len(parents)
    q = torch.randn(2, 6, n, d, generator=g).to(dtype)
    cache = torch.randn(2, 2, 2, s + 7, d, generator=g).to(dtype)  # k and v as views into a longer cache: strided
    k, v = cache[0, :, :, :s], cache[1, :, :, :s]
    mask = torch.zeros(1, 1, n, s, dtype=dtype)
    mask[..., prefix:] = torch.where(anc, 0.0, torch.finfo(dtype).min).to(dtype)
    out = own_attention(q, k, v, mask, 0.17)
    assert out.shape == (2, n, 6, d) and out.dtype == dtype
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double(), scale=0.17,
                                         enable_gqa=True).transpose(1, 2)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    for i in range(n):  # node i alone, over the prefix and its own path at consecutive positions
        keys = list(range(prefix)) + [prefix + j for j in range(n) if anc[i, j]]
        alone = own_attention(q[:, :, i:i + 1], k[:, :, keys], v[:, :, keys], None, 0.17)
        assert torch.equal(alone[:, 0], out[:, i]), (dtype, i)



@pytest.mark.parametrize("threads", [1, 2, 3])
def test_queries_computed_together_give_each_query_its_result_alone(threads):
    """The kernel computes a key/value head's queries (GQA heads x tree nodes) in tiles and splits them between
    threads by their number: whatever the tiling and split, each query's output is the one it gets alone."""
    g = torch.Generator().manual_seed(threads)
    s, d = 300, 64
    k, v = torch.randn(2, 1, 3, s, d, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for hq, n in ((9, 1), (9, 5), (3, 7), (12, 11)):
            q = torch.randn(1, hq, n, d, generator=g)
            out = own_attention(q, k, v, None, 0.125)
            for h in range(hq):
                for i in range(n):
                    alone = own_attention(q[:, h : h + 1, i : i + 1], k[:, (h * 3) // hq : (h * 3) // hq + 1],
                                          v[:, (h * 3) // hq : (h * 3) // hq + 1], None, 0.125)
                    assert torch.equal(alone[0, 0, 0], out[0, i, h]), (hq, n, h, i)
    finally:
        torch.set_num_threads(before)

def test_a_ragged_batch_mask_is_per_row():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 3, 32, generator=g)
    k, v = torch.randn(2, 2, 20, 32, generator=g), torch.randn(2, 2, 20, 32, generator=g)
    visible = torch.rand(2, 1, 3, 20, generator=g) > 0.4
    visible[..., 0] = True
    mask = torch.zeros(visible.shape).masked_fill_(~visible, torch.finfo(torch.float32).min)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(own_attention(q, k, v, mask, None), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_half_precision_speculation_equals_plain_decoding(arch, dtype):
    """In bf16 and fp16, with the row-invariant linear kernel and this attention, every drafter's output equals
    plain decoding token for token (SDPA's tree path rounds differently from its one-query path)."""
    model = tiny_model(arch, vocab_size=96, seed=5, dtype=dtype)
    g = torch.Generator().manual_seed(4)
    for i in range(3):
        ids = torch.randint(0, 96, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g)
        plain = specdec.generate(model, None, ids, drafter="none", max_new_tokens=24, size_trees=False).token_ids
        for drafter in (OracleDrafter(ids.numel(), plain), RandomDrafter(96, seed=i)):
            out = specdec.generate(model, None, ids, drafter=drafter, max_new_tokens=24, size_trees=False).token_ids
            assert out == plain, (arch, dtype, i, drafter.name)


def test_the_switch_and_the_fp32_default(monkeypatch):
    q = torch.zeros(1, 1, 1, 8)
    assert not own_attention_available(q)  # fp32: SDPA by default
    monkeypatch.setenv("SPECDEC_OWN_ATTENTION", "1")
    assert own_attention_available(q)
    monkeypatch.setenv("SPECDEC_OWN_ATTENTION", "0")
    assert not own_attention_available(q.bfloat16())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_branchy_tree_forward_gives_each_node_the_plain_steps_logits_bit_for_bit(dtype):
    """The whole forward, as the engine runs it (routing, row-invariant linear kernel, this attention): node i's
    logits in one tree forward equal those of plain steps along node i's path. This is what makes speculation
    lossless against plain decoding in half precision."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from specdec.kernels import ROW_BUCKETS, FastLinears, LinearPlan
    from specdec.runner import TreeRunner
    from specdec.tree import TokenTree

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).to(dtype).eval()
    plan = LinearPlan({b: "rows-avx512-half" for b in ROW_BUCKETS}, invariant=True)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 96, (45,), generator=g)
    parents = [-1, 0, 0, 1, 2, 3, 3, 5, 1, 8, 9, 4]
    tree = TokenTree(torch.randint(0, 96, (len(parents),), generator=g), parents)
    tree.tokens[0] = prompt[-1]
    with torch.inference_mode():
        runner = TreeRunner(model, fast=FastLinears(model, plan))
        runner.prefill(prompt[:-1])
        logits = runner.forward(tree).logits
        runner.close()
        for i in range(len(parents)):
            path, j = [], i
            while j >= 0:
                path.insert(0, j)
                j = parents[j]
            plain = TreeRunner(model, fast=FastLinears(model, plan))
            plain.prefill(prompt[:-1])
            for j in path:
                out = plain.forward(TokenTree(tree.tokens[j:j + 1], [-1])).logits
                plain.commit(plain.prefix_len, torch.tensor([0]))
            plain.close()
            assert torch.equal(out[0], logits[i]), (dtype, i)
