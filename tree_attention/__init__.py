"""Tree attention: N tree nodes attend to the whole committed prefix and to their ancestors.

``tree_attention(q, k, v, ancestor_mask, scale=None, backend="auto")`` is the
one contract; ``backend="torch"`` is the dense-mask SDPA reference.
"""

from specdec.tree_attention.reference import additive_tree_mask, tree_attention_torch, tree_mask

__all__ = ["tree_attention", "tree_mask", "additive_tree_mask", "tree_attention_torch"]


def tree_attention(q, k, v, ancestor_mask, *, scale=None, backend="auto"):
    """Attention of tree-node queries over prefix + tree keys (see reference.tree_attention_torch for shapes)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown tree-attention backend {backend!r}; use 'auto', 'torch' or 'triton'")
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        from specdec.tree_attention.triton_kernel import tree_attention_triton

        return tree_attention_triton(q, k, v, ancestor_mask, scale=scale)
    return tree_attention_torch(q, k, v, ancestor_mask, scale=scale)
