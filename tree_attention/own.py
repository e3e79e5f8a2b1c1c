"""specdec's own attention on the CPU (``specdec/csrc/attn.c``): every query row computed alone, in one fixed order.

The engine's plain decoding step (one query, no mask) and its tree forwards (N queries under the tree mask) both
run through :func:`own_attention` where it applies, so a tree node's attention output is bit-identical to what a
plain step gives the same token: with the row-invariant linear kernels, speculative output then equals plain
decoding token for token in bf16 and fp16 too (with SDPA the two paths round differently: 8 of 26 prompts equal
in bf16). Products and sums are fp32 (inputs widened exactly), the output is rounded once to the model's dtype.

It applies on a CPU, head dimension up to 512, when the kernel could be built (AVX-512, a C compiler; see
:func:`specdec.native.unavailable_reason`), by default to bf16 and fp16 models only: in fp32 SDPA's differences
stay at near-ties (~1e-6) and its GEMM-based tree path is faster (measured on AMD Zen 5, 9 query heads, 64
dims: one query is as fast here as SDPA's, 8 queries cost 1.5-2x SDPA's since each query row reads the keys
alone). ``SPECDEC_OWN_ATTENTION=1`` uses it for fp32 too, ``0`` never. Elsewhere the callers keep torch's SDPA.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import Tensor

__all__ = ["own_attention_available", "own_attention"]

_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def own_attention_available(query: Tensor) -> bool:
    """Whether :func:`own_attention` serves this query (see the module docstring for when)."""
    if query.device.type != "cpu" or query.dtype not in _KIND or query.shape[-1] > 512:
        return False
    setting = os.environ.get("SPECDEC_OWN_ATTENTION", "auto")
    if setting == "0" or (setting != "1" and query.dtype == torch.float32):
        return False
    from specdec.native import attention_lib

    return attention_lib() is not None


_LAST_MASK: tuple = (None, None)  # (mask, its kernel form): every layer of one forward passes the same mask


def _kernel_mask(mask: Tensor, n: int, s: int) -> Tensor:
    """fp32 [B | 1, N, S] contiguous, -inf where hidden; converted once per mask object, not once per layer."""
    global _LAST_MASK
    hit = _LAST_MASK
    if hit[0] is mask:
        return hit[1]
    hidden = mask <= torch.finfo(mask.dtype).min / 2 if mask.dtype.is_floating_point else ~mask
    m = torch.zeros(mask.shape, dtype=torch.float32) if not mask.dtype.is_floating_point else mask.float()
    m = m.masked_fill(hidden, float("-inf")).reshape(mask.shape[0], n, s).contiguous()
    _LAST_MASK = (mask, m)
    return m


def own_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    """query [B, Hq, N, D], key/value [B, Hkv, S, D] (any strides, last dim contiguous), mask additive
    [B | 1, 1, N, S] or None → [B, N, Hq, D] in the query's dtype."""
    from specdec.native import attention_lib

    b, hq, n, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    dtype = query.dtype
    q, k, v = (t if t.stride(-1) == 1 and t.dtype == dtype else t.to(dtype).contiguous() for t in (query, key, value))
    m = _kernel_mask(mask, n, s) if mask is not None else None
    mb = n * s if mask is not None and mask.shape[0] > 1 else 0
    out = torch.empty(b, n, hq, d, dtype=torch.float32)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k, v)]
    scale = float(scale) if scale is not None else d ** -0.5
    rc = attention_lib()(_KIND[dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), m.data_ptr() if m is not None else None,
                         out.data_ptr(), b, hq, hkv, n, s, d, *(ctypes.addressof(x) for x in strides), mb, scale,
                         torch.get_num_threads())
    if rc:
        raise RuntimeError(f"specdec's attention kernel failed (code {rc})")
    return out if dtype == torch.float32 else out.to(dtype)
