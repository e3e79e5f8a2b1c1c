"""A GGUF model's linear weights kept at their own precision, for specdec's quantized kernel.

:func:`attach_gguf` is called by :func:`specdec.load_model` on a ``.gguf``
file (fp32, CPU): for every ``nn.Linear`` of the loaded HF model it finds the
GGUF tensor the weight came from and keeps that tensor's blocks beside the
weight (on the weight ``Parameter`` itself, as ``_specdec_quant``). Inside the
engine's own forwards, the ``gguf-avx512`` kernel of :mod:`specdec.kernels`
multiplies those blocks directly (``csrc/quant.c``), decoding them in
registers; the model itself, and HF ``generate`` on it, still run the
dequantized fp32 weights.

Formats: Q4_0, Q4_1 and Q8_0 are used as they are in the file (the kernel
reads the GGUF's own blocks); Q4_K and Q6_K are repacked once, at load, into
32-weight blocks with fp32 scales (6 and 10 bits a weight instead of 4.5 and
6.6: simpler to decode, a little more to read; a native K-quant decode is
future work). Any other type (F16, Q5_K, ...) falls back to the fp32 kernel
for that tensor, said once on stderr.

Exactness is checked, not assumed: the blocks kept for a weight are decoded
here in numpy on a sample of rows and must equal the model's fp32 weight
bit for bit (the row order included: llama-family GGUFs store Q and K with
their rows permuted for rotary, and the matching permutation is found by
that check); a tensor that fails the check falls back too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["QuantWeight", "attach_gguf", "quant_of", "quant_summary", "decode_rows", "FORMATS", "q8_0_blocks", "quantize_linears",
           "dequantize_linears"]

log = logging.getLogger("specdec")

# kernel format ids (csrc/quant.c) and the bytes one 32-weight chunk of a row takes
FORMATS = {"Q4_0": (0, 18), "Q4_1": (1, 20), "Q8_0": (2, 34), "Q4_K": (3, 24), "Q6_K": (4, 40)}
_FMT_BYTES = {fid: nbytes for fid, nbytes in FORMATS.values()}
_SAMPLE_ROWS = 16


@dataclass
class QuantWeight:
    """One linear weight's blocks: ``blocks`` is uint8 ``[N, K/32 * chunk bytes]`` in kernel format ``fmt``."""

    gguf_type: str
    fmt: int
    blocks: torch.Tensor
    n: int
    k: int
    version: int  # the weight's in-place version when attached: a later change makes the blocks stale
    ptr: int = 0  # the weight's storage when attached: ``.data = ...`` (e.g. ``model.to(dtype)``) swaps it

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()


@dataclass
class _Fallback:
    gguf_type: str
    reason: str
    version: int


def quant_of(weight: torch.Tensor) -> QuantWeight | None:
    """The quantized blocks kept for ``weight``, or None (none kept, or the weight changed since)."""
    q = getattr(weight, "_specdec_quant", None)
    if isinstance(q, QuantWeight) and q.version == weight._version and q.ptr == weight.data_ptr():
        return q
    return None


def from_gguf(weight: torch.Tensor) -> bool:
    """Whether ``weight`` belongs to a model loaded from a GGUF (blocks kept, or a recorded fallback)."""
    return hasattr(weight, "_specdec_quant")


def quant_summary(model) -> dict[str, int]:
    """``{gguf type: number of linear layers}`` run from blocks; ``{"fp32": n}`` counts fallbacks. Empty for a model
    not loaded from a GGUF."""
    out: dict[str, int] = {}
    for mod in model.modules() if isinstance(model, nn.Module) else ():
        if isinstance(mod, nn.Linear) and from_gguf(mod.weight):
            q = quant_of(mod.weight)
            name = q.gguf_type if q is not None else "fp32"
            out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- decoding (numpy, for the checks)
def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _f32(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float32)


