"""Torch reference for tree attention: a dense mask and SDPA. Runs everywhere."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["tree_mask", "additive_tree_mask", "tree_attention_torch"]


def tree_mask(prefix_len: int, ancestor_mask: Tensor) -> Tensor:
    """[N, P + N] bool: tree nodes see the whole prefix and their ancestors (and themselves)."""
    n = ancestor_mask.shape[0]
    visible = torch.ones(n, prefix_len + n, dtype=torch.bool, device=ancestor_mask.device)
    visible[:, prefix_len:] = ancestor_mask
    return visible


def additive_tree_mask(prefix_len: int, ancestor_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[1, 1, N, P + N] additive mask (0 visible, dtype-min hidden): the form HF models take as a 4-D mask."""
    visible = tree_mask(prefix_len, ancestor_mask)
    mask = torch.zeros(visible.shape, dtype=dtype, device=ancestor_mask.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def tree_attention_torch(q: Tensor, k: Tensor, v: Tensor, ancestor_mask: Tensor, scale: float | None = None) -> Tensor:
    """Reference tree attention.

    Args:
        q: [B, Hq, N, D] queries of the tree nodes.
        k, v: [B, Hkv, P + N, D] keys/values, tree nodes last; Hq % Hkv == 0.
        ancestor_mask: [N, N] bool, row node sees column node.
        scale: softmax scale, default 1 / sqrt(D).

    Returns:
        [B, Hq, N, D] in q's dtype.
    """
    n = q.shape[2]
    prefix_len = k.shape[2] - n
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    mask = tree_mask(prefix_len, ancestor_mask.to(q.device))
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)
