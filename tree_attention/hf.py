"""Tree attention inside the target's own attention layers, through transformers' attention interface.

The engine switches the model (for the length of one generation) to the
registered implementation ``"specdec_tree"`` and passes each tree forward's
visibility as one keyword argument, ``specdec_tree`` (a :class:`TreeAttention`),
which transformers hands down to every attention call. With it, the
attention function runs:

* ``backend="torch"``: SDPA over the grouped key/value heads (no
  ``repeat_kv`` copy) with the additive mask ``[1, 1, N, P + N]``;
* ``backend="triton"``: the tree kernel, with the packed ancestor bits.

Without it (prefill, plain single-token steps) it is transformers' own SDPA
path, so a model left switched (an abandoned stream) still computes exactly
what ``"sdpa"`` computes. The mask function returns no mask: a tree forward's
visibility travels only in ``specdec_tree``.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from specdec.tree_attention.reference import additive_tree_mask

__all__ = ["IMPLEMENTATION", "BACKENDS", "TreeAttention", "resolve_backend", "Routing", "can_route"]

IMPLEMENTATION = "specdec_tree"
BACKENDS = ("auto", "torch", "triton")


@dataclass
class TreeAttention:
    """One tree forward's visibility, as the attention layers receive it.

    Attributes:
        backend: ``"torch"`` or ``"triton"``.
        ancestor_mask: [N, N] bool, node i sees node j.
        mask: [1, 1, N, P + N] additive float mask (torch backend), else None.
        bits: [N, ceil(N / 32)] int32 packed ancestor rows (triton backend), else None;
            [B, N, W] for a batch.
        prefix_lens: [B] each row's committed prefix in a ragged batch, else None.
    """

    backend: str
    ancestor_mask: Tensor
    mask: Tensor | None = None
    bits: Tensor | None = None
    prefix_lens: Tensor | None = None  # [B] per-row prefixes of a ragged batch (None: one prefix, S - N)
    fused: tuple | None = None  # a batch forward with a prompt's chunk packed after its rows (specdec.batch._FusedCache)

    @classmethod
    def build(cls, backend: str, prefix_len: int, ancestor_mask: Tensor, dtype: torch.dtype) -> "TreeAttention":
        if backend == "triton":
            from specdec.tree_attention.triton_kernel import pack_ancestor_mask

            return cls(backend, ancestor_mask, bits=pack_ancestor_mask(ancestor_mask))
        return cls(backend, ancestor_mask, mask=additive_tree_mask(prefix_len, ancestor_mask, dtype))

    @classmethod
    def build_batch(cls, backend: str, prefix_lens: Tensor, ancestor_mask: Tensor, total: int, dtype: torch.dtype) -> "TreeAttention":
        """A ragged batch: row b's prefix is ``prefix_lens[b]``, its tree ``ancestor_mask[b]`` ([B, N, N]), keys S = ``total``."""
        if backend == "triton":
            from specdec.tree_attention.triton_kernel import pack_ancestor_mask

            bits = torch.stack([pack_ancestor_mask(m) for m in ancestor_mask])
            return cls(backend, ancestor_mask, bits=bits, prefix_lens=prefix_lens)
        from specdec.tree_attention.reference import ragged_tree_mask

        visible = ragged_tree_mask(prefix_lens, ancestor_mask, total)
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)
        return cls(backend, ancestor_mask, mask=mask[:, None], prefix_lens=prefix_lens)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, specdec_tree: TreeAttention | None = None, **kwargs):
    """query [B, Hq, N, D], key/value [B, Hkv, P + N, D] → ([B, N, Hq, D], None)."""
    from specdec.tree_attention.own import own_attention, own_attention_available

    if specdec_tree is not None and specdec_tree.fused is not None:
        # one packed sequence: the batch's B·N tree nodes, then a prompt's chunk; each part attends to its own cache
        m, rows_tree, chunk_tree, cache = specdec_tree.fused
        q_rows = query[0, :, :m].unflatten(1, (cache.rows, cache.nodes)).transpose(0, 1).contiguous()
        out_rows, _ = _attention(module, q_rows, key, value, None, scaling, dropout, specdec_tree=rows_tree, **kwargs)
        chunk_k, chunk_v = cache.chunk_kv
        out_chunk, _ = _attention(module, query[:, :, m:].contiguous(), chunk_k, chunk_v, None, scaling, dropout,
                                  specdec_tree=chunk_tree, **kwargs)
        return torch.cat([out_rows.reshape(1, m, *out_rows.shape[2:]), out_chunk], dim=1), None
    if specdec_tree is None:
        if query.shape[2] == 1 and attention_mask is None and own_attention_available(query):  # a plain step
            return own_attention(query, key, value, None, scaling), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("tree attention does not implement logit soft-capping; run this model with fast=False")
    if specdec_tree.backend == "triton":
        from specdec.tree_attention.triton_kernel import tree_attention_triton

        out = tree_attention_triton(query, key, value, packed_mask=specdec_tree.bits, scale=scaling, prefix_lens=specdec_tree.prefix_lens)
    elif own_attention_available(query):  # row-invariant: the same bits as the plain step's (docstring of .own)
        return own_attention(query, key, value, specdec_tree.mask, scaling), None
    else:
        gqa = query.shape[1] != key.shape[1]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=specdec_tree.mask.to(query.dtype), scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)


def resolve_backend(attn: str, device: torch.device | str) -> str:
    """The one backend resolver: ``'auto'`` → ``'torch'`` (SDPA with the tree mask) on every device.

    The Triton kernel is opt-in (``attn='triton'``): on its first GPU run (H200, bf16, 2026-12-04) a 1B-class
    Llama verification forward (P=4096, N=64) took 15.6 ms through it against 10.3 ms through SDPA, and the
    kernel wins only at batch 8 with long prefixes and small trees (docs/tree_attention.md). ``auto`` goes
    back to the kernel when it beats SDPA end to end.
    """
    if attn not in BACKENDS:
        raise ValueError(f"attn (the tree-attention backend) must be one of {', '.join(BACKENDS)}, got {attn!r}")
    if attn == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as err:
            raise ValueError("attn='triton' needs the triton package: pip install 'specdec[triton]'") from err
        return "triton"
    return "torch"


def can_route(model) -> bool:
    """Whether the model takes an attention implementation through transformers' attention interface."""
    can = getattr(type(model), "_can_set_attn_implementation", None)
    return callable(can) and bool(can()) and hasattr(model, "set_attn_implementation")


_ROUTED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> [open routings, its own implementation]
_ROUTED_LOCK = threading.Lock()


class Routing:
    """Switches a model's attention to ``specdec_tree``; :meth:`restore` puts its own back (idempotent).

    Counted per model: while several generations run on one model (threads, a server, an abandoned stream
    beside a new one), the model stays switched until the last of them restores, and then gets back the
    implementation it had before the first. Usable as a context manager. A plain object rather than a
    generator, so nothing runs at interpreter shutdown if a caller never restores.
    """

    def __init__(self, model) -> None:
        self.model = model
        with _ROUTED_LOCK:
            entry = _ROUTED.get(model)
            if entry is None:
                entry = _ROUTED[model] = [0, model.config._attn_implementation]
                model.set_attn_implementation(IMPLEMENTATION)
            entry[0] += 1
        self.previous = entry[1]
        self.active = True

    def restore(self) -> None:
        with _ROUTED_LOCK:
            if not self.active:
                return
            self.active = False
            entry = _ROUTED.get(self.model)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] == 0:
                del _ROUTED[self.model]
                self.model.set_attn_implementation(entry[1])

    def __enter__(self) -> "Routing":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
