"""Triton tree-attention kernel: one pass, online softmax, visibility from a packed bitmask.

Each program handles BLOCK_M tree-node queries of one (batch, query head).
It streams the committed prefix in BLOCK_N key blocks with no mask at all
(every node sees the whole prefix), then the tree's own keys, where node i
sees node j iff bit j of row i of the packed ancestor mask is set. The mask
travels as ``ceil(N / 32)`` int32 words per row, never as a dense float
mask. Accumulation is fp32 (flash-attention style running max and sum);
inputs may be fp16, bf16 or fp32; GQA/MQA maps query head h to key/value
head ``h // (Hq // Hkv)``.

Under ``TRITON_INTERPRET=1`` (CPU tests) loaded blocks are converted to
fp32 at once: the interpreter mishandles bf16 in ``tl.dot``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["tree_attention_triton", "pack_ancestor_mask"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pack_ancestor_mask(ancestor_mask: Tensor) -> Tensor:
    """[N, N] bool → [N, ceil(N / 32)] int32; bit (j % 32) of word j // 32 in row i = mask[i, j].

    Example: a 3-node chain [[1,0,0],[1,1,0],[1,1,1]] packs to [[1], [3], [7]].
    """
    n = ancestor_mask.shape[0]
    words = (n + 31) // 32
    padded = torch.zeros(n, words * 32, dtype=torch.int64, device=ancestor_mask.device)
    padded[:, :n] = ancestor_mask.to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=ancestor_mask.device) << torch.arange(32, device=ancestor_mask.device)
    packed = (padded.view(n, words, 32) * weights).sum(-1)  # [N, W] in [0, 2^32)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # reinterpret as int32
    return packed.to(torch.int32).contiguous()


@triton.jit
def _online_softmax_step(q, k, v, visible, m_i, l_i, acc, scale, PRECISION: tl.constexpr):
    """Fold one key block into the running max m_i, sum l_i and output acc (flash-attention update)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _tree_attn_fwd(
    Q, K, V, Bits, Prefix, Out,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    sbb, N, W, Hq, GROUP, scale,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // GROUP
    P = tl.load(Prefix + b)  # this row's committed prefix; its tree keys follow it

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # tree node index of each query
    dims = tl.arange(0, DP)  # DP = D padded to tl.dot's minimum of 16; the padding loads as zeros
    dim_ok = dims < D
    row_ok = rows < N
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :] * sqd, mask=row_ok[:, None] & dim_ok[None, :],
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh

    # 1. The committed prefix: every node sees every prefix key.
    for start in range(0, P, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < P
        k = tl.load(k_base + cols[:, None] * skn + dims[None, :] * skd, mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + dims[None, :] * svd, mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        m_i, l_i, acc = _online_softmax_step(q, k, v, col_ok[None, :], m_i, l_i, acc, scale, PRECISION)

    # 2. The tree: node i sees node j iff bit j of its packed ancestor row is set.
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # tree node index of each key
        col_ok = cols < N
        k = tl.load(k_base + (P + cols)[:, None] * skn + dims[None, :] * skd, mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(v_base + (P + cols)[:, None] * svn + dims[None, :] * svd, mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        word = tl.load(Bits + b * sbb + rows[:, None] * W + (cols // 32)[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0)
        visible = ((word >> (cols % 32)[None, :]) & 1) != 0
        m_i, l_i, acc = _online_softmax_step(q, k, v, visible, m_i, l_i, acc, scale, PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i = 0 only on rows past N, never stored
    tl.store(Out + b * sob + h * soh + rows[:, None] * son + dims[None, :] * sod, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def tree_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, ancestor_mask: Tensor | None = None, *, scale: float | None = None,
    packed_mask: Tensor | None = None, prefix_lens: Tensor | None = None, block_m: int = 16, block_n: int = 32,
) -> Tensor:
    """Tree attention with the Triton kernel.

    Args:
        q: [B, Hq, N, D] tree-node queries.
        k, v: [B, Hkv, S, D] keys/values; Hq % Hkv == 0. Row b holds its committed prefix at
            0 .. P_b - 1 and its N tree nodes right after, at P_b .. P_b + N - 1 (S >= max P_b + N;
            anything past a row's tree is never read).
        ancestor_mask: [N, N] bool, or [B, N, N] for a batch of different trees (or give
            ``packed_mask``, [N, W] / [B, N, W], from :func:`pack_ancestor_mask`).
        scale: softmax scale, default 1 / sqrt(D).
        prefix_lens: [B] P_b per row (ragged batches); default S - N for every row.

    Returns:
        [B, Hq, N, D] in q's dtype.
    """
    bsz, hq, n, d = q.shape
    hkv, total = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if d & (d - 1) or d > 256:
        raise ValueError(f"head dim must be a power of two up to 256, got {d}")
    if v.shape[2] != total or total < n:
        raise ValueError("k and v must hold each row's prefix followed by its N tree nodes")
    if packed_mask is None:
        am = ancestor_mask.to(q.device)
        packed_mask = torch.stack([pack_ancestor_mask(m) for m in am]) if am.dim() == 3 else pack_ancestor_mask(am)
    bits = packed_mask if packed_mask.dim() == 3 else packed_mask[None].expand(bsz, -1, -1)
    bits = bits.contiguous()
    if prefix_lens is None:
        prefix_lens = torch.full((bsz,), total - n, dtype=torch.int32, device=q.device)
    prefix_lens = prefix_lens.to(device=q.device, dtype=torch.int32)
    if int(prefix_lens.max()) + n > total or int(prefix_lens.min()) < 0:
        raise ValueError("every row's prefix plus its N tree nodes must fit in k and v")
    out = torch.empty_like(q)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    grid = (triton.cdiv(n, block_m), bsz * hq)
    _tree_attn_fwd[grid](
        q, k, v, bits, prefix_lens, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        bits.stride(0) if packed_mask.dim() == 3 else 0, n, bits.shape[2], hq, hq // hkv, scale,
        D=d, DP=max(d, 16), BLOCK_M=block_m, BLOCK_N=max(block_n, 16), UPCAST=_INTERPRET,
        # fp32 products in full precision: tl.dot's default for fp32 on a GPU is TF32 (~1e-3 relative error),
        # which would break equality with plain decoding. Half-precision inputs keep the default.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
