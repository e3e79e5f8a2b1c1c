"""The lean decode forward: a llama-style model's whole decoder stack in one native call (``specdec/csrc/step.c``).

Why: once the linear layers ran from specdec's own kernels, a plain step of the default model (30 layers) was
~10 ms of which ~5 ms were not the multiplies: ~1,500 aten ops and the modeling code's Python, a few microseconds
each whatever their size. :class:`LeanForward` runs the same layers back to back in C, calling the same multiply
kernels (``rows-avx512``, ``gguf-avx512``) and the row-invariant attention (``csrc/attn.c``), and writes the new
keys/values straight into the engine's batch KV cache. It is the engine's decode forward
(:meth:`specdec.batch.BatchRunner.forward`) wherever it applies; prefill, fused prefill chunks and everything
outside the engine keep HF's forward.

It applies (:func:`lean_forward_for`) to an fp32 model on the CPU whose decoder layers are the llama layout
(``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj`` with SiLU, HF-convention RMSNorms, a rotary embedding
that is a function of the position alone, no sliding window, no q/k norms), for the row counts whose measured
linear kernel is one of the own kernels (a GGUF model: every row count up to 64). When prepared it runs a random
sequence through itself and through the model's own forward and is used only if the logits agree to float
rounding; otherwise (or with ``SPECDEC_LEAN=0``) the engine keeps HF's forward, and :attr:`LeanForward.reason`
/ :func:`lean_unavailable_reason` say why.

Exactness: every node's computation depends on its own row only (the own kernels are row-invariant, the attention
treats each query alone and sums its keys by rank), so a tree node gets bit for bit what a plain step at its place
gets: speculative output equals plain decoding token for token. Against HF's forward (the bench's HF baseline) the
difference is float rounding (attention and SiLU are computed by other code), so outputs differ only at logit
near-ties, which the bench lists.
"""

from __future__ import annotations

import ctypes
import os
import struct
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["LeanForward", "lean_forward_for", "lean_unavailable_reason"]

_SOURCE = Path(__file__).with_name("csrc") / "step.c"
_LIN = 6
_NATIVE = ("rows-avx512", "gguf-avx512")
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # rotary embeddings that depend on the position alone
_reason: str | None = None


@lru_cache(maxsize=1)
def _step_library():
    from specdec.native import _build

    return _build(_SOURCE)


@lru_cache(maxsize=1)
def eagle_layer_lib():
    """``specdec_eagle_layer`` of ``csrc/step.c`` (an EAGLE draft layer in one native call), or None."""
    lib = _step_library()
    if lib is None:
        return None
    fn = lib.specdec_eagle_layer
    fn.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
                   + [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int])
    fn.restype = ctypes.c_int
    return fn


@lru_cache(maxsize=1)
def step_lib():
    """The loaded ``csrc/step.c`` (``specdec_lean_forward``), or None."""
    lib = _step_library()
    if lib is None:
        return None
    fn = lib.specdec_lean_forward
    fn.argtypes = ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 7
                   + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int])
    fn.restype = ctypes.c_int
    return fn


def lean_unavailable_reason() -> str | None:
    """Why the last model asked for could not use the lean forward (None when it could)."""
    return _reason


def _bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


