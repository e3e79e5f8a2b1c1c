"""Hardware-aware tree sizing: verify the draft nodes that pay on this machine, and no more.

This generalises PPD's hardware-aware tree (Chen et al. 2024) and Sequoia's
budgeted trees to every drafter. A drafter proposes a candidate tree whose
nodes carry ``scores``: its estimate that the node will be accepted (that the
whole path from the root to it matches the target). The tokens a step emits
are the accepted drafts plus one, so a tree that keeps the node set S emits

    E[tokens] = 1 + Σ_{i ∈ S} score_i

and costs ``v(|S| + 1)`` plain steps (the measured profile,
:mod:`specdec.profile`). The engine keeps the S that maximises
``E[tokens] / v(|S| + 1)``. Scores shrink along every path (a node cannot be
accepted without its parent), so for each size k the best S is the k
highest-scoring nodes, which always form a tree; one sort and one cumulative
sum try every k. k = 0 (a plain step) wins when no tree pays.

Worked example: scores [1 (root), .6, .3, .1] on a chain, v = {1: 1, 2: 1.1,
3: 1.15, 4: 1.3}: ratios 1/1, 1.6/1.1 = 1.45, 1.9/1.15 = 1.65, 2.0/1.3 = 1.54
→ keep the root and the first two drafts.

Drafters estimate scores from what they saw accepted before:
:class:`AcceptanceRates` keeps running P(node accepted | parent accepted) per
drafter-defined key (for example depth and rank), and :func:`judged_nodes`
says which nodes of a verified tree the target actually judged.
"""

from __future__ import annotations

import bisect
from typing import Callable, Hashable

import torch
from torch import Tensor

from specdec.tree import TokenTree

__all__ = ["best_size", "best_of_sorted", "cap", "descending", "trim", "trim_batch", "AcceptanceRates", "judged_nodes", "monotone_scores", "learn", "nodes_cost"]


def nodes_cost(cost: Callable[[int], float] | None, max_nodes: int = 64) -> bool:
    """Whether a forward's cost grows with its nodes under ``cost`` (None, or a flat cost such as a node
    budget's, says no: a drafter then has no reason to stop drafting early for the sake of the forward)."""
    return cost is not None and cost(max_nodes) > cost(1)


def monotone_scores(tree: TokenTree) -> Tensor:
    """[N] scores with each node's capped by its parent's (root 1; auxiliary nodes 0)."""
    s = tree.scores.to(torch.float64).clone()
    s[0] = 1.0
    if tree.auxiliary is not None:
        s[tree.auxiliary] = 0.0
    depth = tree.depths
    for d in range(1, int(depth.max()) + 1 if len(tree) > 1 else 1):
        at = torch.nonzero(depth == d).flatten()
        s[at] = torch.minimum(s[at], s[tree.parents[at]])
    return s


def best_size(scores: Tensor | list[float], cost: Callable[[int], float], max_nodes: int) -> tuple[int, float]:
    """How many of the best drafts to keep: the k maximising (1 + sum of the k best scores) / cost(k + 1).

    Args:
        scores: [M] acceptance estimates of the candidate draft nodes (root excluded), any order.
        cost: v(n), the cost of a forward over n nodes in plain steps.
        max_nodes: the most nodes a forward may hold (root included).

    Returns:
        (k, expected tokens per unit of cost at that k).
    """
    return best_of_sorted(descending(scores, max_nodes - 1), cost)


def descending(scores: Tensor | list[float], limit: int) -> list[float]:
    """The ``limit`` highest of ``scores`` (a tensor or a list), highest first, as float64 Python numbers."""
    values = scores.tolist() if isinstance(scores, Tensor) else list(scores)
    return sorted(values, reverse=True)[: max(0, limit)]


def best_of_sorted(top: list[float], cost: Callable[[int], float]) -> tuple[int, float]:
    """:func:`best_size` over scores already sorted highest first (the first k of them are the kept drafts).

    A drafter asks this once per depth on every step, over at most a few dozen scores, so it runs in plain
    Python floats (float64, like the sum it stands for): tensor calls would cost more than the arithmetic."""
    best_k, best, total = 0, 1.0 / cost(1), 0.0
    for k, score in enumerate(top, 1):
        total += score
        ratio = (1.0 + total) / cost(k + 1)
        if ratio > best:
            best_k, best = k, ratio
    return best_k, best


def trim(tree: TokenTree, cost: Callable[[int], float], max_nodes: int = 64) -> TokenTree:
    """Keep the root and the draft nodes that maximise expected tokens per unit of cost (see module doc).

    Auxiliary nodes (PPD prompt tokens) are kept exactly when the draft node they
    hang below is kept, and they count in the cost of the forward (not in its gain).
    A tree without ``scores`` is returned as it is.
    """
    if tree.scores is None or len(tree) == 1:
        return tree
    plan = _Candidates(tree, max_nodes)
    k, _ = best_size(plan.scores, lambda n: cost(plan.sizes[n - 1]), len(plan.sizes))
    return plan.keep(k)


