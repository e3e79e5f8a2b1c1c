"""REST: retrieval-based speculative decoding (He et al., 2024, "REST: Retrieval-Based Speculative Decoding").

Spec ``rest:DIR[,key=value...]``, DIR a datastore from ``specdec datastore build``
(:mod:`specdec.datastore`). Each step: the longest suffix of the context (up to
``max_span`` tokens, at least ``min_span``) is looked up in the datastore's
suffix array; up to ``matches`` occurrences give continuations of ``length``
tokens; their prefixes are counted into a trie, the most frequent kept
(:mod:`specdec.drafters.trie`), each node scored by a learnt estimate of its
acceptance, and the engine trims the tree to what pays on this machine. No
model, no training: drafting costs a few binary searches (the bench's
``--profile`` reports the draft time per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.drafters.base import DraftState, Drafter, StepResult, Target, config_from_options, register_drafter
from specdec.drafters.trie import count_prefixes, frequency_prior, scored_tree, span_bucket
from specdec.sizing import AcceptanceRates, learn
from specdec.tree import TokenTree

__all__ = ["RestConfig", "RestDrafter"]


@dataclass
class RestConfig:
    """Options (spec ``rest:DIR,key=value,...``).

    Attributes:
        max_span: longest context suffix looked up.
        min_span: shortest suffix worth drafting from.
        matches: occurrences whose continuations are counted (spread over all occurrences).
        length: tokens per continuation.
        max_nodes: most frequent prefixes kept as candidates (the engine trims further).
        decay: weight of the past in the running acceptance estimates.
    """

    max_span: int = 16
    min_span: int = 2
    matches: int = 64
    length: int = 10
    max_nodes: int = 48
    decay: float = 0.9

    def __post_init__(self) -> None:
        if not 1 <= self.min_span <= self.max_span:
            raise ValueError(f"need 1 <= min_span <= max_span, got min_span={self.min_span}, max_span={self.max_span}")
        if self.matches < 1 or self.length < 1 or self.max_nodes < 2:
            raise ValueError("matches and length must be >= 1 and max_nodes >= 2")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")


@register_drafter("rest")
class RestDrafter(Drafter):
    """Drafts the most frequent continuations of the longest context suffix found in a datastore."""

    name = "rest"

    def __init__(self, datastore, config: RestConfig | None = None) -> None:
        self.store, self.config = datastore, config or RestConfig()
        self.vocab_size = None
        self.reset(torch.empty(0, dtype=torch.long))

    @classmethod
    def from_spec(cls, args: list[str], kwargs: dict[str, str]) -> "RestDrafter":
        from specdec.datastore import Datastore

        if len(args) != 1:
            raise ValueError("rest needs a datastore directory: rest:DIR (build one with `specdec datastore build`)")
        return cls(Datastore.load(args[0]), config_from_options(RestConfig, kwargs, cls.name))

    def bind(self, target: Target) -> None:
        super().bind(target)
        from specdec.datastore import tokenizer_fingerprint

        manifest = self.store.manifest
        if target.tokenizer is not None and "tokenizer" in manifest and manifest["tokenizer"] != tokenizer_fingerprint(target.tokenizer):
            raise ValueError(f"datastore {self.store.path} was built with another tokenizer "
                             f"({manifest.get('tokenizer_name', '?')}); build one with this model's tokenizer")
        if manifest.get("vocab_size", 0) > target.vocab_size:
            raise ValueError(f"datastore {self.store.path} holds token ids up to {manifest['vocab_size']}, "
                             f"beyond this model's vocabulary of {target.vocab_size}")

    def reset(self, prompt_ids: Tensor) -> None:
        self.rates = AcceptanceRates(frequency_prior, self.config.decay)
        self._keys: dict = {}

    def propose(self, state: DraftState) -> TokenTree:
        c = self.config
        self._keys = {}
        context = state.token_ids[-c.max_span :].numpy()
        span, lo, hi = self.store.longest_match(context, c.max_span, c.min_span)
        conts = self.store.continuations(span, lo, hi, c.matches, c.length) if span else []
        if not conts:
            return TokenTree.root_only(state.root)
        tree, self._keys = scored_tree(state.root, count_prefixes(conts), len(conts), self.rates, (span_bucket(span),), c.max_nodes)
        return tree

    def observe(self, result: StepResult) -> None:
        if self._keys:
            learn(self.rates, self._keys, result.tree, result.path)
