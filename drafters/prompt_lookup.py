"""Prompt lookup: draft by copying what followed earlier occurrences of the last n-gram.

The idea is Saxena's prompt lookup decoding (2023), also HF's
``prompt_lookup_num_tokens``: outputs that edit, summarise or quote their
input repeat long spans of it, so the continuation of an earlier match of the
last few tokens is a cheap, often correct draft.

Differences from HF's version:

* several matches give several candidate continuations, merged into one tree;
* the draft length adapts. For each match size n we keep running estimates
  of ``r[n][d]`` = P(draft token at depth d accepted | depth d - 1 accepted),
  so the expected number of accepted tokens of a draft cut at depth L is
  ``G(L) = sum_{d<=L} prod(r[n][:d])``. A verifying forward over N nodes
  costs ``1 + fixed_cost + cost_per_token * N`` plain decode steps, so the
  draft is cut at the L that maximises ``(1 + G(L)) / (1 + fixed_cost +
  cost_per_token * N(L))``, and nothing is drafted (a plain step) when no L
  beats 1. Measured on this CPU with the default model (fp32, 2 threads):
  one node costs 1 step, two nodes ~1.5 steps (MKL leaves its fast
  matrix-vector path), then ~0.02 step per extra node up to 32; hence the
  defaults ``fixed_cost=0.45``, ``cost_per_token=0.02``. On a GPU a small
  tree costs almost nothing more than one token: use ``fixed_cost=0``.
  Where a match size stops paying, it probes again with a single-token draft
  every ``probe_every`` matches, so its estimate can recover.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.drafters.base import DraftState, Drafter, StepResult, config_from_options, register_drafter
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
        adaptive: cut drafts by the running acceptance estimates (see module doc).
        fixed_cost: extra cost of any drafted forward, in decode steps.
        cost_per_token: cost of one extra tree node, in decode steps.
        prior: starting estimate of each per-depth acceptance rate.
        decay: weight of the past in the running estimates (0..1).
        probe_every: while a match size is switched off, draft one token every this many matches.
    """

    max_ngram: int = 3
    min_ngram: int = 1
    num_tokens: int = 10
    max_candidates: int = 3
    adaptive: bool = True
    fixed_cost: float = 0.45
    cost_per_token: float = 0.02
    prior: float = 0.6
    decay: float = 0.9
    probe_every: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={self.min_ngram}, max_ngram={self.max_ngram}")
        if self.num_tokens < 1 or self.max_candidates < 1:
            raise ValueError("num_tokens and max_candidates must be at least 1")
        if not 0.0 <= self.decay < 1.0 or not 0.0 < self.prior <= 1.0:
            raise ValueError("decay must be in [0, 1) and prior in (0, 1]")


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
    """n-gram copy drafter over prompt + generated text, with adaptive draft length."""

    name = "prompt-lookup"

    def __init__(self, config: PromptLookupConfig | None = None) -> None:
        self.config = config or PromptLookupConfig()
        self.reset(torch.empty(0, dtype=torch.long))

    @classmethod
    def from_spec(cls, args: list[str], kwargs: dict[str, str]) -> "PromptLookupDrafter":
        if args:
            raise ValueError(f"prompt-lookup takes key=value options only, got {args}")
        return cls(config_from_options(PromptLookupConfig, kwargs, cls.name))

    def reset(self, prompt_ids: Tensor) -> None:
        c = self.config
        # rates[n][d]: running P(depth d + 1 accepted | depth d accepted), per match size n.
        self.rates = {n: torch.full((c.num_tokens,), c.prior) for n in range(c.min_ngram, c.max_ngram + 1)}
        self.skipped = {n: 0 for n in self.rates}
        self._last_n: int | None = None

    def _cut(self, n: int, cands: list[list[int]]) -> int:
        """Draft depth for match size n under the gain/cost rule (0: draft nothing)."""
        c = self.config
        if not c.adaptive:
            return c.num_tokens
        gain = torch.cumsum(torch.cumprod(self.rates[n], 0), 0)  # [num_tokens] G(L)
        best, best_ratio = 0, 1.0
        for depth in range(1, max(len(x) for x in cands) + 1):
            nodes = len({tuple(x[:d]) for x in cands for d in range(1, min(depth, len(x)) + 1)})
            ratio = (1.0 + float(gain[depth - 1])) / (1.0 + c.fixed_cost + c.cost_per_token * nodes)
            if ratio > best_ratio:
                best, best_ratio = depth, ratio
        if best == 0:
            self.skipped[n] += 1
            if self.skipped[n] >= c.probe_every:
                self.skipped[n] = 0
                return 1
        return best

    def propose(self, state: DraftState) -> TokenTree:
        c = self.config
        self._last_n = None
        for n in range(c.max_ngram, c.min_ngram - 1, -1):
            cands = find_candidates(state.token_ids, n, c.num_tokens, c.max_candidates)
            if cands:
                depth = self._cut(n, cands)
                if depth == 0:
                    break
                self._last_n = n
                return TokenTree.from_sequences(state.root, [x[:depth] for x in cands])
        return TokenTree.root_only(state.root)

    def observe(self, result: StepResult) -> None:
        n = self._last_n
        if n is None or result.tree.num_drafts == 0:
            return
        c = self.config
        accepted = result.path.numel() - 1
        drafted = int(result.tree.depths.max())
        # Depths 0..accepted-1 were accepted; depth `accepted` (if drafted) was the first rejection.
        seen = min(accepted + 1, drafted)
        hits = torch.zeros(seen)
        hits[:accepted] = 1.0
        self.rates[n][:seen] = c.decay * self.rates[n][:seen] + (1 - c.decay) * hits
