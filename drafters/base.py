"""The drafter interface and the registry that builds drafters from spec strings.

A drafter proposes a :class:`~specdec.tree.TokenTree` rooted at the last
committed token, and hears back what the target accepted. Spec strings name a
registered drafter and its options::

    prompt-lookup                          defaults
    prompt-lookup:max_ngram=4,num_tokens=8 keyword options
    medusa:PATH                            one positional argument (a path)
    medusa+prompt-lookup                   several drafters fused into one tree
    none                                   no drafting: plain decoding

The options parse into the drafter's config dataclass, so a typo is an error
that names the valid options, raised before any model work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from specdec.tree import TokenTree

__all__ = ["DraftState", "StepResult", "Drafter", "NoDrafter", "register_drafter", "build_drafter", "registered_drafters", "parse_spec"]


@dataclass
class DraftState:
    """What a drafter sees before a step.

    Attributes:
        token_ids: [T] long, all committed tokens (prompt + generated); the
            last one is the root of the tree to propose.
        prompt_len: how many of ``token_ids`` are the prompt.
        hidden_states: [A, H] target last-layer hidden states at the nodes
            accepted in the previous step (the prefill's last position on the
            first step); the last row is the state that predicted the root.
            None unless the drafter sets ``needs_hidden_states``.
    """

    token_ids: Tensor
    prompt_len: int
    hidden_states: Tensor | None = None

    @property
    def root(self) -> int:
        return int(self.token_ids[-1])


@dataclass
class StepResult:
    """What a drafter hears after a step: the tree, what was accepted, what was emitted."""

    tree: TokenTree
    path: Tensor  # [A + 1] accepted node indices, root first
    new_tokens: list[int]  # accepted drafts + bonus, after any truncation at a stop
    hidden_states: Tensor | None = None  # [A + 1, H] at the accepted nodes


class Drafter:
    """Base class. Subclasses implement :meth:`propose`; the rest is optional.

    Class attributes:
        name: the registry name.
        needs_hidden_states: ask the engine for the target's last hidden states.
        vocab_size: the vocabulary the drafter was built for (None: any).
    """

    name: str = "drafter"
    needs_hidden_states: bool = False
    vocab_size: int | None = None

    def bind(self, model, tokenizer=None) -> None:
        """Check the drafter fits ``model``; called once before generation."""
        target_vocab = model.get_output_embeddings().weight.shape[0]
        if self.vocab_size is not None and self.vocab_size != target_vocab:
            raise ValueError(
                f"drafter {self.name!r} was built for a vocabulary of {self.vocab_size} tokens, "
                f"but the target model has {target_vocab}; use a drafter trained for this model"
            )

    def reset(self, prompt_ids: Tensor) -> None:
        """Start a new generation for ``prompt_ids`` ([T] long)."""

    def propose(self, state: DraftState) -> TokenTree:
        raise NotImplementedError

    def observe(self, result: StepResult) -> None:
        """Feedback after verification (acceptance statistics, adaptive sizes)."""


class NoDrafter(Drafter):
    """Drafts nothing: every step is one plain decoding step (a baseline)."""

    name = "none"

    def propose(self, state: DraftState) -> TokenTree:
        return TokenTree.root_only(state.root)


_REGISTRY: dict[str, Callable[..., Drafter]] = {}


def register_drafter(name: str) -> Callable:
    """Class decorator: make a drafter buildable from spec strings ``name[:options]``."""

    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


register_drafter("none")(NoDrafter)


def registered_drafters() -> list[str]:
    return sorted(_REGISTRY)


def parse_spec(spec: str) -> tuple[str, list[str], dict[str, str]]:
    """Split ``name:opt`` into (name, positional args, keyword options)."""
    name, _, rest = spec.strip().partition(":")
    args, kwargs = [], {}
    if rest:
        for part in rest.split(","):
            key, eq, value = part.partition("=")
            if eq:
                kwargs[key.strip()] = value.strip()
            else:
                args.append(part)
    return name.strip(), args, kwargs


def build_drafter(spec: "str | Drafter | None") -> Drafter:
    """Build a drafter from a spec string (or pass an instance through)."""
    if spec is None:
        return NoDrafter()
    if isinstance(spec, Drafter):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"drafter must be a spec string or a Drafter, not {type(spec).__name__}")
    _import_builtin_drafters()
    if "+" in spec:
        from specdec.drafters.fused import FusedDrafter

        return FusedDrafter([build_drafter(part) for part in spec.split("+")])
    name, args, kwargs = parse_spec(spec)
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown drafter {name!r} in spec {spec!r}; registered drafters: {', '.join(registered_drafters())}")
    if hasattr(factory, "from_spec"):
        return factory.from_spec(args, kwargs)
    if args or kwargs:
        raise ValueError(f"drafter {name!r} takes no options (got {spec!r})")
    return factory()


def config_from_options(cls, kwargs: dict[str, str], spec_name: str) -> Any:
    """Parse string options into the dataclass ``cls``; a bad name or value is an error naming the valid ones."""
    from specdec.config import options_into

    return options_into(cls, kwargs, what=f"option for drafter {spec_name!r}:")


def _import_builtin_drafters() -> None:
    # Importing the modules registers them.
    from specdec.drafters import medusa, prompt_lookup  # noqa: F401