def cap(tree: TokenTree, max_nodes: int) -> TokenTree:
    """At most ``max_nodes`` nodes, whatever the tree: a scored tree keeps its best drafts that fit (and their
    auxiliary nodes), an unscored one its first nodes (parents come before children, so any prefix is a tree)."""
    if len(tree) <= max_nodes:
        return tree
    if tree.scores is not None:
        plan = _Candidates(tree, max_nodes)
        return plan.keep(plan.fits(max_nodes))
    return tree.subtree(torch.arange(max(1, max_nodes)))


def trim_batch(trees: list[TokenTree], cost: Callable[[int], float], max_nodes: int = 64,
               batch_cost: Callable[[int, int], float] | None = None) -> list[TokenTree]:
    """Size the trees of a batch together: one forward holds every row's tree padded to the largest.

    A batched step over B rows with trees padded to n nodes costs ``batch_cost(B, n)`` (the profile measured
    over rows × nodes, :class:`~specdec.profile.BatchCostProfile`; without one, ``cost(B·n)``: B·n rows of
    one sequence, extrapolated past the profile's last point), and emits Σ_b (1 + the kept scores of
    row b). For every common size n each row keeps its best drafts that fit in n; the n with the most
    expected tokens per unit of cost wins (n = 1: a plain batched step). With one row this is :func:`trim`.
    Rows whose trees carry no scores keep them whole, and n is at least their size.
    """
    if len(trees) == 1 and batch_cost is None:
        return [trim(trees[0], cost, max_nodes)]
    rows = len(trees)
    step_cost = (lambda n: batch_cost(rows, n)) if batch_cost is not None else (lambda n: cost(rows * n))
    plans = [_Candidates(t, max_nodes) if t.scores is not None and len(t) > 1 else None for t in trees]
    floor = max(len(t) if p is None else p.sizes[0] for t, p in zip(trees, plans))  # every row keeps at least its root
    top = max([floor] + [p.sizes[-1] for p in plans if p is not None])
    best_n, best_ratio = floor, -1.0
    for n in range(floor, top + 1):
        gain = sum(p.gain_within(n) if p is not None else 1.0 for p in plans)
        ratio = gain / step_cost(n)
        if ratio > best_ratio + 1e-12:
            best_n, best_ratio = n, ratio
    return [t if p is None else p.keep(p.fits(best_n)) for t, p in zip(trees, plans)]


class _Candidates:
    """One tree's draft nodes in the order they are worth keeping, with the forward size after each.

    Attributes:
        order: draft node indices (auxiliary nodes excluded), best first; every prefix is ancestor-closed.
        scores: [len(sizes) - 1] float64 monotone scores of ``order``'s nodes that fit in ``max_nodes``.
        sizes: sizes[k] = nodes in the forward when the k best drafts (and their auxiliary nodes) are kept.
    """

    def __init__(self, tree: TokenTree, max_nodes: int) -> None:
        self.tree = tree
        s = monotone_scores(tree)
        drafts = torch.arange(1, len(tree))
        aux = tree.auxiliary
        self.owner = None
        if aux is not None:
            drafts = drafts[~aux[1:]]
            self.owner = _aux_owner(tree)  # [N]: the draft node (or root) each auxiliary node hangs below
        # ties go to the lower index, which is always the parent: every prefix of this order is ancestor-closed
        self.order = sorted(drafts.tolist(), key=lambda i: (-float(s[i]), i))
        extra = [0] * len(tree)  # auxiliary nodes that come with each node
        if self.owner is not None:
            for node in torch.nonzero(aux).flatten().tolist():
                extra[int(self.owner[node])] += 1
        self.sizes = [1 + extra[0]]
        for i in self.order:
            if self.sizes[-1] + 1 + extra[i] > max_nodes:
                break
            self.sizes.append(self.sizes[-1] + 1 + extra[i])
        self.scores = s[self.order[: len(self.sizes) - 1]]
        self._gains = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(self.scores, 0)]) + 1.0

    def fits(self, n: int) -> int:
        """The most drafts whose forward fits in n nodes (0 when even the root's does not)."""
        return max(0, bisect.bisect_right(self.sizes, n) - 1)  # sizes increase strictly

    def gain_within(self, n: int) -> float:
        """Expected tokens emitted when the row's tree is cut to n nodes."""
        return float(self._gains[self.fits(n)])

    def keep(self, k: int) -> TokenTree:
        """The subtree of the root, the k best drafts and their auxiliary nodes."""
        keep = torch.zeros(len(self.tree), dtype=torch.bool)
        keep[0] = True
        keep[self.order[:k]] = True
        if self.owner is not None:
            keep |= self.tree.auxiliary & keep[self.owner]
        return self.tree.subtree(torch.nonzero(keep).flatten())


