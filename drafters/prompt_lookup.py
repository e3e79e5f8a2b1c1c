"""Prompt lookup: draft by copying what followed earlier occurrences of the last n-gram.

The idea is Saxena's prompt lookup decoding (2023), also HF's
``prompt_lookup_num_tokens``: outputs that edit, summarise or quote their
input repeat long spans of it, so the continuation of an earlier match of the
last few tokens is a cheap, often correct draft.

Differences from HF's version:

* several matches give several candidate continuations, merged into one tree;
* every node carries a score, the estimated probability that it is accepted,
  and the engine trims the tree to the size that pays on this machine
  (:mod:`specdec.sizing`, from the measured cost of a forward over n nodes):
  short or no drafts where copying has not been working, long ones where it has.
  The estimates are running averages of P(node accepted | parent accepted)
  per (match size n, depth, candidate rank), learnt from the target's verdicts
  (:class:`~specdec.sizing.AcceptanceRates`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.drafters.base import DraftState, Drafter, StepResult, config_from_options, register_drafter
from specdec.sizing import AcceptanceRates, learn
from specdec.tree import TokenTree

__all__ = ["PromptLookupConfig", "PromptLookupDrafter", "find_candidates"]


@dataclass
class PromptLookupConfig:
    """Options (spec ``prompt-lookup:key=value,...``).

    Attributes:
        max_ngram: longest suffix n-gram to match (tried first).
        min_ngram: shortest suffix n-gram to match.
        num_tokens: longest draft per candidate.
        max_candidates: distinct continuations merged into the tree.
        adaptive: score nodes by learnt acceptance rates so the engine sizes
            the tree; False proposes every candidate in full (no trimming).
        prior_first: starting estimate of P(first draft token accepted) for the
            most recent match (scaled by n / max_ngram: longer matches are surer).
        prior_next: starting estimate of P(next token accepted | previous accepted).
        decay: weight of the past in the running estimates (0..1).
    """

    max_ngram: int = 3
    min_ngram: int = 1
    num_tokens: int = 10
    max_candidates: int = 3
    adaptive: bool = True
    prior_first: float = 0.5
    prior_next: float = 0.8
    decay: float = 0.9

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={self.min_ngram}, max_ngram={self.max_ngram}")
        if self.num_tokens < 1 or self.max_candidates < 1:
            raise ValueError("num_tokens and max_candidates must be at least 1")
        if not 0.0 <= self.decay < 1.0 or not 0.0 < self.prior_first <= 1.0 or not 0.0 < self.prior_next <= 1.0:
            raise ValueError("decay must be in [0, 1), prior_first and prior_next in (0, 1]")


def find_candidates(ids: Tensor, n: int, num_tokens: int, max_candidates: int) -> list[list[int]]:
    """Continuations of earlier occurrences of the last ``n`` tokens of ``ids``.

    Args:
        ids: [T] long, the committed sequence.
        n: n-gram size.
        num_tokens: at most this many tokens per continuation.
        max_candidates: at most this many distinct continuations, most recent match first.

    Example: ids = [5, 6, 7, 5, 6, 9, 5, 6], n = 2 → matches of [5, 6] at
    positions 3 and 0 → continuations [[9, 5, 6], [7, 5, 6, 9, 5, 6]] (cut to num_tokens).
    """
    t = ids.numel()
    if t <= n:
        return []
    windows = ids[: t - 1].unfold(0, n, 1)  # [T - n, n]; the window ending at the last token is excluded
    starts = torch.nonzero((windows == ids[t - n :]).all(dim=1)).flatten().flip(0) + n
    out: list[list[int]] = []
    for s in starts.tolist():
        cont = ids[s : s + num_tokens].tolist()
        if cont and not any(c[: len(cont)] == cont for c in out):
            out.append(cont)
            if len(out) == max_candidates:
                break
    return out


@register_drafter("prompt-lookup")
class PromptLookupDrafter(Drafter):
    """n-gram copy drafter over prompt + generated text; nodes scored by learnt acceptance rates."""

    name = "prompt-lookup"
    stateless = True  # matches in the context each step; its acceptance statistics may skip a step
    session_options = ("max_ngram", "min_ngram", "num_tokens", "max_candidates", "adaptive", "prior_first", "prior_next", "decay")

    def __init__(self, config: PromptLookupConfig | None = None) -> None:
        self.config = config or PromptLookupConfig()
        self.reset(torch.empty(0, dtype=torch.long))

    @classmethod
    def from_spec(cls, args: list[str], kwargs: dict[str, str]) -> "PromptLookupDrafter":
        if args:
            raise ValueError(f"prompt-lookup takes key=value options only, got {args}")
        return cls(config_from_options(PromptLookupConfig, kwargs, cls.name))

    def _prior(self, key: tuple[int, int, int]) -> float:
        """Key (n, depth, rank): the first token of the newest match is the uncertain one; later ranks are less likely."""
        n, depth, rank = key
        c = self.config
        base = c.prior_first * n / c.max_ngram if depth == 1 else c.prior_next
        return base * 0.5**rank

    def reset(self, prompt_ids: Tensor) -> None:
        self.rates = AcceptanceRates(self._prior, self.config.decay)
        self._keys: dict[tuple[int, ...], tuple[int, int, int]] = {}

    def propose(self, state: DraftState) -> TokenTree:
        c = self.config
        found: list[tuple[int, int, list[int]]] = []  # (n, rank, continuation)
        for n in range(c.max_ngram, c.min_ngram - 1, -1):
            cands = find_candidates(state.token_ids, n, c.num_tokens, c.max_candidates)
            found += [(n, rank, cand) for rank, cand in enumerate(cands)]
            if found:  # the longest matching size only (drafting from every size measured no better)
                break
        self._keys = {}
        if not found:
            return TokenTree.root_only(state.root)
        return self._scored_tree(state.root, found)

    def _scored_tree(self, root: int, found: list[tuple[int, int, list[int]]]) -> TokenTree:
        """The trie of the candidates; each node's key is (n, depth, rank) of the first candidate that made it."""
        keys: dict[tuple[int, ...], tuple[int, int, int]] = {}
        for n, rank, cand in found:
            for d in range(1, len(cand) + 1):
                keys.setdefault(tuple(cand[:d]), (n, min(d, 8), min(rank, 2)))
        self._keys = keys
        cands = [cand for _, _, cand in found]
        if not self.config.adaptive:
            return TokenTree.from_sequences(root, cands)
        scores = [[self._path_score(tuple(c[:d]), keys) for d in range(1, len(c) + 1)] for c in cands]
        return TokenTree.from_sequences(root, cands, scores=scores)

    def _path_score(self, path: tuple[int, ...], keys: dict) -> float:
        score = 1.0
        for d in range(1, len(path) + 1):
            score *= self.rates[keys[path[:d]]]
        return score

    def observe(self, result: StepResult) -> None:
        if self._keys:
            learn(self.rates, self._keys, result.tree, result.path)
