"""Fused RMSNorm and rotary embedding for the engine's fp32 CPU forwards (``specdec/csrc/ops.c``).

After the linear layers, a plain decoding step is mostly per-op dispatch: ~1,500 aten ops for a 30-layer model,
each a few microseconds whatever its size. Two groups per layer fuse simply, without touching the model's code:

* every ``*RMSNorm`` module whose forward is HF's (``weight * (x * rsqrt(mean(x²) + eps))``, checked on random
  rows when prepared) runs one native pass per row (its sums of squares in a fixed order: row-invariant, and
  within float rounding of HF's);
* the modeling module's ``apply_rotary_pos_emb`` (HF's ``x * cos + rotate_half(x) * sin`` on q and k) runs one
  native call for both, **bit-identical** to HF's (checked when prepared; the same products and sums, no fused
  multiply-add), so a thread outside the engine that meets it while a scope is open computes what it would
  have computed.

Both are switched in only inside :meth:`FastOps.scope` (the engine's forwards, through
:class:`~specdec.kernels.FastLinears`), counted across threads like the linear routes. fp32 models on x86-64 with
AVX-512 only; ``SPECDEC_FAST_OPS=0`` switches them off.
"""

from __future__ import annotations

import ctypes
import os
import sys
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from specdec.kernels import CountedSwitch, set_forwards

__all__ = ["FastOps", "fast_ops_for", "ops_lib"]

_SOURCE = Path(__file__).with_name("csrc") / "ops.c"


@lru_cache(maxsize=1)
def ops_lib():
    """The loaded ``csrc/ops.c`` (``specdec_rmsnorm``, ``specdec_rotary`` with their ctypes signatures), or None."""
    from specdec.native import _build

    lib = _build(_SOURCE)
    if lib is None:
        return None
    lib.specdec_rmsnorm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_float]
    lib.specdec_rmsnorm.restype = ctypes.c_int
    lib.specdec_rotary.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    lib.specdec_rotary.restype = ctypes.c_int
    return lib


def _norm_forward(mod: nn.Module, fn) -> callable:
    eps = float(_eps(mod))

    def forward(x: Tensor) -> Tensor:
        weight = mod.weight  # read at each call: a weight the user replaces is the one used
        h = x.shape[-1]
        if (x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.shape != (h,) or not weight.is_contiguous()
                or x.stride(-1) != 1 or x.device.type != "cpu" or weight.device.type != "cpu"
                or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):  # autograd needs torch's ops
            return type(mod).forward(mod, x)
        rows = x.numel() // h
        x2 = x if x.is_contiguous() else x.contiguous()
        out = torch.empty(x.shape, dtype=torch.float32)
        fn(x2.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, h, h, eps)
        return out

    return forward


def _eps(mod: nn.Module):
    for name in ("variance_epsilon", "eps"):
        value = getattr(mod, name, None)
        if isinstance(value, float):
            return value
    return None


def _rotary(fn, theirs):
    """The native rotary embedding, with the modeling module's own (``theirs``) for what it does not serve."""

    def apply(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *args, **kwargs):
        if args or kwargs:  # another signature or setting (unsqueeze_dim, a position_ids argument): the model's own
            return theirs(q, k, cos, sin, *args, **kwargs)
        if (q.dtype != torch.float32 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3
                or q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride() != sin.stride() or cos.stride(-1) != 1
                or cos.shape[0] != q.shape[0] or cos.shape[1] != q.shape[2] or cos.shape[-1] != q.shape[-1]
                or k.dtype != q.dtype or cos.dtype != q.dtype or sin.dtype != q.dtype or sin.shape != cos.shape
                or q.device.type != "cpu" or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]
                or torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or cos.requires_grad)):
            return theirs(q, k, cos, sin)
        b, hq, t, d = q.shape
        qo = torch.empty(b, hq, t, d, dtype=torch.float32)
        ko = torch.empty(b, k.shape[1], t, d, dtype=torch.float32)
        qs = (ctypes.c_int64 * 3)(*q.stride()[:3])
        ks = (ctypes.c_int64 * 3)(*k.stride()[:3])
        fn(q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(), qo.data_ptr(), ko.data_ptr(), b, hq, k.shape[1], t, d,
           qs, ks, cos.stride(0), cos.stride(1))
        return qo, ko

    return apply


class FastOps:
    """The fused norms and rotary embedding of one model, switched in by :meth:`scope` (see the module doc)."""

    def __init__(self, model) -> None:
        self._norms: list[tuple[nn.Module, callable]] = []
        self._rotary: list[tuple[object, object, object]] = []  # (modeling module, its function, ours)
        self._switch = CountedSwitch(self._apply)
        lib = ops_lib() if os.environ.get("SPECDEC_FAST_OPS", "1") != "0" else None
        if lib is None or not isinstance(model, nn.Module) or getattr(model, "dtype", None) != torch.float32:
            return
        g = torch.Generator().manual_seed(0)
        checked: dict[type, bool] = {}
        for mod in model.modules():
            if not type(mod).__name__.endswith("RMSNorm") or not isinstance(getattr(mod, "weight", None), nn.Parameter):
                continue
            if _eps(mod) is None or mod.weight.dim() != 1 or mod.weight.dtype != torch.float32 or mod.weight.device.type != "cpu":
                continue
            fwd = _norm_forward(mod, lib.specdec_rmsnorm)
            ok = checked.get(type(mod))
            if ok is None:  # the class's forward is HF's RMSNorm: same output up to float rounding
                x = torch.randn(5, mod.weight.shape[0], generator=g)
                with torch.no_grad():
                    ok = checked[type(mod)] = torch.allclose(fwd(x), type(mod).forward(mod, x), rtol=1e-5, atol=1e-6)
            if ok:
                self._norms.append((mod, fwd))
        self._rotary = _rotary_routes(model, lib.specdec_rotary, g)

    @property
    def active(self) -> bool:
        return bool(self._norms or self._rotary)

    def scope(self):
        """Switch the fused ops in for the block (counted across threads: they stay until the last block closes)."""
        return self._switch.scope()

    def _apply(self, on: bool) -> None:
        set_forwards(self._norms, on)
        for module, theirs, ours in self._rotary:
            module.apply_rotary_pos_emb = ours if on else theirs


def _rotary_routes(model, fn, g: torch.Generator) -> list:
    """The modeling modules whose ``apply_rotary_pos_emb`` the native version reproduces bit for bit on this
    model's head size (a model with another rotary convention keeps its own)."""
    routes = []
    seen = set()
    for mod in model.modules():
        module = sys.modules.get(type(mod).__module__)
        if module is None or module in seen or not type(mod).__name__.endswith("Attention"):
            continue
        seen.add(module)
        theirs = getattr(module, "apply_rotary_pos_emb", None)
        d = getattr(mod, "head_dim", None)
        if not callable(theirs) or not isinstance(d, int) or d % 2:
            continue
        ours = _rotary(fn, theirs)
        q = torch.randn(2, 5, 3, d, generator=g).transpose(1, 2)  # the model's layout: a transposed view
        k = torch.randn(2, 5, 1, d, generator=g).transpose(1, 2)
        angles = torch.randn(2, 5, d, generator=g)
        cos, sin = angles.cos(), angles.sin()
        if all(torch.equal(a, b) for a, b in zip(ours(q, k, cos, sin), theirs(q, k, cos, sin))):
            routes.append((module, theirs, ours))
    return routes


def fast_ops_for(model) -> FastOps | None:
    """:class:`FastOps` for ``model`` where any op applies, else None."""
    ops = FastOps(model)
    return ops if ops.active else None
