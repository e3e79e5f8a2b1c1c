"""Exact greedy acceptance: output is token-for-token the target's greedy output."""

from __future__ import annotations

import torch
from torch import Tensor

from specdec.tree import TokenTree
from specdec.verifiers.base import Acceptance, deepest_accepted

__all__ = ["GreedyVerifier", "RelaxedGreedyVerifier", "greedy_accept"]


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


class RelaxedGreedyVerifier:
    """GAD's relaxed verification (Ge et al. 2022, "generalized aggressive decoding"): **lossy**, opt-in.

    A drafted token is accepted when it is among the target's ``top_beta`` most
    likely tokens at its parent and its logit is within ``tau`` of the top-1
    logit; the deepest node whose whole path passes wins and the bonus token is
    the argmax there. ``top_beta=1`` accepts only the argmax: exactly greedy.
    The output is then close to, but not always equal to, the greedy output; the
    paper reports quality within noise on translation for small β and τ.
    """

    def __init__(self, top_beta: int = 3, tau: float = 2.0) -> None:
        if top_beta < 1 or tau < 0:
            raise ValueError(f"need top_beta >= 1 and tau >= 0, got {top_beta}, {tau}")
        self.top_beta, self.tau = top_beta, tau

    def accept(self, tree: TokenTree, logits: Tensor, generator: torch.Generator | None = None, prefix_ids: Tensor | None = None) -> Acceptance:
        top = torch.topk(logits, self.top_beta, dim=-1)  # [N, beta]
        values, ids = top.values.cpu(), top.indices.cpu()  # the step's one device -> host transfer
        ok = torch.ones(len(tree), dtype=torch.bool)
        par, toks = tree.parents[1:], tree.tokens[1:]
        in_top = (ids[par] == toks[:, None])  # [N - 1, beta]
        close = values[par] >= values[par, :1] - self.tau
        ok[1:] = (in_top & close).any(dim=1)
        best = deepest_accepted(tree, ok)
        return Acceptance(path=tree.path_to(best), bonus=int(ids[best, 0]))
