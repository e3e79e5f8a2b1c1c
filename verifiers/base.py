"""What every verifier returns, and the contract it follows.

Words used throughout (after vLLM's rejection sampler):

* **accepted** tokens: draft nodes the verifier keeps, on one root-to-node path;
* **recovered** token: drawn from the target in place of the first rejected
  draft (speculative sampling only);
* **bonus** token: the target's own next token after the last accepted node.
  Every step emits ``len(accepted) + 1`` tokens: the accepted drafts, then
  one bonus (or recovered) token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from specdec.tree import TokenTree

__all__ = ["Acceptance", "Verifier", "deepest_accepted"]


@dataclass
class Acceptance:
    """The outcome of verifying one tree.

    Attributes:
        path: [A + 1] long, node indices root→last accepted node; ``path[0] == 0``.
        bonus: the token emitted after the path (bonus or recovered token).
    """

    path: Tensor
    bonus: int

    @property
    def num_accepted(self) -> int:
        """Accepted draft tokens (root excluded)."""
        return self.path.numel() - 1

    def new_tokens(self, tree: TokenTree) -> list[int]:
        """The tokens this step emits: accepted drafts, then the bonus."""
        return tree.tokens[self.path[1:]].tolist() + [self.bonus]


class Verifier(Protocol):
    """``accept(tree, logits, generator, prefix_ids) -> Acceptance``; pure apart from the generator."""

    def accept(self, tree: TokenTree, logits: Tensor, generator: torch.Generator | None = None, prefix_ids: Tensor | None = None) -> Acceptance:
        """
        Args:
            tree: the verified tree (N nodes).
            logits: [N, V] target logits at every node (row i predicts the token after node i).
            generator: random source for sampling verifiers.
            prefix_ids: [T] committed tokens before the root (repetition penalty needs them).
        """
        ...


def deepest_accepted(tree: TokenTree, ok: Tensor) -> int:
    """The deepest node whose whole root path passes ``ok`` ([N] bool, host; the root counts as passing).

    Auxiliary nodes never pass. Ties between equally deep nodes go to the lower
    index (with distinct sibling tokens, greedy acceptance has no ties).
    """
    ok = ok.clone()
    ok[0] = True
    if tree.auxiliary is not None:
        ok &= ~tree.auxiliary
    whole = ~(tree.ancestor_mask & ~ok[None, :]).any(dim=1)  # [N] every node on the path passes
    return int(torch.argmax(torch.where(whole, tree.depths, -1)))
