"""Fusing drafters: several drafters propose, their trees merge into one, the target verifies once.

Spec: ``medusa+prompt-lookup`` (any registered specs joined by ``+``). Each
node remembers which drafter proposed it (``TokenTree.sources``; the first
drafter wins a node both proposed). After verification each drafter hears
about its own tree: the accepted tokens are walked down its tree as far as
they match, so adaptive drafters learn from their own hits only.
"""

from __future__ import annotations

import torch

from specdec.drafters.base import DraftState, Drafter, StepResult
from specdec.tree import TokenTree

__all__ = ["FusedDrafter"]


def _own_path(tree: TokenTree, accepted_tokens: list[int]) -> torch.Tensor:
    """[A' + 1] the path in ``tree`` that follows ``accepted_tokens`` as far as they match."""
    children: dict[tuple[int, int], int] = {}
    for i, (parent, tok) in enumerate(zip(tree.parents.tolist(), tree.tokens.tolist())):
        if i:
            children[(parent, tok)] = i
    node = 0
    for tok in accepted_tokens:
        nxt = children.get((node, tok))
        if nxt is None:
            break
        node = nxt
    return tree.path_to(node)


class FusedDrafter(Drafter):
    name = "fused"

    def __init__(self, drafters: list[Drafter]) -> None:
        if len(drafters) < 2:
            raise ValueError("fusing needs at least two drafters, e.g. 'medusa+prompt-lookup'")
        self.drafters = drafters
        self.needs_hidden_states = any(d.needs_hidden_states for d in drafters)
        self.name = "+".join(d.name for d in drafters)
        self._trees: list[TokenTree] = []

    def bind(self, model, tokenizer=None) -> None:
        for d in self.drafters:
            d.bind(model, tokenizer)

    def reset(self, prompt_ids) -> None:
        for d in self.drafters:
            d.reset(prompt_ids)

    def propose(self, state: DraftState) -> TokenTree:
        self._trees = [d.propose(state) for d in self.drafters]
        fused = None
        for i, tree in enumerate(self._trees):
            tagged = TokenTree(tree.tokens, tree.parents, sources=torch.full_like(tree.tokens, i))
            fused = tagged if fused is None else fused.merge(tagged)
        return fused

    def observe(self, result: StepResult) -> None:
        accepted = result.tree.tokens[result.path[1:]].tolist()
        for d, tree in zip(self.drafters, self._trees):
            path = _own_path(tree, accepted)
            hidden = result.hidden_states[: path.numel()] if result.hidden_states is not None else None
            d.observe(StepResult(tree, path, result.new_tokens, hidden))