def _aux_owner(tree: TokenTree) -> Tensor:
    """[N] for each node, its nearest non-auxiliary ancestor-or-self."""
    owner = torch.arange(len(tree))
    aux = tree.auxiliary.tolist()
    parents = tree.parents.tolist()
    for i in range(1, len(tree)):  # parents come first, so a chain of auxiliary nodes resolves in one pass
        if aux[i]:
            owner[i] = owner[parents[i]]
    return owner


def judged_nodes(tree: TokenTree, path: Tensor) -> tuple[Tensor, Tensor]:
    """The draft nodes the target judged in a verified tree: children of accepted nodes.

    Returns:
        (nodes [M] long, accepted [M] bool). A child of the last accepted node
        that was rejected counts as tested and not accepted; nodes below a
        rejected node were never judged.
    """
    on_path = torch.zeros(len(tree), dtype=torch.bool)
    on_path[path] = True
    tested = on_path[tree.parents.clamp(min=0)]
    tested[0] = False
    if tree.auxiliary is not None:
        tested &= ~tree.auxiliary
    nodes = torch.nonzero(tested).flatten()
    return nodes, on_path[nodes]


class AcceptanceRates:
    """Running estimates of P(node accepted | parent accepted), one per key.

    Each key keeps discounted counts of hits and trials; the estimate is
    ``(hits + strength · prior) / (trials + strength)``: the prior until the
    target has judged a few such nodes, then mostly what it judged lately
    (each new verdict discounts the older ones by ``decay``).

    A key whose candidates were all trimmed away this step is not judged, so
    its estimate could never recover from a bad patch; :meth:`relax` lets its
    evidence fade (by ``forget`` per step) so the estimate drifts back toward
    the prior and the node is tried again now and then.

    Args:
        prior: the estimate before any verdict, a number or a function of the key.
        decay: discount of older verdicts at each new one (0..1).
        strength: how many verdicts the prior is worth.
        forget: fading of a key's evidence per step in which it was not tried.
    """

    def __init__(self, prior: float | Callable[[Hashable], float] = 0.5, decay: float = 0.9, strength: float = 2.0,
                 forget: float = 0.98) -> None:
        if not 0.0 <= decay < 1.0 or not 0.0 < forget <= 1.0 or strength <= 0:
            raise ValueError(f"need decay in [0, 1), forget in (0, 1] and strength > 0; got {decay}, {forget}, {strength}")
        self.prior, self.decay, self.strength, self.forget = prior, decay, strength, forget
        self.counts: dict[Hashable, tuple[float, float]] = {}

    def _prior(self, key: Hashable) -> float:
        return self.prior(key) if callable(self.prior) else float(self.prior)

    def __getitem__(self, key: Hashable) -> float:
        hits, trials = self.counts.get(key, (0.0, 0.0))
        return (hits + self.strength * self._prior(key)) / (trials + self.strength)

    def update(self, key: Hashable, accepted: bool) -> None:
        hits, trials = self.counts.get(key, (0.0, 0.0))
        self.counts[key] = (self.decay * hits + float(accepted), self.decay * trials + 1.0)

    def relax(self, key: Hashable) -> None:
        """Fade the evidence of a key that was not tried this step (see the class doc)."""
        if key in self.counts:
            hits, trials = self.counts[key]
            self.counts[key] = (hits * self.forget, trials * self.forget)

    def path_scores(self, parents: list[int], keys: list[Hashable]) -> list[float]:
        """Scores for a candidate tree in topological order: the product of rates along each path (root 1)."""
        scores = [1.0]
        for parent, key in zip(parents[1:], keys[1:]):
            scores.append(scores[parent] * self[key])
        return scores


def learn(rates: AcceptanceRates, keys: dict[tuple[int, ...], Hashable], tree: TokenTree, path: Tensor) -> None:
    """Update ``rates`` from a verified tree, for the nodes this drafter proposed.

    Args:
        keys: the drafter's last candidates, ``{token path from the root (root excluded): key}``.
        tree, path: the verified tree (trimmed, possibly fused with other drafters' nodes) and its accepted path.

    Nodes the target judged update their key's estimate; keys whose every
    candidate was trimmed away relax toward the prior (so a rate that fell too
    low to be drafted recovers now and then and is tested again).
    """
    nodes, hits = judged_nodes(tree, path)
    paths = tree.token_paths
    for node, hit in zip(nodes.tolist(), hits.tolist()):
        key = keys.get(paths[node])
        if key is not None:
            rates.update(key, hit)
    sent = {keys[p] for p in paths if p in keys}
    for key in set(keys.values()) - sent:
        rates.relax(key)
