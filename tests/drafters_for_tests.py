"""Drafters used only by tests: one that always matches, one that never does."""

import torch

from specdec.drafters.base import Drafter
from specdec.tree import TokenTree


class OracleDrafter(Drafter):
    """Self-drafting: proposes the next k tokens of a known greedy continuation (all accepted),
    plus a wrong sibling branch at every step, so acceptance must pick the right branch."""

    name = "oracle"

    def __init__(self, prompt_len: int, reference: list[int], k: int = 4):
        self.prompt_len, self.reference, self.k = prompt_len, reference, k

    def propose(self, state):
        done = state.token_ids.numel() - self.prompt_len
        good = self.reference[done : done + self.k]
        wrong = [(good[0] + 1) % 50] if good else []
        return TokenTree.from_sequences(state.root, [wrong, good] if good else [])


class RandomDrafter(Drafter):
    """Proposes a random branching tree: (almost) nothing is ever accepted."""

    name = "random"

    def __init__(self, vocab: int, seed: int = 0):
        self.vocab, self.g = vocab, torch.Generator().manual_seed(seed)

    def propose(self, state):
        seqs = torch.randint(0, self.vocab, (3, 4), generator=self.g).tolist()
        return TokenTree.from_sequences(state.root, seqs)