def _nibbles(raw: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] values: the low nibbles are weights 0-15, the high ones 16-31."""
    return np.concatenate([raw & 0x0F, raw >> 4], axis=-1).astype(np.float32)


def decode_rows(fmt: int, rows: np.ndarray, k: int) -> np.ndarray:
    """Decode rows of kernel-format blocks (uint8 ``[R, row bytes]``) to fp32 ``[R, k]``, as the kernel does."""
    r = rows.shape[0]
    c = rows.reshape(r, k // 32, _FMT_BYTES[fmt])
    if fmt == 0:
        d = _f16(c[..., 0:2])
        w = _nibbles(c[..., 2:18]) * d + (np.float32(-8.0) * d)
    elif fmt == 1:
        w = _nibbles(c[..., 4:20]) * _f16(c[..., 0:2]) + _f16(c[..., 2:4])
    elif fmt == 2:
        w = c[..., 2:34].view(np.int8).astype(np.float32) * _f16(c[..., 0:2])
    elif fmt == 3:
        w = _nibbles(c[..., 8:24]) * _f32(c[..., 0:4]) + _f32(c[..., 4:8])
    else:
        halves = c.reshape(r, k // 16, 20)
        w = halves[..., 4:20].view(np.int8).astype(np.float32) * _f32(halves[..., 0:4])
    return w.reshape(r, k).astype(np.float32)


# --------------------------------------------------------------------------- K-quant repacking
def _fit(values: np.ndarray, scale: np.ndarray, offset: np.ndarray, lo: int, hi: int) -> np.ndarray | None:
    """Integers q with q * scale + offset == values exactly (per group), or None where that has no solution."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((values - offset) / scale)
    q = np.where(scale == 0, 0, q)
    q = np.clip(np.nan_to_num(q), lo, hi).astype(np.float32)
    if not np.array_equal(q * scale + offset, values):
        return None
    return q.astype(np.int16)


