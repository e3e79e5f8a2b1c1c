"""The Triton kernel against a float64 reference: interpreted on the CPU (TRITON_INTERPRET=1, set in conftest),
for real on a CUDA GPU (benchmarks/gpu_check.sh)."""

import math

import pytest
import torch

from specdec.tree import TokenTree
from specdec.tree_attention import tree_attention, tree_mask
from specdec.tree_attention.triton_kernel import pack_ancestor_mask, tree_attention_triton


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernel(q, k, v, anc):
    """The Triton kernel on the test device; the result comes back to the CPU for comparison."""
    return tree_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), anc.to(DEVICE)).cpu()


def reference64(q, k, v, anc):
    """Plain float64 softmax attention with the dense tree mask."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~tree_mask(k.shape[2] - q.shape[2], anc), float("-inf"))
    return torch.softmax(s, -1) @ v


def random_tree(n, kind, g):
    if kind == "chain":
        parents = torch.arange(-1, n - 1)
    elif kind == "star":
        parents = torch.zeros(n, dtype=torch.long)
        parents[0] = -1
    else:
        parents = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)])
    return TokenTree(torch.zeros(n, dtype=torch.long), parents).ancestor_mask


CASES = [  # (B, Hq, Hkv, P, N, D, tree)
    (1, 2, 2, 0, 1, 64, "chain"),
    (1, 4, 1, 0, 7, 64, "random"),
    (2, 4, 4, 5, 1, 64, "chain"),
    (1, 8, 2, 33, 17, 64, "random"),
    (1, 8, 1, 40, 9, 128, "star"),
    (2, 4, 4, 64, 33, 32, "chain"),
    (1, 2, 2, 3, 70, 16, "random"),
    (1, 1, 1, 8, 256, 16, "random"),  # the largest tree the contract promises
]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-P{}-N{}-D{}-{}".format(*c))
def test_kernel_matches_float64_reference(case, dtype, tol):
    b, hq, hkv, p, n, d, kind = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    q = torch.randn(b, hq, n, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, p + n, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, p + n, d, generator=g).to(dtype)
    anc = random_tree(n, kind, g)
    out = kernel(q, k, v, anc)
    assert out.dtype == dtype and out.shape == q.shape
    ref = reference64(q, k, v, anc)
    err = (out.double() - ref).norm() / ref.norm()
    assert err < tol, f"relative error {err:.2e}"


def test_every_output_element_is_written():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 11, 32, generator=g) for _ in range(3))
    k, v = torch.randn(1, 2, 20, 32, generator=g), torch.randn(1, 2, 20, 32, generator=g)
    anc = random_tree(11, "random", g)
    out = torch.full_like(q, float("nan"))
    out.copy_(kernel(q, k, v, anc))
    assert not out.isnan().any()


def test_each_branch_equals_causal_attention_over_its_own_path():
    g = torch.Generator().manual_seed(2)
    p, n, d = 6, 9, 32
    anc = random_tree(n, "random", g)
    tree = TokenTree(torch.zeros(n, dtype=torch.long), torch.tensor([-1] + [int(torch.nonzero(anc[i]).flatten()[-2]) for i in range(1, n)]))
    q = torch.randn(1, 2, n, d, generator=g)
    k, v = torch.randn(1, 2, p + n, d, generator=g), torch.randn(1, 2, p + n, d, generator=g)
    out = kernel(q, k, v, tree.ancestor_mask)
    for node in range(n):
        path = tree.path_to(node)
        cols = torch.cat([torch.arange(p), p + path])
        causal = torch.softmax(q[:, :, node : node + 1] @ k[:, :, cols].transpose(-1, -2) / math.sqrt(d), -1) @ v[:, :, cols]
        torch.testing.assert_close(out[:, :, node : node + 1], causal, rtol=1e-5, atol=1e-5)


def test_packing_worked_example_and_high_bits():
    chain = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    assert pack_ancestor_mask(chain).flatten().tolist() == [1, 3, 7]
    big = torch.tril(torch.ones(40, 40, dtype=torch.bool))
    packed = pack_ancestor_mask(big)
    assert packed.shape == (40, 2) and packed[31, 0] == -1 and packed[39, 1] == 255


def test_torch_backend_and_dispatch():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 5, 16, generator=g)
    k, v = torch.randn(1, 2, 12, 16, generator=g), torch.randn(1, 2, 12, 16, generator=g)
    anc = random_tree(5, "random", g)
    ref = reference64(q, k, v, anc).float()
    torch.testing.assert_close(tree_attention(q, k, v, anc, backend="torch"), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tree_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), anc.to(DEVICE), backend="triton").cpu(),
                               ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        tree_attention(q, k, v, anc, backend="cuda")


@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2)])
def test_ragged_batch_matches_float64_reference_row_by_row(hq, hkv):
    """Rows with different prefixes and different trees in one call: each row equals its own single-row attention."""
    g = torch.Generator().manual_seed(7)
    prefixes, n, d = [3, 17, 0], 9, 32
    total = max(prefixes) + n + 2  # keys past each row's tree are garbage the kernel must not read
    q = torch.randn(3, hq, n, d, generator=g)
    k = torch.randn(3, hkv, total, d, generator=g)
    v = torch.randn(3, hkv, total, d, generator=g)
    anc = torch.stack([random_tree(n, kind, g) for kind in ("random", "chain", "star")])
    p = torch.tensor(prefixes)
    out = tree_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), anc.to(DEVICE), prefix_lens=p.to(DEVICE)).cpu()
    from specdec.tree_attention.reference import tree_attention_torch

    torch_out = tree_attention_torch(q, k, v, anc, prefix_lens=p)
    for b, pb in enumerate(prefixes):
        cut = slice(0, pb + n)
        ref = reference64(q[b : b + 1], k[b : b + 1, :, cut], v[b : b + 1, :, cut], anc[b])
        assert ((out[b : b + 1].double() - ref).norm() / ref.norm()) < 1e-5
        torch.testing.assert_close(torch_out[b : b + 1].double(), ref, rtol=1e-5, atol=1e-5)
