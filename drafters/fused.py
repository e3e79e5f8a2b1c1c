"""Fusing drafters: several drafters propose, their trees merge into one, the target verifies once.

Spec: ``medusa+prompt-lookup`` (any registered specs joined by ``+``). Each
node remembers which drafter proposed it (``TokenTree.sources``; the first
drafter wins a node both proposed) and keeps every per-node field (scores,
auxiliary flags, draft distributions; see :meth:`TokenTree.merge`). The
engine then trims the fused tree as a whole, so the node budget goes to
whichever drafter's nodes are likeliest to be accepted. After verification
every drafter hears the whole verified tree and learns from the nodes it
proposed.
"""

from __future__ import annotations

import dataclasses

import torch

from specdec.drafters.base import DraftState, Drafter, StepResult, Target
from specdec.tree import TokenTree

__all__ = ["FusedDrafter"]


class FusedDrafter(Drafter):
    name = "fused"

    def __init__(self, drafters: list[Drafter]) -> None:
        if len(drafters) < 2:
            raise ValueError("fusing needs at least two drafters, e.g. 'medusa+prompt-lookup'")
        self.drafters = drafters
        self.needs_hidden_states = any(d.needs_hidden_states for d in drafters)
        self.skippable = all(type(d).stateless or d.skippable for d in drafters)  # every part may miss a step
        layers: list[int] = []  # every layer some drafter reads, once; each drafter gets its own slice
        for d in drafters:
            if d.needs_hidden_states:
                layers += [x for x in d.hidden_layers if x not in layers]
        self.hidden_layers = tuple(layers) or (-1,)
        self.name = "+".join(d.name for d in drafters)

    def bind(self, target: Target) -> None:
        for d in self.drafters:
            d.bind(target)

    def reset(self, prompt_ids) -> None:
        for d in self.drafters:
            d.reset(prompt_ids)

    def prompt_cache(self, cache) -> None:
        for d in self.drafters:
            d.prompt_cache(cache)

    def propose(self, state: DraftState) -> TokenTree:
        fused = None
        self._heard = []  # the drafters that proposed this step (a deferring one may not)
        order = [i for i, d in enumerate(self.drafters) if not d.defers] + [i for i, d in enumerate(self.drafters) if d.defers]
        for i in order:
            d = self.drafters[i]
            if d.defers and fused is not None and len(fused) > 1:
                continue  # the others have drafts for this step: a deferring drafter keeps its cost
            fused = self._add(fused, i, state)
            self._heard.append(d)
        return fused

    def propose_stateless(self, state: DraftState) -> TokenTree | None:
        """The stateless members' fused tree (prompt lookup in ``eagle+prompt-lookup``), or None without one."""
        fused = None
        for i, d in enumerate(self.drafters):
            if type(d).stateless:
                fused = self._add(fused, i, state)
        return fused

    def _add(self, fused: TokenTree | None, i: int, state: DraftState) -> TokenTree:
        """``fused`` with member ``i``'s proposal merged in (its nodes marked as its own)."""
        d = self.drafters[i]
        tree = d.propose(self._state_for(d, state))
        tree.sources = torch.full_like(tree.tokens, i)
        return tree if fused is None else fused.merge(tree)

    def _state_for(self, d: Drafter, state: DraftState) -> DraftState:
        """The state with only the hidden-state layers ``d`` reads, in its order."""
        if not d.needs_hidden_states or state.hidden_states is None or tuple(d.hidden_layers) == self.hidden_layers:
            return state
        h = state.hidden_states.shape[-1] // len(self.hidden_layers)
        cols = [c for x in d.hidden_layers for c in range(self.hidden_layers.index(x) * h, (self.hidden_layers.index(x) + 1) * h)]
        return dataclasses.replace(state, hidden_states=state.hidden_states[..., cols])

    def observe(self, result: StepResult) -> None:
        for d in getattr(self, "_heard", self.drafters):
            d.observe(result)

    def close(self, output_ids: list[int]) -> None:
        for d in self.drafters:
            d.close(output_ids)

    def spawn(self) -> "FusedDrafter":
        return FusedDrafter([d.spawn() for d in self.drafters])