def _repack_q4_k(data: np.ndarray, n: int, k: int) -> np.ndarray | None:
    import gguf

    blocks = data.reshape(n * k // 256, 144)
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
    scale = (d * sc.astype(np.float32)).reshape(-1, 1)  # one per 32 weights
    offset = -(dmin * m.astype(np.float32)).reshape(-1, 1)
    values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_K).reshape(-1, 32)
    q = _fit(values, scale, offset, 0, 15)
    if q is None:
        return None
    packed = (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)
    head = np.concatenate([scale, offset], axis=1).astype(np.float32).view(np.uint8)
    return np.concatenate([head, packed], axis=1).reshape(n, k // 32 * 24)


def _repack_q6_k(data: np.ndarray, n: int, k: int) -> np.ndarray | None:
    import gguf

    blocks = data.reshape(n * k // 256, 210)
    d = _f16(blocks[:, 208:210])
    scale = (d * blocks[:, 192:208].view(np.int8).astype(np.float32)).reshape(-1, 1)  # one per 16 weights
    values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q6_K).reshape(-1, 16)
    q = _fit(values, scale, np.zeros_like(scale), -32, 31)
    if q is None:
        return None
    head = scale.astype(np.float32).view(np.uint8)
    return np.concatenate([head, q.astype(np.int8).view(np.uint8)], axis=1).reshape(n, k // 32 * 40)


# --------------------------------------------------------------------------- attaching
def _blocks_for(tensor, n: int, k: int) -> tuple[int, np.ndarray] | str:
    """(kernel format, rows of blocks) for a GGUF tensor holding an [n, k] weight, or the reason it cannot be used."""
    kind = tensor.tensor_type.name
    if kind not in FORMATS:
        return f"{kind} is not a type the quantized kernel reads"
    if k % (256 if kind.endswith("_K") else 32):
        return f"{k} inputs do not fill whole {kind} blocks"
    fmt, chunk = FORMATS[kind]
    data = np.asarray(tensor.data)
    if kind == "Q4_K":
        rows = _repack_q4_k(data, n, k)
    elif kind == "Q6_K":
        rows = _repack_q6_k(data, n, k)
    else:
        rows = data.reshape(n, k // 32 * chunk)
    if rows is None:
        return f"its {kind} blocks could not be repacked exactly"
    return fmt, rows


def _rotary_permutation(n: int, heads: int) -> np.ndarray:
    """Row order of a llama-family Q/K weight as HF holds it, read from the GGUF's order (the converter
    interleaves each head's two rotary halves)."""
    if heads <= 0 or n % (2 * heads):
        return np.arange(n)
    return np.arange(n).reshape(heads, n // heads // 2, 2).swapaxes(1, 2).reshape(n)


def _matching_rows(fmt: int, rows: np.ndarray, weight: np.ndarray, k: int, config) -> np.ndarray | None:
    """The permutation p with decode(rows[p]) == weight, found among the identity and the rotary orders; checked
    on a sample of rows. None when none matches."""
    n = weight.shape[0]
    sample = np.unique(np.linspace(0, n - 1, min(n, _SAMPLE_ROWS)).astype(np.int64))
    want = weight[sample]
    heads = {getattr(config, "num_attention_heads", 0) or 0, getattr(config, "num_key_value_heads", 0) or 0}
    for perm in [np.arange(n)] + [_rotary_permutation(n, h) for h in sorted(heads) if h]:
        if np.array_equal(decode_rows(fmt, rows[perm[sample]], k), want):
            return perm
    return None


def _tensor_names(reader, model) -> dict[str, str]:
    """HF module name -> GGUF tensor name for the model's linear layers."""
    import gguf

    arch_field = reader.fields.get("general.architecture")
    arch_name = arch_field.contents() if arch_field is not None else ""
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if arch is None:
        return {}
    blocks = getattr(model.config, "num_hidden_layers", 0)
    names = gguf.get_tensor_name_map(arch, blocks)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            hit = names.get_name(name)
            if hit is not None:
                out[name] = hit + ".weight"
    return out


@torch.no_grad()
def attach_gguf(model, path: str | Path) -> dict[str, int]:
    """Keep ``path``'s quantized blocks beside each matching fp32 linear weight of ``model`` (loaded from it).

    Returns :func:`quant_summary`. Weights without usable blocks are marked as falling back to fp32 and
    listed once on stderr. Does nothing (returns ``{}``) for a model that is not fp32 on a CPU.
    """
    import gguf

    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    if not linears or any(m.weight.dtype != torch.float32 or m.weight.device.type != "cpu" for m in linears.values()):
        return {}
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    names = _tensor_names(reader, model)
    if "lm_head" in linears and names.get("lm_head") not in tensors:
        names["lm_head"] = "token_embd.weight"  # tied output layer: the GGUF keeps only the embedding
    fallbacks: dict[str, list[str]] = {}
    done: dict[int, object] = {}  # tied weights share one Parameter: attach once
    for name, mod in linears.items():
        weight = mod.weight
        if id(weight) in done:
            continue
        tensor = tensors.get(names.get(name, ""))
        n, k = weight.shape
        if tensor is None:
            got: tuple | str = "no GGUF tensor matches it"
            kind = "unknown"
        else:
            kind = tensor.tensor_type.name
            got = _blocks_for(tensor, n, k) if kind != "F32" else "F32 weights run the fp32 kernel"
        if isinstance(got, tuple):
            fmt, rows = got
            perm = _matching_rows(fmt, rows, weight.numpy(), k, model.config)
            if perm is None:
                got = "its decoded blocks differ from the loaded weight"
            else:
                if not np.array_equal(perm, np.arange(n)):
                    rows = rows[perm]
                blocks = torch.from_numpy(np.ascontiguousarray(rows).copy())
                weight._specdec_quant = QuantWeight(kind, fmt, blocks, n, k, weight._version, weight.data_ptr())
        if isinstance(got, str):
            weight._specdec_quant = _Fallback(kind, got, weight._version)
            if kind != "F32":
                fallbacks.setdefault(f"{kind}: {got}", []).append(name)
        done[id(weight)] = weight
    for why, mods in fallbacks.items():
        log.warning("%s: %d linear layer(s) run dequantized in fp32 (%s), e.g. %s", Path(path).name, len(mods), why, mods[0])
    return quant_summary(model)


# --------------------------------------------------------------------------- a drafter's own linears in Q8_0
def q8_0_blocks(weight: torch.Tensor) -> torch.Tensor:
    """GGUF Q8_0 blocks of a [N, K] weight (K a multiple of 32): per 32 weights an fp16 scale d = max|w| / 127
    and 32 int8 q = round(w / d), as uint8 [N, K/32 * 34] (the kernel's format 2)."""
    n, k = weight.shape
    if k % 32:
        raise ValueError(f"Q8_0 needs rows of a multiple of 32 weights, got {k}")
    w = weight.detach().to(torch.float32).reshape(n, k // 32, 32)
    d = (w.abs().amax(-1) / 127.0).to(torch.float16)
    scale = d.to(torch.float32)[..., None]
    # a zero scale (every weight of the block below fp16's range for it) divides by 1: those weights round to 0
    q = torch.round(w / torch.where(scale > 0, scale, 1.0)).clamp(-127, 127).to(torch.int8)
    out = torch.empty(n, k // 32, 34, dtype=torch.uint8)
    out[..., :2] = d.contiguous().view(torch.uint8).reshape(n, k // 32, 2)
    out[..., 2:] = q.view(torch.uint8)
    return out.reshape(n, -1)


class _Q8Linear:
    """The forward :func:`quantize_linears` gives one ``nn.Linear``: Q8_0 blocks through the native kernel for
    inference on fp32 CPU inputs, the module's own forward for anything else (autograd, other dtypes, a weight
    changed since: its blocks are then rebuilt at the next inference call)."""

    def __init__(self, mod: nn.Linear, kernel) -> None:
        self.mod, self.kernel = mod, kernel
        self.key: tuple = ()
        self.blocks: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mod, w = self.mod, self.mod.weight
        if (x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu" or w.device.type != "cpu"
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return nn.Linear.forward(mod, x)
        key = (w.data_ptr(), w._version, w.shape)
        if key != self.key:
            self.blocks = q8_0_blocks(w)
            self.bias = None if mod.bias is None else mod.bias.detach().float().contiguous()
            self.key = key
        n, k = w.shape
        x2 = x.reshape(-1, k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        out = torch.empty(x2.shape[0], n, dtype=torch.float32)
        if x2.shape[0]:
            rc = self.kernel(2, x2.data_ptr(), self.blocks.data_ptr(), None if self.bias is None else self.bias.data_ptr(),
                             out.data_ptr(), x2.shape[0], n, k, torch.get_num_threads())
            if rc:
                raise RuntimeError(f"the Q8_0 kernel failed (code {rc})")
        return out.reshape(*x.shape[:-1], n)

    def __deepcopy__(self, memo) -> "_Q8Linear":
        import copy

        return _Q8Linear(copy.deepcopy(self.mod, memo), self.kernel)  # the copy rebuilds its own blocks


def quantize_linears(module: nn.Module) -> int:
    """Run the ``nn.Linear`` layers of a drafter's own module from Q8_0 blocks (``csrc/quant.c``) at inference.

    A drafter's forwards only propose tokens that the target verifies, so their precision never changes an
    output; what they cost is reading their weights once per draft depth, from memory the target's step has
    just flushed through the caches. Q8_0 reads 1.06 bytes a weight against bf16's 2 and fp32's 4 (measured in
    ``docs/eagle.md``). The module keeps its fp32 weights (training, saving and autograd use them unchanged);
    only inference calls on fp32 CPU inputs take the blocks. Layers whose input width is not a multiple of 32
    keep their forward. Returns how many layers were routed (0 where the native kernel is unavailable);
    :func:`dequantize_linears` undoes it. Idempotent."""
    from specdec.native import quant_linear_lib

    kernel = quant_linear_lib()
    if kernel is None:
        return 0
    routed = 0
    for mod in module.modules():
        if type(mod) is not nn.Linear or mod.in_features % 32:
            continue
        if not isinstance(mod.__dict__.get("forward"), _Q8Linear):
            mod.forward = _Q8Linear(mod, kernel)
        routed += 1
    return routed


def dequantize_linears(module: nn.Module) -> None:
    """Undo :func:`quantize_linears`: every layer runs its own forward again."""
    for mod in module.modules():
        if isinstance(mod.__dict__.get("forward"), _Q8Linear):
            del mod.forward
