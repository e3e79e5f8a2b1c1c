"""GGUF weights at their own precision: the quantized kernel against the dequantized product, row invariance,
the per-tensor fallback, and greedy equality on a tiny GGUF written here."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")

from specdec import native  # noqa: E402
from specdec.kernels import KERNELS, ROW_BUCKETS, FastLinears, LinearPlan  # noqa: E402
from specdec.lean import LeanForward  # noqa: E402
from specdec.quant import FORMATS, QuantWeight, _blocks_for, attach_gguf, decode_rows, quant_of, quant_summary  # noqa: E402

from conftest import tiny_model  # noqa: E402
from drafters_for_tests import OracleDrafter, RandomDrafter  # noqa: E402

T = gguf.GGMLQuantizationType
KERNEL = KERNELS["gguf-avx512"]


def _random_raw(kind: str, n: int, k: int, seed: int) -> np.ndarray:
    """A weight's raw GGUF blocks: quantized by the gguf package where it can, else random bytes with sane scales."""
    rng = np.random.default_rng(seed)
    if kind in ("Q4_0", "Q4_1", "Q8_0"):
        return gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, T[kind])
    size, scale_at = {"Q4_K": (144, (0, 2)), "Q6_K": (210, (208,))}[kind]
    raw = rng.integers(0, 256, size=(n * k // 256, size), dtype=np.uint8)
    for at in scale_at:  # finite fp16 scales (random bytes could be NaN or huge)
        raw[:, at:at + 2] = np.frombuffer((rng.random(raw.shape[0]) * 0.01).astype(np.float16).tobytes(), np.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


class _Tensor:  # what _blocks_for reads of a gguf ReaderTensor
    def __init__(self, kind, data):
        self.tensor_type, self.data = T[kind], data


def _quant_weight(kind, n, k, seed=0):
    raw = _random_raw(kind, n, k, seed)
    got = _blocks_for(_Tensor(kind, raw), n, k)
    assert isinstance(got, tuple), got
    fmt, rows = got
    dense = gguf.quants.dequantize(raw, T[kind]).reshape(n, k)
    weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(dense)), requires_grad=False)
    weight._specdec_quant = QuantWeight(kind, fmt, torch.from_numpy(np.ascontiguousarray(rows).copy()), n, k, weight._version,
                                        weight.data_ptr())
    return weight, rows, fmt, dense


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_blocks_decode_to_the_reference_dequantization_exactly(kind):
    """specdec's reading of each format (the one the kernel implements) equals the gguf package's dequantizer bit for
    bit, K-quant repacking included."""
    n, k = 6, 512
    _, rows, fmt, dense = _quant_weight(kind, n, k, seed=3)
    assert np.array_equal(decode_rows(fmt, rows, k), dense)


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_quantized_kernel_equals_the_dequantized_product_and_is_row_invariant(kind):
    if native.quant_linear_lib() is None:
        assert native.unavailable_reason()
        pytest.skip(f"the quantized kernel is not available here: {native.unavailable_reason()}")
    g = torch.Generator().manual_seed(1)
    for n, k, with_bias in ((7, 256, True), (37, 512, False), (5, 768, True)):  # N not a multiple of the 4-row block
        weight, _, _, dense = _quant_weight(kind, n, k, seed=n)
        bias = torch.randn(n, generator=g) if with_bias else None
        assert KERNEL.supports(weight)
        state = KERNEL.prepare(weight, bias)
        x = torch.randn(64, k, generator=g)
        ref = F.linear(x.double(), torch.from_numpy(dense).double(), None if bias is None else bias.double()).float()
        alone = torch.cat([KERNEL.run(x[i:i + 1], weight, bias, state, 1) for i in range(64)])
        torch.testing.assert_close(alone, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        for rows in (2, 3, 4, 5, 7, 8, 13, 16, 33, 64):  # row groups of 4 with every tail
            assert torch.equal(KERNEL.run(x[:rows], weight, bias, state, rows), alone[:rows]), (kind, n, k, rows)


def test_a_weight_changed_in_place_or_replaced_drops_its_blocks():
    weight, *_ = _quant_weight("Q8_0", 4, 64)
    assert quant_of(weight) is not None
    with torch.no_grad():
        weight.mul_(2)
    assert quant_of(weight) is None
    weight, *_ = _quant_weight("Q8_0", 4, 64)
    weight.data = weight.data.bfloat16().float()  # what model.to(dtype) and back does to a Parameter
    assert quant_of(weight) is None


def test_shapes_and_types_the_kernel_cannot_read_say_why():
    assert "not a type" in _blocks_for(_Tensor("F16", np.zeros((4, 64), np.float16)), 4, 64)
    assert "whole Q4_K blocks" in _blocks_for(_Tensor("Q4_K", np.zeros((4, 72), np.uint8)), 4, 128)


# --------------------------------------------------------------------------- a tiny GGUF model
LAYOUT = {  # HF projection -> GGUF type (K-quants need 256 inputs: hidden 256, intermediate 512)
    "q_proj": "Q4_0", "k_proj": "Q4_1", "v_proj": "Q8_0", "o_proj": "Q6_K",
    "gate_proj": "Q4_K", "up_proj": "Q4_1", "down_proj": "Q6_K",
}


def _write_tiny_gguf(arch: str, path, unsupported_head: bool):
    """A tiny random model of ``arch`` written as a GGUF (mixed block types; Llama's Q/K rows permuted as the
    llama.cpp converter does), and the HF model holding exactly the weights a GGUF loader gives."""
    model = tiny_model(arch, vocab_size=96, seed=11, dtype=torch.float32)
    cfg = model.config
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 256, 512, 64
    model = type(model)(cfg).float().eval()
    model.generation_config.eos_token_id = None
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                     cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            kind = "F16" if name == "lm_head" else LAYOUT[name.rsplit(".", 1)[-1]]
            n, k = mod.weight.shape
            w = (rng.standard_normal((n, k)) * 0.08).astype(np.float32)
            heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(name.rsplit(".", 1)[-1])
            if arch == "llama" and heads:  # the converter's rotary interleave
                w_file = w.reshape(heads, 2, n // heads // 2, k).swapaxes(1, 2).reshape(n, k)
            else:
                w_file = w
            if kind == "F16":
                raw = w_file.astype(np.float16) if unsupported_head else gguf.quants.quantize(w_file, T.Q8_0)
                kind = "F16" if unsupported_head else "Q8_0"
            elif kind in ("Q4_K", "Q6_K"):
                raw = _random_raw(kind, n, k, seed=n + k)
            else:
                raw = gguf.quants.quantize(w_file, T[kind])
            dense_file = gguf.quants.dequantize(raw, T[kind]).reshape(n, k) if kind != "F16" else raw.astype(np.float32)
            if arch == "llama" and heads:  # what the HF loader does on reading: undo the interleave
                dense = dense_file.reshape(heads, n // heads // 2, 2, k).swapaxes(1, 2).reshape(n, k)
            else:
                dense = dense_file
            mod.weight.copy_(torch.from_numpy(np.ascontiguousarray(dense)))
            gname = "output.weight" if name == "lm_head" else names.get_name(name) + ".weight"
            writer.add_tensor(gname, raw, raw_dtype=T[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(params=["llama", "qwen2"])
def tiny_gguf(request, tmp_path):
    path = tmp_path / f"tiny-{request.param}.gguf"
    model = _write_tiny_gguf(request.param, path, unsupported_head=True)
    return model, path


def test_attach_keeps_each_layers_blocks_and_falls_back_for_an_unsupported_tensor(tiny_gguf, caplog):
    model, path = tiny_gguf
    with caplog.at_level(logging.WARNING, logger="specdec"):
        summary = attach_gguf(model, path)
    assert summary == {"Q4_0": 2, "Q4_1": 4, "Q4_K": 2, "Q6_K": 4, "Q8_0": 2, "fp32": 1}
    assert quant_of(model.lm_head.weight) is None
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "F16" in said[0] and "lm_head" in said[0]  # said once, naming the type and a layer
    assert quant_summary(tiny_model("llama", dtype=torch.float32)) == {}  # not a GGUF model: nothing attached


def test_greedy_on_a_tiny_gguf_equals_plain_decoding_through_the_quantized_kernel(tiny_gguf, monkeypatch):
    """Speculative decoding through the quantized kernel (one Q/K permuted, five block types, one F16 tensor on
    the fp32 fallback) equals plain decoding token for token, and plain decoding equals the model's own fp32
    forward up to summation order."""
    if native.quant_linear_lib() is None:
        pytest.skip(f"the quantized kernel is not available here: {native.unavailable_reason()}")
    import specdec
    from specdec import profile

    model, path = tiny_gguf
    attach_gguf(model, path)
    plan = LinearPlan({b: "gguf-avx512" for b in ROW_BUCKETS}, invariant=True)
    monkeypatch.setattr(profile, "measure_plan", lambda *a, **k: plan)
    calls, run, lean_forward = [], type(KERNEL).run, LeanForward.forward
    monkeypatch.setattr(type(KERNEL), "run", lambda self, *a: calls.append(a[-1]) or run(self, *a))
    # where the lean native forward applies it runs the decode forwards, from the same blocks (specdec/lean.py)
    monkeypatch.setattr(LeanForward, "forward", lambda self, cache, tokens, *a, **k: calls.append(tokens.numel())
                        or lean_forward(self, cache, tokens, *a, **k))
    fast = FastLinears(model, plan)
    x = torch.randint(0, 96, (1, 9))
    with torch.inference_mode():
        ref = model(x).logits
        with fast.scope():
            got = model(x).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    g = torch.Generator().manual_seed(2)
    for i in range(3):
        ids = torch.randint(0, 96, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g)
        plain = specdec.generate(model, None, ids, drafter="none", max_new_tokens=20, size_trees=False)
        for drafter in (OracleDrafter(ids.numel(), plain.token_ids), RandomDrafter(96, seed=i), "prompt-lookup"):
            out = specdec.generate(model, None, ids, drafter=drafter, max_new_tokens=20, size_trees=False)
            assert out.token_ids == plain.token_ids, (i, drafter)
    assert 1 in calls and max(calls) > 1  # plain steps and tree forwards both ran through the quantized kernel
    # a prompt longer than the kernels' row table is prefilled in pieces the kernel runs: no forward falls back to
    # F.linear over the dequantized weights
    from types import SimpleNamespace

    from specdec import kernels

    dense = []
    monkeypatch.setattr(kernels, "F", SimpleNamespace(linear=lambda x, w, b=None: dense.append(x.shape) or F.linear(x, w, b)))
    long = torch.randint(0, 96, (150,), generator=g)
    calls.clear()
    plain = specdec.generate(model, None, long, drafter="none", max_new_tokens=8, size_trees=False)
    assert dense == [] and max(calls) == max(ROW_BUCKETS)
    assert specdec.generate(model, None, long, drafter="prompt-lookup", max_new_tokens=8, size_trees=False).token_ids == plain.token_ids