def _addr(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


class LeanForward:
    """One model's decoder stack described for ``specdec_lean_forward`` (see the module doc). Build with
    :func:`lean_forward_for`; ``kernels`` is the linear kernel name per row count (0 .. 64) of the engine's plan."""

    def __init__(self, model, kernels: list[str], spec: dict) -> None:
        # no reference to the model itself: the prepared kernels that hold this object are cached per model in a
        # weak-keyed table, which a strong reference back to the model would keep alive forever
        self.rows = frozenset(i for i, name in enumerate(kernels) if name in _NATIVE)  # row counts served here
        self._keep: list = []  # every tensor the description points to
        self._fn = step_lib()
        self._embed = model.get_input_embeddings()
        self._rotary = spec["rotary"]
        self.layers, self.hidden, self.heads, self.kv_heads, self.head_dim = (spec[k] for k in ("layers", "hidden", "heads", "kv_heads", "head_dim"))
        self.vocab = spec["vocab"]
        self._cos = self._sin = torch.empty(0)
        desc = self._header(spec)
        for layer in spec["decoder"]:
            desc += [self._keep_ptr(layer.input_layernorm.weight), _bits(layer.input_layernorm.variance_epsilon),
                     self._keep_ptr(layer.post_attention_layernorm.weight), _bits(layer.post_attention_layernorm.variance_epsilon)]
            att, mlp = layer.self_attn, layer.mlp
            for mod in (att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                desc += self._linear(mod)
        self._desc = (ctypes.c_int64 * len(desc))(*desc)

    # ------------------------------------------------------------------ description
    def _keep_ptr(self, t: Tensor) -> int:
        t = t.detach()
        if t.dtype != torch.float32 or not t.is_contiguous():
            t = t.float().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _linear(self, mod: nn.Linear) -> list[int]:
        from specdec.quant import quant_of

        bias = self._keep_ptr(mod.bias) if mod.bias is not None else 0
        q = quant_of(mod.weight)
        n, k = mod.weight.shape
        if q is not None:
            self._keep.append(q.blocks)
            return [0, q.fmt, q.blocks.data_ptr(), bias, n, k]
        return [1, 0, self._keep_ptr(mod.weight), bias, n, k]

    def _header(self, spec: dict) -> list[int]:
        from specdec.fastops import ops_lib
        from specdec.native import attention_lib, quant_linear_lib, rows_linear_lib

        quant = quant_linear_lib()
        norm = spec["norm"]
        return [spec["layers"], spec["hidden"], spec["heads"], spec["kv_heads"], spec["head_dim"], spec["intermediate"],
                spec["vocab"], _addr(quant) if quant is not None else 0, _addr(rows_linear_lib()), _addr(attention_lib()),
                _addr(ops_lib().specdec_rmsnorm), self._keep_ptr(norm.weight), _bits(norm.variance_epsilon),
                _bits(spec["scale"]), *self._linear(spec["lm_head"])]

    # ------------------------------------------------------------------ running
    def serves(self, rows: int) -> bool:
        """Whether a forward over ``rows`` rows (B·N) runs here."""
        return rows in self.rows

    def _tables(self, end: int) -> tuple[Tensor, Tensor]:
        """cos/sin [positions, head dim] for positions 0 .. end - 1 at least (HF's rotary module, computed once for a
        range of positions and grown by doubling: each position's row is the same product whatever the range)."""
        if self._cos.shape[0] < end:
            n = max(end, 2 * self._cos.shape[0], 1024)
            x = torch.zeros(1, dtype=torch.float32)
            with torch.no_grad():
                cos, sin = self._rotary(x, torch.arange(n)[None])
            self._cos, self._sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        return self._cos, self._sin

    @staticmethod
    def _buffers(cache, keys: list[Tensor], values: list[Tensor]) -> tuple:
        """The key/value buffer addresses of the cache's layers as C arrays, kept on the cache (each engine's own:
        threads sharing one model never see another's) and rebuilt when any buffer moved (every layer's address is
        compared: a new buffer can land where a freed one was)."""
        ptrs = [k.data_ptr() for k in keys] + [v.data_ptr() for v in values]
        held = getattr(cache, "_lean_buffers", None)
        if held is None or held[0] != ptrs:  # a buffer moved (its shape can change only then)
            shape = keys[0].shape
            if any(k.shape != shape or v.shape != shape or not k.is_contiguous() or not v.is_contiguous() for k, v in zip(keys, values)):
                raise RuntimeError("the lean forward needs every layer's cache in one contiguous shape")
            n = len(keys)
            held = cache._lean_buffers = (ptrs, (ctypes.c_int64 * n)(*ptrs[:n]), (ctypes.c_int64 * n)(*ptrs[n:]), shape[-2])
        return held[1], held[2], held[3]

    def forward(self, cache, tokens: Tensor, depths: Tensor, anc: Tensor, *, embeds: Tensor | None = None,
                taps: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor | None]:
        """One forward over B rows of N nodes (``tokens``/``depths`` [B, N], ``anc`` [B, N, N] bool; ``embeds``
        [B, N, H] in place of the tokens' embeddings), appended to each row of ``cache`` (a
        :class:`~specdec.batch.BatchKVCache`) after its committed length. Returns logits [B, N, V] and, with
        ``taps`` (HF hidden-state indices), their hidden states side by side [B, N, len(taps)·H]."""
        n = tokens.shape[1]
        layers = cache.layers
        first = layers[0]
        lengths = list(first.lengths)
        end = max(lengths) + n
        if end > first._kb.shape[-2] or end > first._finite:
            for layer in layers:
                layer._reserve(None, None, end)
                layer._clear_to(end)
        buffers = self._buffers(cache, [layer._kb for layer in layers], [layer._vb for layer in layers])
        out = self._run(buffers, lengths, tokens, depths, anc, embeds, taps)
        for layer in layers:  # what the cache's own update would leave: the length it was written to
            layer.length = end
        return out

    def forward_single(self, cache, tokens: Tensor, anc: Tensor, depths: Tensor, *, taps: tuple[int, ...] | None = None,
                       shift: int = 0) -> tuple[Tensor, Tensor | None]:
        """One forward over a tree of N nodes (``tokens``/``depths`` [N], ``anc`` [N, N] bool) appended to a
        single-sequence :class:`~specdec.cache.TreeKVCache` that holds a prefix (a :class:`~specdec.runner.TreeRunner`'s):
        its layers grow by N entries, as the model's own forward would leave them. A node's position is its cache
        slot + ``shift`` (0: the cache holds the whole sequence). Returns logits [N, V] and, with ``taps``, the
        hidden states [N, len(taps)·H]."""
        n = tokens.numel()
        layers = cache.layers
        start = layers[0].length
        for layer in layers:
            if layer._k.shape[-2] < start + n:  # room (the kernel reads entries below start + n only: all written)
                layer._reserve(layer._k[:, :, :0], layer._v[:, :, :0], start + n)
        buffers = self._buffers(cache, [layer._k for layer in layers], [layer._v for layer in layers])
        logits, h = self._run(buffers, [start], tokens[None], depths[None] + shift, anc[None], None, taps)
        for layer in layers:
            layer.length = start + n
            layer._refresh_views()
        return logits[0], h[0] if h is not None else None

    def _run(self, buffers: tuple, lengths: list[int], tokens: Tensor, depths: Tensor, anc: Tensor, embeds: Tensor | None,
             taps: tuple[int, ...] | None) -> tuple[Tensor, Tensor | None]:
        kc, vc, cap = buffers
        b, n = tokens.shape
        with torch.no_grad():
            x = embeds.reshape(b * n, -1) if embeds is not None else self._embed(tokens.reshape(-1))
            x = x.float().clone() if embeds is not None or x.dtype != torch.float32 else x.contiguous()
        positions = (torch.tensor(lengths)[:, None] + depths).reshape(-1)
        cos, sin = self._tables(int(positions.max()) + 1)
        lengths_t = (ctypes.c_int64 * b)(*lengths)
        mask = anc.to(torch.uint8).contiguous() if n > 1 else None
        order = [i % (self.layers + 1) for i in taps] if taps else []
        tap_out = torch.empty(b * n, len(order) * self.hidden) if order else None
        taps_t = (ctypes.c_int64 * max(len(order), 1))(*order)
        logits = torch.empty(b * n, self.vocab)
        rc = self._fn(self._desc, x.data_ptr(), b, n, lengths_t, mask.data_ptr() if mask is not None else None,
                      positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), kc, vc, cap, taps_t, len(order),
                      tap_out.data_ptr() if tap_out is not None else None, logits.data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"the lean forward failed (code {rc}: {'out of memory' if rc in (-2, -3) else 'unsupported shape'})")
        return logits.view(b, n, -1), tap_out.view(b, n, -1) if tap_out is not None else None


def _spec(model) -> dict | str:
    """The model's decoder stack as the lean forward needs it, or why it does not fit."""
    if not isinstance(model, nn.Module) or getattr(model, "dtype", None) != torch.float32:
        return "the lean forward is fp32 only"
    if getattr(model, "device", torch.device("cpu")).type != "cpu":
        return "the lean forward runs on the CPU"
    dec, head, cfg = getattr(model, "model", None), getattr(model, "lm_head", None), getattr(model, "config", None)
    layers = getattr(dec, "layers", None)
    if layers is None or not isinstance(head, nn.Linear) or not all(hasattr(dec, a) for a in ("embed_tokens", "norm", "rotary_emb")):
        return f"{type(model).__name__} is not laid out as model.layers / model.norm / lm_head"
    rotary = dec.rotary_emb
    if getattr(rotary, "rope_type", "default") not in _ROPE_TYPES:
        return f"rotary embedding {getattr(rotary, 'rope_type', '?')!r} depends on more than the position"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if any(getattr(cfg, a, None) for a in ("final_logit_softcapping", "attn_logit_softcapping")):
        return "logit soft-capping"
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
        return f"activation {cfg.hidden_act!r}"
    first = layers[0]
    att, mlp = getattr(first, "self_attn", None), getattr(first, "mlp", None)
    for layer in layers:
        att, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = [(att, "q_proj"), (att, "k_proj"), (att, "v_proj"), (att, "o_proj"), (mlp, "gate_proj"), (mlp, "up_proj"), (mlp, "down_proj")]
        if not all(isinstance(getattr(m, n, None), nn.Linear) for m, n in names):
            return "a decoder layer is not the llama layout (q/k/v/o, gate/up/down)"
        if any(hasattr(att, a) for a in ("q_norm", "k_norm")) or getattr(att, "sliding_window", None):
            return "q/k norms or sliding-window attention"
        for norm in (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None), dec.norm):
            if not isinstance(getattr(norm, "variance_epsilon", None), float) or not isinstance(getattr(norm, "weight", None), nn.Parameter):
                return "a norm is not HF's RMSNorm"
    head_dim = getattr(att, "head_dim", None)
    heads = att.q_proj.out_features // head_dim if head_dim else 0
    kv_heads = att.k_proj.out_features // head_dim if head_dim else 0
    if not head_dim or head_dim % 2 or head_dim > 512 or heads * head_dim != att.q_proj.out_features or not kv_heads or heads % kv_heads:
        return "unexpected attention shapes"
    scale = getattr(att, "scaling", head_dim ** -0.5)
    return {"layers": len(layers), "hidden": head.in_features, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "intermediate": first.mlp.gate_proj.out_features, "vocab": head.out_features, "scale": float(scale),
            "norm": dec.norm, "lm_head": head, "decoder": list(layers), "rotary": rotary}


