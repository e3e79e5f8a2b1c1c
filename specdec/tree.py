"""The token tree: the one data structure drafters produce and verifiers consume.

A tree holds N nodes in topological order (a parent's index is always smaller
than its child's). Node 0 is the root: the last committed token, whose KV is
not yet in the cache. Every other node is a drafted token.

Example: candidates ``[a, b]`` and ``[a, c]`` after root ``r`` merge into::

    r(0) ── a(1) ─┬─ b(2)
                  └─ c(3)

    tokens  = [r, a, b, c]
    parents = [-1, 0, 1, 1]
    depths  = [0, 1, 2, 2]
    ancestor_mask[3] = [T, T, F, T]      (node 3 sees r, a and itself)

Derived tensors (depths, ancestor mask, leaf paths) are computed once, with
tensor ops rather than per-node Python loops, and cached on the instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["TokenTree", "parents_from_paths"]

_NODE_FIELDS = ("draft_probs", "sources", "auxiliary", "input_embeds", "scores")  # per-node data beside tokens/parents


@dataclass(eq=False)
class TokenTree:
    """A tree of draft tokens rooted at the last committed token.

    Attributes:
        tokens: [N] long, token id of each node; ``tokens[0]`` is the root.
        parents: [N] long, parent index of each node; ``parents[0] == -1``.
        draft_probs: optional [N, V] float, the drafter's full distribution q at
            each node's *parent* position, for drafters that have one; lets the
            sampler form the exact residual max(p - q, 0).
        sources: optional [N] long, index of the drafter that proposed each node
            (fused trees); -1 for the root.
        auxiliary: optional [N] bool, nodes that ride along in the forward pass
            (e.g. PPD prompt tokens) but are never accepted and never committed.
        input_embeds: optional [N, H] float, the input embedding of each
            auxiliary node (a drafter's own, e.g. PPD's prompt tokens); rows of
            other nodes are ignored (their token's embedding is used).
        scores: optional [N] float, the drafter's estimate of the probability
            that each node is accepted (its whole path matches the target);
            1 for the root. With scores, the engine trims the tree to the size
            that pays on this machine (:mod:`specdec.sizing`); without, the
            tree is verified as proposed.
    """

    tokens: Tensor
    parents: Tensor
    draft_probs: Tensor | None = None
    sources: Tensor | None = None
    auxiliary: Tensor | None = None
    input_embeds: Tensor | None = None
    scores: Tensor | None = None

    def __post_init__(self) -> None:
        self.tokens = torch.as_tensor(self.tokens, dtype=torch.long).reshape(-1)
        self.parents = torch.as_tensor(self.parents, dtype=torch.long).reshape(-1)
        n = self.tokens.numel()
        if n == 0:
            raise ValueError("a TokenTree needs at least its root node")
        if self.parents.numel() != n:
            raise ValueError(f"parents has {self.parents.numel()} entries for {n} tokens")
        if self.parents[0].item() != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        idx = torch.arange(n)
        if n > 1 and not bool(((self.parents[1:] >= 0) & (self.parents[1:] < idx[1:])).all()):
            raise ValueError("parents must be topologically ordered: 0 <= parents[i] < i for i > 0")
        for name in _NODE_FIELDS:
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"{name} has {value.shape[0]} entries for {n} nodes")
        if self.input_embeds is not None and self.auxiliary is None:
            raise ValueError("input_embeds are for auxiliary nodes: mark them with auxiliary")

    # ------------------------------------------------------------------ builders
    @classmethod
    def root_only(cls, root: int) -> "TokenTree":
        """The trivial tree: no drafts, a plain decoding step."""
        return cls(torch.tensor([root]), torch.tensor([-1]))

    @classmethod
    def from_sequences(
        cls,
        root: int,
        sequences: Sequence[Sequence[int]],
        scores: Sequence[Sequence[float]] | None = None,
        source: int | Sequence[int] | None = None,
    ) -> "TokenTree":
        """Merge candidate continuations of ``root`` into a trie.

        Args:
            root: the last committed token.
            sequences: candidate draft continuations (root excluded); shared
                prefixes become shared nodes.
            scores: optional per-token acceptance estimates (see ``scores``),
                same ragged shape as ``sequences``; a node several sequences
                share keeps the largest.
            source: optional drafter index, one for all or one per sequence.
        """
        tokens, parents, est, srcs = [root], [-1], [1.0], [-1]
        children: dict[tuple[int, int], int] = {}
        for s, seq in enumerate(sequences):
            node = 0
            src = source if source is None or isinstance(source, int) else source[s]
            for d, tok in enumerate(seq):
                key = (node, int(tok))
                child = children.get(key)
                score = float(scores[s][d]) if scores is not None else 0.0
                if child is None:
                    child = len(tokens)
                    children[key] = child
                    tokens.append(int(tok))
                    parents.append(node)
                    est.append(score)
                    srcs.append(-1 if src is None else int(src))
                else:
                    est[child] = max(est[child], score)
                node = child
        return cls(
            torch.tensor(tokens),
            torch.tensor(parents),
            scores=torch.tensor(est) if scores is not None else None,
            sources=torch.tensor(srcs) if source is not None else None,
        )

    def merge(self, other: "TokenTree") -> "TokenTree":
        """Fuse two trees with the same root: the union of their nodes, as a trie.

        A node of ``other`` whose parent maps to a node of ``self`` with the same
        token becomes that node (``sources`` and ``draft_probs`` of ``self`` win,
        ``scores`` take the larger estimate); auxiliary nodes are never merged
        with anything. Every per-node field survives: a field only one tree has
        is filled for the other's nodes (scores 1: a drafter without estimates
        asks for its nodes to be verified; sources -1; auxiliary False;
        input_embeds zeros; draft_probs a point mass at the node's own token,
        which is exactly a deterministic drafter's q).
        """
        if int(self.tokens[0]) != int(other.tokens[0]):
            raise ValueError("only trees with the same root token can be merged")
        index = {(p, t): i for i, (p, t, a) in enumerate(zip(self.parents.tolist(), self.tokens.tolist(), self._aux_list())) if i and not a}
        mapping = [0]
        tokens, parents = self.tokens.tolist(), self.parents.tolist()
        fresh: list[int] = []  # nodes of other appended to the union
        for i, (p, t, a) in enumerate(zip(other.parents.tolist(), other.tokens.tolist(), other._aux_list())):
            if i == 0:
                continue
            parent = mapping[p]
            hit = None if a else index.get((parent, t))
            if hit is None:
                hit = len(tokens)
                tokens.append(t)
                parents.append(parent)
                fresh.append(i)
                if not a:
                    index[(parent, t)] = hit
            mapping.append(hit)
        fields = {name: _merge_field(name, self, other, torch.tensor(mapping), fresh, tokens) for name in _NODE_FIELDS}
        return TokenTree(torch.tensor(tokens), torch.tensor(parents), **fields)

    def subtree(self, keep: Tensor) -> "TokenTree":
        """The tree of nodes ``keep`` ([K] long, sorted, containing 0 and every kept node's parent)."""
        keep = torch.as_tensor(keep, dtype=torch.long)
        new_index = torch.full((len(self),), -1, dtype=torch.long)
        new_index[keep] = torch.arange(keep.numel())
        parents = torch.where(self.parents[keep] >= 0, new_index[self.parents[keep].clamp(min=0)], -1)
        if bool((parents[1:] < 0).any()) or int(keep[0]) != 0:
            raise ValueError("subtree needs the root and every kept node's parent")
        fields = {name: (getattr(self, name)[keep] if getattr(self, name) is not None else None) for name in _NODE_FIELDS}
        return TokenTree(self.tokens[keep], parents, **fields)

    def _aux_list(self) -> list[bool]:
        return self.auxiliary.tolist() if self.auxiliary is not None else [False] * len(self)

    # ------------------------------------------------------------------ derived
    def __len__(self) -> int:
        return self.tokens.numel()

    @property
    def num_drafts(self) -> int:
        """Draft nodes: all but the root and the auxiliary nodes."""
        aux = 0 if self.auxiliary is None else int(self.auxiliary.sum())
        return len(self) - 1 - aux

    @cached_property
    def ancestor_mask(self) -> Tensor:
        """[N, N] bool: ``mask[i, j]`` is True iff j is i or an ancestor of i.

        Computed by pointer doubling: start from {self, parent}, then square
        the reachability matrix until it stops growing (log2(depth) products).
        """
        n = len(self)
        mask = torch.eye(n, dtype=torch.bool)
        if n > 1:
            mask[torch.arange(1, n), self.parents[1:]] = True
        m = mask.float()
        while True:
            nxt = (m @ m) > 0
            if torch.equal(nxt, m > 0):
                return nxt
            m = nxt.float()

    @cached_property
    def depths(self) -> Tensor:
        """[N] long: number of edges from the root (root = 0)."""
        return self.ancestor_mask.sum(dim=1) - 1

    def position_ids(self, prefix_len: int) -> Tensor:
        """[N] long: absolute positions, ``prefix_len + depth``."""
        return self.depths + prefix_len

    @cached_property
    def is_leaf(self) -> Tensor:
        """[N] bool: nodes that are nobody's parent."""
        leaf = torch.ones(len(self), dtype=torch.bool)
        leaf[self.parents[1:]] = False
        return leaf

    @cached_property
    def leaf_paths(self) -> Tensor:
        """[L, max_depth + 1] long: node indices root→leaf, one row per leaf, padded with -1."""
        leaves = torch.nonzero(self.is_leaf).flatten()
        anc = self.ancestor_mask[leaves]  # [L, N]
        rows, cols = torch.nonzero(anc, as_tuple=True)
        out = torch.full((leaves.numel(), int(self.depths.max()) + 1), -1, dtype=torch.long)
        out[rows, self.depths[cols]] = cols
        return out

    def leaf_path_list(self) -> list[Tensor]:
        """Leaf paths as a list of unpadded index tensors."""
        return [row[row >= 0] for row in self.leaf_paths]

    @cached_property
    def children(self) -> list[list[int]]:
        """``children[i]``: node indices whose parent is i, in index order (auxiliary nodes included)."""
        kids: list[list[int]] = [[] for _ in range(len(self))]
        for i, p in enumerate(self.parents.tolist()[1:], start=1):
            kids[p].append(i)
        return kids

    @cached_property
    def token_paths(self) -> list[tuple[int, ...]]:
        """``token_paths[i]``: the draft tokens from the root down to node i (root excluded; ``()`` for the root)."""
        paths: list[tuple[int, ...]] = [()]
        for i, (p, t) in enumerate(zip(self.parents.tolist()[1:], self.tokens.tolist()[1:]), start=1):
            paths.append(paths[p] + (t,))
        return paths

    def path_to(self, node: int) -> Tensor:
        """[depth(node) + 1] long: node indices from the root to ``node``."""
        nodes = torch.nonzero(self.ancestor_mask[node]).flatten()
        return nodes[torch.argsort(self.depths[nodes])]


def parents_from_paths(paths: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Turn path tuples (the Medusa / vLLM tree format) into tree structure.

    Each path is a tuple of child choices, e.g. ``(0, 1)`` = "second choice
    below the first choice of the root". Every prefix of a path must also be a
    path (that is what makes it a tree). Nodes come out sorted by (depth, path),
    so parents precede children.

    Returns:
        parents: [1 + len(paths)] long, with the root at index 0.
        choices: [1 + len(paths)] long, each node's choice index among its
            siblings (the k of the top-k it stands for); -1 for the root.
    """
    ordered = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
    index = {(): 0}
    parents, choices = [-1], [-1]
    for p in ordered:
        if len(p) == 0:
            continue
        if p[:-1] not in index:
            raise ValueError(f"path {p} has no parent path {p[:-1]}")
        index[p] = len(parents)
        parents.append(index[p[:-1]])
        choices.append(p[-1])
    return torch.tensor(parents), torch.tensor(choices)


def _merge_field(name: str, a: TokenTree, b: TokenTree, mapping: Tensor, fresh: list[int], tokens: list[int]) -> Tensor | None:
    """One per-node field of ``a.merge(b)``: a's values, then the values of b's appended nodes (see merge)."""
    va, vb = getattr(a, name), getattr(b, name)
    if va is None and vb is None:
        return None
    ref = va if va is not None else vb
    n = len(tokens)
    if ref.dim() == 2:  # draft_probs [N, V] (missing rows: point masses) or input_embeds [N, H] (missing rows: zeros)
        out = torch.zeros(n, ref.shape[1], dtype=ref.dtype)
        if name == "draft_probs":
            out[torch.arange(n), torch.tensor(tokens)] = 1.0
    else:
        out = torch.full((n,), {"scores": 1.0, "sources": -1, "auxiliary": False}[name], dtype=ref.dtype)
    if va is not None:
        out[: len(a)] = va
    if vb is not None:
        if fresh:
            out[mapping[fresh]] = vb[fresh]
        if name == "scores":  # a node both trees proposed keeps the larger estimate
            shared = mapping[1:] < len(a)
            out[mapping[1:][shared]] = torch.maximum(out[mapping[1:][shared]], vb[1:][shared])
    if name == "scores":
        out[0] = 1.0
    return out
