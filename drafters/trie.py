"""Counted continuations → a scored draft tree (shared by the REST and suffix drafters).

Retrieval gives several continuations of the current context. Counting every
prefix of them gives, for each candidate node, how often its path followed
the match; ``count(node) / count(parent)`` is the retrieval's own estimate of
P(node | parent accepted). The drafters keep running corrections of that
estimate per situation (:class:`~specdec.sizing.AcceptanceRates` keyed by
match length, depth and frequency bucket), because how far a corpus's
statistics carry over to this model's output is something only the target's
verdicts tell.

Example: continuations [a b c], [a b d], [a e] →
counts a: 3, ab: 2, abc: 1, abd: 1, ae: 1 → conditional frequencies
a: 3/3, b: 2/3, c: 1/2, d: 1/2, e: 1/3.
"""

from __future__ import annotations

from typing import Hashable

from specdec.sizing import AcceptanceRates
from specdec.tree import TokenTree

__all__ = ["count_prefixes", "scored_tree", "FREQ_BUCKETS", "span_bucket", "depth_bucket", "freq_bucket", "frequency_prior"]

FREQ_BUCKETS = (0.2, 0.5, 0.8)  # conditional frequency below 0.2 / 0.5 / 0.8 / up to 1
_FREQ_MIDS = (0.1, 0.35, 0.65, 0.9)


def count_prefixes(continuations: list[list[int]]) -> dict[tuple[int, ...], int]:
    """How many continuations start with each prefix (root excluded)."""
    counts: dict[tuple[int, ...], int] = {}
    for cont in continuations:
        for d in range(1, len(cont) + 1):
            key = tuple(cont[:d])
            counts[key] = counts.get(key, 0) + 1
    return counts


def span_bucket(span: int) -> int:
    return 0 if span <= 1 else 1 if span == 2 else 2 if span <= 4 else 3 if span <= 8 else 4


def depth_bucket(depth: int) -> int:
    return min(depth, 5)


def freq_bucket(freq: float, bounds: tuple[float, ...] = FREQ_BUCKETS) -> int:
    """The index of the bucket ``freq`` falls in (``bounds``: the lower edges of buckets 1, 2, ...)."""
    return sum(freq >= b for b in bounds)


def frequency_prior(key: tuple) -> float:
    """Prior of a key whose last element is a frequency bucket: that bucket's middle, a little discounted."""
    return 0.8 * _FREQ_MIDS[key[-1]]


def scored_tree(root: int, counts: dict[tuple[int, ...], int], total: int, rates: AcceptanceRates, situation: tuple,
                max_nodes: int) -> tuple[TokenTree, dict[tuple[int, ...], Hashable]]:
    """The ``max_nodes`` most frequent prefixes as a tree, each node scored by the learnt rates of its situation.

    Args:
        counts: prefix → count (from :func:`count_prefixes`, possibly summed over sources).
        total: the number of continuations (the root's count).
        situation: the leading part of every key (e.g. the match-length bucket).

    Returns:
        (tree, keys): the tree, and each node's key (``situation + (depth bucket, frequency bucket)``) by token path,
        for :func:`specdec.sizing.learn`.
    """
    # more frequent first; a prefix is never less frequent than its extensions, so the kept set is a tree
    kept = sorted(counts, key=lambda p: (-counts[p], len(p)))[: max(0, max_nodes - 1)]
    keys: dict[tuple[int, ...], Hashable] = {}
    score: dict[tuple[int, ...], float] = {(): 1.0}
    for path in sorted(kept, key=len):
        parent = path[:-1]
        if parent not in score:
            continue
        freq = counts[path] / (counts[parent] if parent else total)
        key = situation + (depth_bucket(len(path)), freq_bucket(freq))
        keys[path] = key
        score[path] = score[parent] * rates[key]
    parents = {p[:-1] for p in keys}
    seqs = sorted(p for p in keys if p not in parents)  # the leaves: their prefixes are the rest of the tree
    tree = TokenTree.from_sequences(root, seqs, scores=[[score[s[:d]] for d in range(1, len(s) + 1)] for s in seqs])
    return tree, keys
