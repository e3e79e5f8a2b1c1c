"""Exact greedy acceptance: output is token-for-token the target's greedy output."""

from __future__ import annotations

import torch
from torch import Tensor

from specdec.tree import TokenTree
from specdec.verifiers.base import Acceptance, deepest_accepted

__all__ = ["GreedyVerifier", "greedy_accept"]


def greedy_accept(tree: TokenTree, logits: Tensor) -> Acceptance:
    """Keep the longest tree path that the target's argmax agrees with.

    Node i > 0 is *correct* when its token is the target's argmax at its
    parent. A node is accepted when it and all its non-root ancestors are
    correct; the deepest accepted node wins (siblings carry distinct tokens,
    so at most one child of a node can be correct). The bonus token is the
    argmax at that node.

    Args:
        tree: N nodes; auxiliary nodes are never accepted.
        logits: [N, V] target logits per node, on any device (only the N argmax ids come to the host).

    Example: root r, children a (1) and b (2), a's child c (3); argmax =
    [a, c, x, y] → node 1 correct (a == argmax[0]), node 3 correct
    (c == argmax[1]), node 2 not → path [0, 1, 3], bonus = argmax[3] = y.
    """
    target_next = logits.argmax(dim=-1).cpu()  # [N]: the step's one device -> host transfer
    correct = torch.ones(len(tree), dtype=torch.bool)
    correct[1:] = tree.tokens[1:] == target_next[tree.parents[1:]]
    best = deepest_accepted(tree, correct)
    return Acceptance(path=tree.path_to(best), bonus=int(target_next[best]))


class GreedyVerifier:
    """The default verifier (``acceptance="exact"`` at temperature 0)."""

    def accept(self, tree: TokenTree, logits: Tensor, generator: torch.Generator | None = None, prefix_ids: Tensor | None = None) -> Acceptance:
        return greedy_accept(tree, logits)
