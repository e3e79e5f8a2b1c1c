"""Plug tree attention into the target's own attention layers through transformers' attention interface.

``with tree_attention_for(model, "triton"):`` switches the model to the
registered implementation ``"specdec_tree"``. Its attention function runs the
tree kernel when the forward carries ``specdec_tree_bits`` (the packed
ancestor mask, from :func:`pack_ancestor_mask`) and plain SDPA otherwise
(prefill, single-token steps). Its mask function returns no mask at all: the
tree's visibility travels only as the packed bits.
"""

from __future__ import annotations

from contextlib import contextmanager

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from specdec.tree_attention.reference import tree_attention_torch

__all__ = ["IMPLEMENTATION", "tree_attention_for", "resolve_backend"]

IMPLEMENTATION = "specdec_tree"
_backend = {"name": "triton"}


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, specdec_tree_bits=None, specdec_ancestor_mask=None, **kwargs):
    """query [B, Hq, N, D], key/value [B, Hkv, P + N, D] → ([B, N, Hq, D], None)."""
    if specdec_tree_bits is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if _backend["name"] == "triton":
        from specdec.tree_attention.triton_kernel import tree_attention_triton

        out = tree_attention_triton(query, key, value, packed_mask=specdec_tree_bits, scale=scaling)
    else:
        out = tree_attention_torch(query, key, value, specdec_ancestor_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)


def resolve_backend(attn: str, model) -> str:
    """'auto' → 'triton' for a CUDA model with triton installed, else 'torch'."""
    if attn not in ("auto", "torch", "triton"):
        raise ValueError(f"attn must be 'auto', 'torch' or 'triton', got {attn!r}")
    if attn == "auto":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton" if model.device.type == "cuda" else "torch"
    if attn == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as err:
            raise ValueError("attn='triton' needs the triton package: pip install 'specdec[triton]'") from err
    return attn


@contextmanager
def tree_attention_for(model, backend: str = "triton"):
    """Route the model's attention through the tree kernel for the duration of the block."""
    previous = model.config._attn_implementation
    _backend["name"] = backend
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
