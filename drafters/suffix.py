"""Suffix drafter: drafts from the current context and from earlier outputs, and learns as it goes.

After SuffixDecoding (Oliaro et al., 2024-2025): a workload that repeats
itself (agents, templated answers, code edits) is its own best draft source.
Spec ``suffix[:key=value,...]``. Two sources each step:

* **the live context** (prompt + what was generated so far): the longest suffix
  n-gram that occurred before, and the continuations after its occurrences
  (prompt lookup's matching, :func:`~specdec.drafters.prompt_lookup.find_candidates`);
* **earlier outputs**: every finished generation of this drafter is added to an
  index over all of them (a suffix array, :class:`~specdec.datastore.Datastore`,
  rebuilt when a generation ends: milliseconds for a million tokens), where the
  longest matching suffix is looked up as in REST.

Continuations are counted into tries (how often each continuation followed:
SuffixDecoding's frequency scores), scored by learnt acceptance estimates per
(source, match length, depth, frequency), and merged; the engine trims the
tree to what pays. The draft length follows the match length
(``length_per_span`` tokens per matched token, up to ``max_length``), as
SuffixDecoding's adaptive speculation length does.

To learn across prompts, keep one drafter: pass the same instance to every
``specdec.generate`` call (``build_drafter("suffix")``), or use the bench's
``--reuse-drafter``. Its store (outputs, index, acceptance rates) is the shared
part: every session of it (each row of a batch, each request of
``specdec serve``) drafts from it, and each finished sequence joins it
(``close``), so what one row learns serves all the others. ``store=PATH`` keeps the outputs in a file across
processes (at most ``max_tokens``; the oldest outputs are evicted first).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from specdec.drafters.base import DraftState, Drafter, StepResult, Target, config_from_options, register_drafter
from specdec.drafters.prompt_lookup import find_candidates
from specdec.drafters.trie import count_prefixes, frequency_prior, scored_tree, span_bucket
from specdec.sizing import AcceptanceRates, learn
from specdec.tree import TokenTree

__all__ = ["SuffixConfig", "SuffixDrafter"]


@dataclass
class SuffixConfig:
    """Options (spec ``suffix:key=value,...``).

    Attributes:
        max_span: longest suffix matched (live context and earlier outputs).
        min_span: shortest match worth drafting from.
        matches: occurrences whose continuations are counted, per source.
        length_per_span: draft tokens per matched token (SuffixDecoding's alpha).
        max_length: longest continuation.
        max_nodes: candidates kept per source (the engine trims further).
        store: a file that keeps earlier outputs across processes ("" for none).
        max_tokens: the most tokens of earlier outputs kept (oldest evicted first).
        decay: weight of the past in the running acceptance estimates.
    """

    max_span: int = 16
    min_span: int = 1
    matches: int = 32
    length_per_span: float = 4.0
    max_length: int = 16
    max_nodes: int = 48
    store: str = ""
    max_tokens: int = 1_000_000
    decay: float = 0.9

    def __post_init__(self) -> None:
        if not 1 <= self.min_span <= self.max_span:
            raise ValueError(f"need 1 <= min_span <= max_span, got min_span={self.min_span}, max_span={self.max_span}")
        if self.matches < 1 or self.max_length < 1 or self.max_nodes < 2 or self.length_per_span <= 0 or self.max_tokens < 1:
            raise ValueError("matches, max_length, max_tokens and length_per_span must be positive and max_nodes >= 2")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")


class _Store:
    """What a suffix drafter learns across requests: earlier outputs, their index and the acceptance rates.
    One per drafter; every session (:meth:`SuffixDrafter.spawn`, one per row or request) shares it."""

    def __init__(self, config: SuffixConfig) -> None:
        self.config = config
        self.outputs: list[list[int]] = []  # earlier generations' outputs, oldest first
        self.rates = AcceptanceRates(frequency_prior, config.decay)  # kept across generations: it learns the workload
        self.index = None
        self.dirty = False
        self.vocab = 0
        if config.store and Path(config.store).is_file():
            self.outputs = _read_store(Path(config.store))
            self.dirty = bool(self.outputs)

    def add(self, tokens: list[int]) -> None:
        self.outputs.append(list(tokens))
        total = sum(map(len, self.outputs))
        while total > self.config.max_tokens and len(self.outputs) > 1:
            total -= len(self.outputs.pop(0))
        self.dirty = True
        if self.config.store:
            _write_store(Path(self.config.store), self.outputs)

    def current_index(self):
        if self.dirty:
            from specdec.datastore import Datastore

            vocab = max(self.vocab, 1 + max((max(o) for o in self.outputs if o), default=0))
            self.index = Datastore.from_documents(self.outputs, vocab) if self.outputs else None
            self.dirty = False
        return self.index


@register_drafter("suffix")
class SuffixDrafter(Drafter):
    """Drafts from the live context and from an index over earlier outputs (of every session of this drafter)."""

    name = "suffix"
    shared_state = ("store",)
    session_options = ("max_span", "min_span", "matches", "length_per_span", "max_length", "max_nodes")

    def __init__(self, config: SuffixConfig | None = None) -> None:
        self.config = config or SuffixConfig()
        self.store = _Store(self.config)
        self._keys: dict = {}

    @property
    def outputs(self) -> list[list[int]]:
        return self.store.outputs

    @property
    def rates(self) -> AcceptanceRates:
        return self.store.rates

    @classmethod
    def from_spec(cls, args: list[str], kwargs: dict[str, str]) -> "SuffixDrafter":
        if args:
            raise ValueError(f"suffix takes key=value options only, got {args}")
        return cls(config_from_options(SuffixConfig, kwargs, cls.name))

    def bind(self, target: Target) -> None:
        super().bind(target)
        self.store.vocab = target.vocab_size

    # ------------------------------------------------------------------ the store of earlier outputs
    def reset(self, prompt_ids: Tensor) -> None:
        self._keys = {}

    def close(self, output_ids: list[int]) -> None:
        """The sequence's output joins the shared store (every later session drafts from it)."""
        if output_ids:
            self.store.add(output_ids)

    def add_output(self, tokens: list[int]) -> None:
        """Index an output (earlier outputs beyond ``max_tokens`` are evicted, oldest first)."""
        self.store.add(tokens)

    # ------------------------------------------------------------------ drafting
    def _length(self, span: int) -> int:
        return max(1, min(self.config.max_length, int(round(self.config.length_per_span * span))))

    def propose(self, state: DraftState) -> TokenTree:
        c = self.config
        ids = state.token_ids
        trees, self._keys = [], {}
        n = _longest_repeat(ids, c.max_span, c.min_span)  # the live context
        if n:
            conts = find_candidates(ids, n, self._length(n), c.matches)
            if conts:
                trees.append(self._tree(state.root, conts, ("live", span_bucket(n))))
        index = self.store.current_index()
        if index is not None:  # earlier outputs
            span, lo, hi = index.longest_match(ids[-c.max_span :].numpy(), c.max_span, c.min_span)
            conts = index.continuations(span, lo, hi, c.matches, self._length(span)) if span else []
            if conts:
                trees.append(self._tree(state.root, conts, ("earlier", span_bucket(span))))
        if not trees:
            return TokenTree.root_only(state.root)
        tree = trees[0]
        for other in trees[1:]:
            tree = tree.merge(other)
        return tree

    def _tree(self, root: int, conts: list[list[int]], situation: tuple) -> TokenTree:
        tree, keys = scored_tree(root, count_prefixes(conts), len(conts), self.rates, situation, self.config.max_nodes)
        for path, key in keys.items():
            self._keys.setdefault(path, key)
        return tree

    def observe(self, result: StepResult) -> None:
        if self._keys:
            learn(self.rates, self._keys, result.tree, result.path)


def _longest_repeat(ids: Tensor, max_n: int, min_n: int) -> int:
    """The largest n <= max_n whose last-n-gram of ``ids`` occurred earlier (0 if not even ``min_n``).

    If the last n tokens occurred before, so did the last n - 1: a binary search over n.
    """
    a, b, best = min_n, min(max_n, ids.numel() - 1), 0
    while a <= b:
        n = (a + b) // 2
        if bool((ids[:-1].unfold(0, n, 1) == ids[-n:]).all(dim=1).any()):
            best, a = n, n + 1
        else:
            b = n - 1
    return best


def _read_store(path: Path) -> list[list[int]]:
    try:
        with np.load(path) as data:
            tokens, offsets = data["tokens"], data["offsets"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"could not read the suffix store {path} (damaged?): {err}") from None
    return [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


def _write_store(path: Path, outputs: list[list[int]]) -> None:
    """Atomically: a kill mid-write leaves the previous store."""
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [len(o) for o in outputs])
    tokens = np.array([t for o in outputs for t in o], dtype=np.int64)
    fd, tmp = tempfile.mkstemp(prefix=".suffix-", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, tokens=tokens, offsets=offsets)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
