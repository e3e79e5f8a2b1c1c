"""The fast linear kernels: same products as F.linear, routed only inside the scope, batch-invariant where measured."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specdec.kernels import KERNELS, ROW_BUCKETS, FastLinears, LinearPlan, candidate_kernels, fast_linears, measure_plan


def small_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.SiLU(), nn.Linear(40, 24, bias=False), nn.Linear(24, 96)).to(dtype).eval()


def plan_of(name):
    return LinearPlan({b: name for b in ROW_BUCKETS})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_computes_the_linear_product(dtype):
    model = small_model(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    names = candidate_kernels(model[0].weight)
    assert "torch" in names
    for name in names:
        fast = FastLinears(model, plan_of(name))
        for rows in (1, 3, 8, 65):  # 65: past the last bucket, F.linear
            x = torch.randn(1, rows, 24).to(dtype)
            with torch.inference_mode():
                ref = model(x)
                with fast.scope():
                    out = model(x)
            assert out.shape == ref.shape and out.dtype == dtype, name
            torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item(), msg=name)


def test_the_scope_routes_only_inside_and_restores_on_errors():
    model = small_model()
    fast = FastLinears(model, plan_of("wxt"))
    assert fast.active
    with pytest.raises(RuntimeError, match="boom"):
        with fast.scope():
            assert all("forward" in m.__dict__ for m in model if isinstance(m, nn.Linear))
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model)
    assert not FastLinears(model, plan_of("torch")).active  # a plan of model kernels patches nothing


def test_prepared_kernels_follow_in_place_weight_changes():
    """Packed copies are reused while the weights are unchanged and rebuilt after an in-place update."""
    model = small_model()
    name = "mkl-packed" if "mkl-packed" in candidate_kernels(model[0].weight) else "wxt"
    first = fast_linears(model, plan_of(name))
    assert fast_linears(model, plan_of(name)) is first
    with torch.no_grad():
        model[3].weight.mul_(2.0)
    second = fast_linears(model, plan_of(name))
    assert second is not first
    x = torch.randn(4, 24)
    with torch.inference_mode(), second.scope():
        out = model(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_measured_plan_is_valid_and_prefers_one_invariant_kernel():
    model = small_model()
    plan = measure_plan(model, repeats=1)
    assert set(plan.kernels) == set(ROW_BUCKETS) and set(plan.kernels.values()) <= set(KERNELS)
    if plan.invariant:
        assert len(set(plan.kernels.values())) == 1
        kernel = KERNELS[plan.kernels[1]]
        w = model[3].weight
        state = kernel.prepare(w, model[3].bias)
        x = torch.randn(16, 24)
        alone = torch.cat([kernel.run(x[i : i + 1], w, model[3].bias, state, 1) for i in range(16)])
        assert torch.equal(kernel.run(x, w, model[3].bias, state, 16), alone)
    assert plan.for_rows(3) == plan.kernels[4] and plan.for_rows(1000) == "torch"


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this torch build has no MKL")
def test_the_row_invariance_probe_sees_what_a_direct_check_sees():
    """Whether MKL's packed GEMM gives a row the same bits alone and among others depends on the host (it does
    on the Xeons seen so far, not on AMD Zen 2/5), so the plan measures it instead of assuming it: the probe the
    plan uses must agree with a direct check over the same row counts."""
    from specdec.kernels import _row_invariant

    torch.manual_seed(3)
    w = torch.randn(300, 64)
    kernel = KERNELS["mkl-packed"]
    state = kernel.prepare(w, None)
    g = torch.Generator().manual_seed(7)  # the probe's own inputs
    x = torch.randn(64, 64, generator=g)
    alone = torch.cat([kernel.run(x[i : i + 1], w, None, state, 1) for i in range(64)])
    buckets = (1, 2, 5, 8, 17, 64)
    direct = all(torch.equal(kernel.run(x[:rows], w, None, state, rows), alone[:rows]) for rows in buckets)
    assert _row_invariant(kernel, w, None, state, buckets) == direct
    torch.testing.assert_close(alone, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_unknown_kernel_names_are_rejected():
    with pytest.raises(ValueError, match="unknown linear kernels"):
        LinearPlan({1: "nope"})


def test_own_small_row_kernel_is_exact_row_invariant_or_says_why_it_is_off(monkeypatch):
    """specdec's AVX-512 kernel: the same product as F.linear for any shape (tails in K and N, bias or not),
    each row bit-identical alone or among up to 64 others; where it cannot run, the reason is stated and the
    kernel is not offered."""
    from specdec import native

    kernel = KERNELS["rows-avx512"]
    if native.rows_linear_lib() is None:
        assert native.unavailable_reason() and not kernel.supports(torch.randn(4, 4))
        return
    assert "rows-avx512" in candidate_kernels(torch.randn(8, 8)) and not kernel.supports(torch.randn(8, 8).bfloat16())
    g = torch.Generator().manual_seed(5)
    for n, k, bias in ((7, 33, True), (300, 64, False), (49, 17, True), (5, 1, False)):
        w = torch.randn(n, k, generator=g)
        b = torch.randn(n, generator=g) if bias else None
        state = kernel.prepare(w, b)
        x = torch.randn(64, k, generator=g)
        alone = torch.cat([kernel.run(x[i : i + 1], w, b, state, 1) for i in range(64)])
        torch.testing.assert_close(alone, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        for rows in (2, 3, 5, 6, 7, 12, 13, 64):
            assert torch.equal(kernel.run(x[:rows], w, b, state, rows), alone[:rows]), (n, k, rows)
    view = torch.randn(3, 10, 40, generator=g)[:, 2:4]  # a non-contiguous [.., rows, K] input
    w = torch.randn(9, 40, generator=g)
    out = kernel.run(view, w, None, kernel.prepare(w, None), 6)
    torch.testing.assert_close(out, F.linear(view, w), rtol=1e-5, atol=1e-5)
    # switched off: not offered, and the reason says how it was switched off
    native.rows_linear_lib.cache_clear()
    monkeypatch.setenv("SPECDEC_NATIVE", "0")
    try:
        assert native.rows_linear_lib() is None and "SPECDEC_NATIVE=0" in native.unavailable_reason()
    finally:
        native.rows_linear_lib.cache_clear()
        monkeypatch.delenv("SPECDEC_NATIVE")
        native.rows_linear_lib()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_own_half_precision_kernel_is_exact_in_fp32_and_row_invariant(dtype):
    """bf16/fp16 weights and inputs: the product of their exact fp32 widenings, summed in fp32 and rounded once to
    the dtype, bit-identical per row for any row count (tails in K and N); the plan measured in these dtypes keeps
    an invariant kernel whatever its price."""
    from specdec import native

    kernel = KERNELS["rows-avx512-half"]
    if native.rows_half_lib() is None:
        assert native.unavailable_reason() and not kernel.supports(torch.randn(4, 4).to(dtype))
        return
    assert kernel.supports(torch.randn(8, 8).to(dtype)) and not kernel.supports(torch.randn(8, 8))
    g = torch.Generator().manual_seed(9)
    for n, k, bias in ((7, 33, True), (300, 64, False), (49, 17, True), (6, 576, False)):
        w = torch.randn(n, k, generator=g).to(dtype)
        b = torch.randn(n, generator=g).to(dtype) if bias else None
        state = kernel.prepare(w, b)
        x = torch.randn(64, k, generator=g).to(dtype)
        alone = torch.cat([kernel.run(x[i : i + 1], w, b, state, 1) for i in range(64)])
        assert alone.dtype == dtype
        ref = F.linear(x.double(), w.double(), None if b is None else b.double())
        torch.testing.assert_close(alone.double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
        for rows in (2, 3, 5, 6, 7, 12, 13, 64):
            assert torch.equal(kernel.run(x[:rows], w, b, state, rows), alone[:rows]), (dtype, n, k, rows)
    plan = measure_plan(small_model(dtype), repeats=1)
    assert plan.invariant and len(set(plan.kernels.values())) == 1
