"""A trained drafter's own forwards on the CPU: Q8_0 linears (specdec.quant.quantize_linears) and EAGLE's native
draft layer (csrc/step.c: specdec_eagle_layer) compute what the torch modules compute from the same weights, and
drafting through them stays lossless."""

import copy

import pytest
import torch
from torch import nn

import specdec
from conftest import tiny_model
from specdec.drafters.eagle import EagleDrafter, EagleDrafterConfig, _Entries, _NativeLayer
from specdec.native import quant_linear_lib
from specdec.quant import decode_rows, dequantize_linears, q8_0_blocks, quantize_linears
from test_eagle import random_eagle

native = pytest.mark.skipif(quant_linear_lib() is None, reason="the native kernels need AVX-512 and a C compiler")


def q8_weight(w: torch.Tensor) -> torch.Tensor:
    """The fp32 weight the Q8_0 blocks of ``w`` decode to."""
    return torch.from_numpy(decode_rows(2, q8_0_blocks(w).numpy(), w.shape[1])).reshape(w.shape)


def test_q8_0_blocks_round_to_the_nearest_step_and_keep_exact_weights():
    torch.manual_seed(0)
    w = torch.randn(6, 64)
    back = q8_weight(w)
    step = (w.reshape(6, 2, 32).abs().amax(-1) / 127).repeat_interleave(32, -1)
    assert (back - w).abs().le(step * 0.5 + 1e-6).all()  # every weight within half a step of its block's grid
    assert not torch.equal(back, w)
    assert torch.equal(q8_weight(back), back)  # weights already on the grid come back bit for bit
    assert torch.equal(q8_weight(torch.zeros(2, 32)), torch.zeros(2, 32))  # an all-zero block (scale 0)
    with pytest.raises(ValueError, match="multiple of 32"):
        q8_0_blocks(torch.randn(2, 40))


@native
def test_quantized_linears_run_the_blocks_at_inference_only():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32, bias=True), nn.Linear(32, 40), nn.Linear(40, 8))
    x = torch.randn(3, 5, 64)
    exact = net(x)
    assert quantize_linears(net) == 3  # the 40-wide input is not a multiple of 32: it keeps its own forward
    with torch.no_grad():
        got = net(x)
        ref = copy.deepcopy(net)
        dequantize_linears(ref)
        for mod in list(ref)[:4]:
            if isinstance(mod, nn.Linear) and mod.in_features % 32 == 0:
                mod.weight.copy_(q8_weight(mod.weight))
        want = ref(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, exact, atol=1e-6)  # the blocks, not the fp32 weights, were multiplied
    y = net(x.requires_grad_())  # autograd: the module's own fp32 forward
    assert torch.allclose(y, exact) and y.requires_grad
    copied = copy.deepcopy(net)  # a copy quantizes its own weights
    with torch.no_grad():
        copied[0].weight.mul_(2)
        assert not torch.allclose(copied(x), got)
        net[0].weight.mul_(2)  # a changed weight is re-quantized at the next call
        assert torch.allclose(net(x), copied(x), atol=1e-5)
    fp32 = net(x.detach().requires_grad_()).detach()  # autograd runs the fp32 weights
    dequantize_linears(net)
    assert "forward" not in net[0].__dict__
    with torch.no_grad():
        assert torch.equal(net(x), fp32)


@native
def test_native_eagle_layer_computes_the_torch_layer(tiny_fp32):
    eagle = random_eagle(tiny_fp32, (1, 2), draft=48).float()
    with torch.no_grad():
        for mod in eagle.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(q8_weight(mod.weight))  # both paths multiply the same weights
    layer = _NativeLayer.of(eagle)
    assert layer is not None
    runs = []
    for use in (layer, None):
        d = EagleDrafter(eagle)
        d.entries, d._native = _Entries(), use
        torch.manual_seed(1)
        s, tok = torch.randn(5, 32), torch.randint(0, 96, (5,))
        h, first = d._layer(s, tok, torch.arange(5), 0, 0, torch.ones(5, 5, dtype=torch.bool).tril(), 1)
        vis = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)  # a small tree
        h2, deeper = d._layer(torch.randn(4, 32), torch.randint(0, 96, (4,)), torch.tensor([5, 6, 6, 7]), 5, 5, vis, 4)
        runs.append((h, first, h2, deeper, d.entries.k[:, :, :9].clone(), d.entries.v[:, :, :9].clone()))
    for got, want in zip(*runs):
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_fp32(request):
    return tiny_model(request.param, dtype=torch.float32)


@native
@pytest.mark.parametrize("fused", [False, True])
def test_eagle_through_the_native_layer_equals_plain_decoding(tiny_fp32, fused):
    drafter = EagleDrafter(random_eagle(tiny_fp32, (1, 0, 2), draft=48), EagleDrafterConfig(depth=4, beam=4, topk=3))
    spec = drafter
    if fused:
        from specdec.drafters.fused import FusedDrafter
        from specdec.drafters.prompt_lookup import PromptLookupDrafter

        spec = FusedDrafter([PromptLookupDrafter(), drafter])
    torch.manual_seed(3)
    prompts = [torch.randint(1, 96, (n,)) for n in (3, 9, 17)]
    for p in prompts:
        want = specdec.generate(tiny_fp32, None, p, drafter="none", max_new_tokens=24, size_trees=False).token_ids
        got = specdec.generate(tiny_fp32, None, p, drafter=spec, max_new_tokens=24, size_trees=False)
        assert got.token_ids == want
        assert got.stats.drafted_tokens > 0
    assert drafter.precision == "q8_0" and drafter._native is not None  # the native path is what ran
    batch = specdec.generate(tiny_fp32, None, prompts, drafter=spec, max_new_tokens=16, size_trees=False)
    assert [r.token_ids for r in batch] == [specdec.generate(tiny_fp32, None, p, drafter="none", max_new_tokens=16).token_ids
                                            for p in prompts]


@native
def test_a_rebound_eagle_drafter_keeps_its_native_layer_until_its_weights_change(tiny_fp32):
    from specdec.drafters.base import Target

    drafter = EagleDrafter(random_eagle(tiny_fp32, (1, 2), draft=48))
    drafter.bind(Target.of(tiny_fp32))
    first = drafter._native
    drafter.bind(Target.of(tiny_fp32))
    assert first is not None and drafter._native is first  # the blocks are built once
    with torch.no_grad():
        drafter.model.q_proj.weight.mul_(2)
    drafter.bind(Target.of(tiny_fp32))
    assert drafter._native is not None and drafter._native is not first