def _agrees(model, lean: LeanForward, scope) -> str | None:
    """Run a random 12-token sequence through the lean forward (as a chain tree over an empty cache, then one plain
    step) and through the model's own forward (inside ``scope``: with the same linear kernels, so that a GGUF
    model's fp32 weights stay unread): None when the logits agree to float rounding, else the difference."""
    from specdec.batch import BatchKVCache, _BatchLayer

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lean.vocab, (13,), generator=g)
    with torch.no_grad(), scope():
        ref = model(input_ids=ids[None]).logits[0].float()
    layers = []
    for _ in range(lean.layers):
        layer = _BatchLayer()
        empty = torch.zeros(1, lean.kv_heads, 0, lean.head_dim)
        layer.setup([empty], [empty.clone()], 1)
        layers.append(layer)
    cache = BatchKVCache(layers)
    n = 12
    anc = torch.ones(n, n, dtype=torch.bool).tril()[None]
    out, _ = lean.forward(cache, ids[None, :n], torch.arange(n)[None], anc)
    cache.commit_rows([torch.arange(n)])
    last, _ = lean.forward(cache, ids[None, n:], torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, 1, dtype=torch.bool))
    got = torch.cat([out[0], last[0]])
    err = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    return None if err <= 1e-3 * max(scale, 1.0) else f"its logits differ from the model's own forward by {err:.3g} (of {scale:.3g})"


def lean_forward_for(model, kernels: list[str], scope=nullcontext) -> LeanForward | None:
    """The lean forward for ``model`` with the plan's kernel per row count (``kernels[r]`` for r rows), or None
    (the reason in :func:`lean_unavailable_reason`). ``scope``: the context in which the model's own forward runs
    with the same kernels (the check when prepared)."""
    global _reason
    if os.environ.get("SPECDEC_LEAN", "1") == "0":
        _reason = "switched off by SPECDEC_LEAN=0"
        return None
    if not any(name in _NATIVE for name in kernels):
        _reason = "the measured linear plan uses none of the own kernels"
        return None
    spec = _spec(model)
    if isinstance(spec, str):
        _reason = spec
        return None
    from specdec.fastops import ops_lib
    from specdec.native import attention_lib, rows_linear_lib, unavailable_reason

    if step_lib() is None or attention_lib() is None or rows_linear_lib() is None or ops_lib() is None:
        _reason = unavailable_reason() or "a native library could not be built"
        return None
    lean = LeanForward(model, kernels, spec)
    problem = _agrees(model, lean, scope)
    if problem is not None:
        _reason = problem
        return None
    _reason = None
    return lean
