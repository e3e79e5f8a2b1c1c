"""The fused RMSNorm and rotary embedding of the engine's fp32 forwards (specdec/fastops.py, csrc/ops.c)."""

import sys

import pytest
import torch
from torch import nn

import specdec
from conftest import tiny_model
from specdec.fastops import FastOps, ops_lib

pytestmark = pytest.mark.skipif(ops_lib() is None, reason="the native ops need x86-64 with AVX-512 and a C compiler")


def _norms(model):
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_fused_norm_matches_hf_and_is_row_invariant(arch):
    model = tiny_model(arch, dtype=torch.float32)
    ops = FastOps(model)
    assert len(ops._norms) == len(_norms(model)) > 0
    mod, fwd = ops._norms[0]
    with torch.no_grad():
        mod.weight.copy_(torch.randn_like(mod.weight))
    x = torch.randn(64, mod.weight.shape[0]) * 3
    full = fwd(x)
    torch.testing.assert_close(full, type(mod).forward(mod, x), rtol=2e-6, atol=2e-6)
    for rows in (1, 2, 5, 17, 63):  # each row's bits do not depend on how many rows share the call
        assert torch.equal(fwd(x[-rows:]), full[-rows:]), rows
    assert torch.equal(fwd(x[None, :3]), full[:3][None])  # any leading shape
    xg = x[:2].clone().requires_grad_()  # under autograd: torch's ops, so gradients flow
    fwd(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_fused_rotary_embedding_is_bit_identical_to_hf(arch):
    model = tiny_model(arch, dtype=torch.float32)
    ops = FastOps(model)
    (module, theirs, ours), = ops._rotary
    attn = next(m for m in model.modules() if type(m).__name__.endswith("Attention"))
    d, hq, hk = attn.head_dim, model.config.num_attention_heads, model.config.num_key_value_heads
    g = torch.Generator().manual_seed(3)
    for b, t in ((1, 1), (3, 7), (1, 40)):
        q = torch.randn(b, t, hq, d, generator=g).transpose(1, 2) * 10  # the attention's layout: transposed views
        k = torch.randn(b, t, hk, d, generator=g).transpose(1, 2) * 10
        angles = torch.randn(b, t, d, generator=g) * 50
        cos, sin = angles.cos(), angles.sin()
        for a, r in zip(ours(q, k, cos, sin), theirs(q, k, cos, sin)):
            assert torch.equal(a, r), (b, t)
    kw = ours(q, k, cos, sin, unsqueeze_dim=1)  # an explicit setting or another signature: the model's own
    assert all(torch.equal(a, r) for a, r in zip(kw, theirs(q, k, cos, sin)))
    q64 = torch.randn(1, hq, 2, d, dtype=torch.float64)  # what it does not serve goes to the model's own
    k64 = torch.randn(1, hk, 2, d, dtype=torch.float64)
    c64 = torch.randn(1, 2, d, dtype=torch.float64)
    assert all(torch.equal(a, r) for a, r in zip(ours(q64, k64, c64, c64), theirs(q64, k64, c64, c64)))
    qg = q.detach().requires_grad_()  # under autograd (a drafter training through the target's layers): torch's ops
    out, _ = ours(qg, k, cos, sin)
    out.sum().backward()
    assert qg.grad is not None and qg.grad.abs().sum() > 0


def test_ops_are_switched_in_only_inside_the_scope_and_restored_on_errors():
    model = tiny_model("llama", dtype=torch.float32)
    ops = FastOps(model)
    module = sys.modules[type(next(m for m in model.modules() if type(m).__name__.endswith("Attention"))).__module__]
    theirs = module.apply_rotary_pos_emb
    with pytest.raises(RuntimeError, match="boom"):
        with ops.scope():
            assert module.apply_rotary_pos_emb is not theirs
            assert all("forward" in m.__dict__ for m in _norms(model))
            raise RuntimeError("boom")
    assert module.apply_rotary_pos_emb is theirs
    assert not any("forward" in m.__dict__ for m in _norms(model))
    assert not FastOps(tiny_model("llama")).active  # float64: nothing applies


def test_a_norm_that_is_not_hfs_is_left_alone():
    class OffsetRMSNorm(nn.Module):  # Gemma's convention: (1 + weight)
        def __init__(self, h):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(h))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    model = tiny_model("llama", dtype=torch.float32)
    model.model.norm = OffsetRMSNorm(model.config.hidden_size)
    ops = FastOps(model)
    assert model.model.norm not in [m for m, _ in ops._norms] and len(ops._norms) == len(_norms(model)) - 1


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_speculative_greedy_through_the_fused_ops_equals_plain_decoding(arch, monkeypatch):
    """fp32 with the fast path: the ops run (counted), and every drafter's output equals plain decoding's."""
    model = tiny_model(arch, dtype=torch.float32, vocab_size=64)
    calls = {"rotary": 0}
    lib = ops_lib()
    real = lib.specdec_rotary

    class Counting:
        argtypes, restype = real.argtypes, real.restype

        def __call__(self, *args):
            calls["rotary"] += 1
            return real(*args)

    monkeypatch.setattr(lib, "specdec_rotary", Counting())
    g = torch.Generator().manual_seed(5)
    base = torch.randint(0, 64, (6,), generator=g)
    prompts = [torch.cat([base, base, torch.randint(0, 64, (3,), generator=g)]), torch.randint(0, 64, (11,), generator=g)]
    for p in prompts:
        plain = specdec.generate(model, None, p, drafter="none", max_new_tokens=20, fast=True).token_ids
        for spec in ("prompt-lookup", "suffix"):
            assert specdec.generate(model, None, p, drafter=spec, max_new_tokens=20, fast=True).token_ids == plain, spec
    assert calls["rotary"] > 0
