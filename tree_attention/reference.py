"""Torch reference for tree attention: a dense mask and SDPA. Runs everywhere."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["tree_mask", "additive_tree_mask", "ragged_tree_mask", "tree_attention_torch"]


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


def ragged_tree_mask(prefix_lens: Tensor, ancestor_mask: Tensor, total: int) -> Tensor:
    """[B, N, S] bool for a batch: row b's node i sees keys 0 .. P_b - 1 and its ancestors at P_b + j.

    Args:
        prefix_lens: [B] long, P_b.
        ancestor_mask: [B, N, N] bool.
        total: S, the key length (>= max P_b + N).
    """
    b, n, _ = ancestor_mask.shape
    keys = torch.arange(total, device=ancestor_mask.device)[None, None, :]  # [1, 1, S]
    p = prefix_lens.to(ancestor_mask.device)[:, None, None]
    visible = keys < p  # the prefix
    rel = (keys - p).clamp(0, n - 1)  # tree slot of each key
    tree = torch.gather(ancestor_mask, 2, rel.expand(b, n, total)) & (keys >= p) & (keys < p + n)
    return visible | tree


def tree_attention_torch(q: Tensor, k: Tensor, v: Tensor, ancestor_mask: Tensor, scale: float | None = None,
                         prefix_lens: Tensor | None = None) -> Tensor:
    """Reference tree attention.

    Args:
        q: [B, Hq, N, D] queries of the tree nodes.
        k, v: [B, Hkv, S, D] keys/values; Hq % Hkv == 0. Row b: prefix at 0 .. P_b - 1, tree right after.
        ancestor_mask: [N, N] bool (row node sees column node), or [B, N, N] per row.
        scale: softmax scale, default 1 / sqrt(D).
        prefix_lens: [B] P_b (ragged batches); default S - N for every row.

    Returns:
        [B, Hq, N, D] in q's dtype.
    """
    n = q.shape[2]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    anc = ancestor_mask.to(q.device)
    if prefix_lens is None and anc.dim() == 2:
        mask = tree_mask(k.shape[2] - n, anc)
    else:
        anc = anc if anc.dim() == 3 else anc[None].expand(q.shape[0], n, n)
        p = prefix_lens if prefix_lens is not None else torch.full((q.shape[0],), k.shape[2] - n)
        mask = ragged_tree_mask(p, anc, k.shape[2])[:, None]
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)
