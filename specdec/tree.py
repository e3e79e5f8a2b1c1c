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


@dataclass(eq=False)
class TokenTree:
    """A tree of draft tokens rooted at the last committed token.

    Attributes:
        tokens: [N] long, token id of each node; ``tokens[0]`` is the root.
        parents: [N] long, parent index of each node; ``parents[0] == -1``.
        draft_logprobs: optional [N] float, log q(token | ancestors) under the
            drafter that proposed the node (0 for the root and for
            deterministic drafters). Speculative sampling needs it.
        draft_probs: optional [N, V] float, the drafter's full distribution q at
            each node's *parent* position, for drafters that have one; lets the
            sampler form the exact residual max(p - q, 0).
        sources: optional [N] long, index of the drafter that proposed each node
            (fused trees); -1 for the root.
        auxiliary: optional [N] bool, nodes that ride along in the forward pass
            (e.g. PPD prompt tokens) but are never accepted and never committed.
    """

    tokens: Tensor
    parents: Tensor
    draft_logprobs: Tensor | None = None
    draft_probs: Tensor | None = None
    sources: Tensor | None = None
    auxiliary: Tensor | None = None

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
        for name in ("draft_logprobs", "sources", "auxiliary"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"{name} has {value.shape[0]} entries for {n} nodes")

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
        logprobs: Sequence[Sequence[float]] | None = None,
        source: int | Sequence[int] | None = None,
    ) -> "TokenTree":
        """Merge candidate continuations of ``root`` into a trie.

        Args:
            root: the last committed token.
            sequences: candidate draft continuations (root excluded); shared
                prefixes become shared nodes.
            logprobs: optional per-token draft log-probabilities, same ragged
                shape as ``sequences``; the first sequence to create a node
                sets its value.
            source: optional drafter index, one for all or one per sequence.
        """
        tokens, parents, lps, srcs = [root], [-1], [0.0], [-1]
        children: dict[tuple[int, int], int] = {}
        for s, seq in enumerate(sequences):
            node = 0
            src = source if source is None or isinstance(source, int) else source[s]
            for d, tok in enumerate(seq):
                key = (node, int(tok))
                child = children.get(key)
                if child is None:
                    child = len(tokens)
                    children[key] = child
                    tokens.append(int(tok))
                    parents.append(node)
                    lps.append(float(logprobs[s][d]) if logprobs is not None else 0.0)
                    srcs.append(-1 if src is None else int(src))
                node = child
        return cls(
            torch.tensor(tokens),
            torch.tensor(parents),
            draft_logprobs=torch.tensor(lps) if logprobs is not None else None,
            sources=torch.tensor(srcs) if source is not None else None,
        )

    def merge(self, other: "TokenTree") -> "TokenTree":
        """Fuse two trees with the same root: the union of their paths, as a trie."""
        if int(self.tokens[0]) != int(other.tokens[0]):
            raise ValueError("only trees with the same root token can be merged")
        seqs, lps, srcs = [], [], []
        for tree in (self, other):
            for path in tree.leaf_path_list():
                nodes = path[1:]
                seqs.append(tree.tokens[nodes].tolist())
                lp = tree.draft_logprobs
                lps.append(lp[nodes].tolist() if lp is not None else [0.0] * len(nodes))
                srcs.append(int(tree.sources[nodes[-1]]) if tree.sources is not None and len(nodes) else -1)
        return TokenTree.from_sequences(int(self.tokens[0]), seqs, logprobs=lps, source=srcs)

    # ------------------------------------------------------------------ derived
    def __len__(self) -> int:
        return self.tokens.numel()

    @property
    def num_drafts(self) -> int:
        return len(self) - 1

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
