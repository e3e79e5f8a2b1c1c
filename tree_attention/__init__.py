"""Tree attention: N tree nodes attend to the whole committed prefix and to their ancestors.

``tree_attention(q, k, v, ancestor_mask, scale=None, backend="auto")`` is the
one contract; ``backend="torch"`` is the dense-mask SDPA reference.
"""

from specdec.tree_attention.reference import additive_tree_mask, tree_attention_torch, tree_mask

__all__ = ["tree_attention", "tree_mask", "additive_tree_mask", "tree_attention_torch"]


def tree_attention(q, k, v, ancestor_mask, *, scale=None, backend="auto"):
    """Attention of tree-node queries over prefix + tree keys (see reference.tree_attention_torch for shapes).

    ``backend`` is resolved by the one resolver, :func:`specdec.tree_attention.hf.resolve_backend`.
    """
    from specdec.tree_attention.hf import resolve_backend

    if resolve_backend(backend, q.device) == "triton":
        from specdec.tree_attention.triton_kernel import tree_attention_triton

        return tree_attention_triton(q, k, v, ancestor_mask, scale=scale)
    return tree_attention_torch(q, k, v, ancestor_mask, scale=scale)
