"""A separate autoregressive draft model (Leviathan et al. 2023; HF's ``assistant_model``).

Spec ``draft-model:PATH[,key=value...]``, PATH any HF causal LM directory or
.gguf file that shares the target's tokenizer (checked: same vocabulary size,
and the same tokenizer fingerprint where both have a tokenizer). The draft
model runs in its own :class:`~specdec.runner.TreeRunner` (its own KV cache,
its own fast kernels), kept in step with what the target accepted:

1. catch up: one forward over the committed tokens its cache lacks (the
   accepted drafts it already holds stay, the rest is rolled back);
2. draft a chain of up to ``k`` tokens, one small forward each (greedy; with
   ``sample=true``, drawn from its softmax with the run's generator, and the
   distributions go out as ``draft_probs`` so speculative sampling stays exact);
3. the chain length is chosen before drafting from the measured costs of both
   models: it maximises (1 + expected accepted) / (v(k + 1) + k · draft step /
   target step), with the expected acceptance per depth learnt from the
   target's verdicts; nodes carry those estimates as scores, so the engine may
   trim further.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.drafters.base import DraftState, Drafter, StepResult, Target, config_from_options, register_drafter
from specdec.sizing import AcceptanceRates, learn
from specdec.tree import TokenTree

__all__ = ["DraftModelConfig", "DraftModelDrafter"]


_SMALL_FEED = 8  # catch-up feeds up to this long are a step's accepted tokens; longer ones are prefills
_PROBE_EVERY = 16  # after this many steps the cost model said not to draft, draft one token to measure again


@dataclass
class DraftModelConfig:
    """Options (spec ``draft-model:PATH,key=value,...``).

    Attributes:
        k: the longest chain drafted in one step.
        sample: draw drafts from the draft model's distribution (for sampling runs) instead of its argmax.
        fast: run the draft model through the engine's fast kernels.
        prior: starting estimate of P(draft token accepted | its parent was).
        decay: weight of the past in the running acceptance estimates.
    """

    k: int = 6
    sample: bool = False
    fast: bool = True
    prior: float = 0.6
    decay: float = 0.9

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0.0 < self.prior <= 1.0 or not 0.0 <= self.decay < 1.0:
            raise ValueError("prior must be in (0, 1] and decay in [0, 1)")


@register_drafter("draft-model")
class DraftModelDrafter(Drafter):
    """Drafts a chain with a small model of the same tokenizer, in its own KV cache."""

    name = "draft-model"

    def __init__(self, model, tokenizer=None, config: DraftModelConfig | None = None) -> None:
        self.model, self.tokenizer = (model.eval() if model is not None else None), tokenizer  # None: set at bind (RAPID's self)
        self.config = config or DraftModelConfig()
        self.vocab_size = model.get_output_embeddings().weight.shape[0] if model is not None else None
        self.rates = AcceptanceRates(self.config.prior, self.config.decay)
        self.runner = None
        self._fast = None
        self._draft_ms = None  # running mean of one draft forward
        self._keys: dict = {}
        self._drafted = 0
        self._idle = 0

    @classmethod
    def from_spec(cls, args: list[str], kwargs: dict[str, str]) -> "DraftModelDrafter":
        from specdec.models import load_model

        if len(args) != 1:
            raise ValueError("draft-model needs the draft model's path: draft-model:PATH (an HF directory or a .gguf file)")
        config = config_from_options(DraftModelConfig, kwargs, cls.name)
        model, tokenizer = load_model(args[0])
        return cls(model, tokenizer, config)

    def bind(self, target: Target) -> None:
        super().bind(target)
        if self.tokenizer is not None and target.tokenizer is not None:
            from specdec.datastore import tokenizer_fingerprint

            if tokenizer_fingerprint(self.tokenizer) != tokenizer_fingerprint(target.tokenizer):
                raise ValueError("the draft model's tokenizer differs from the target's; a draft model must share the "
                                 "target's tokenizer (same vocabulary, same ids)")
        self.model.to(target.device)
        if self.config.fast and self._fast is None and isinstance(self.model, torch.nn.Module):
            from specdec.profile import fast_linears_for, get_profile

            profile = get_profile(self.model, fast=True, progress=False)
            self._fast = fast_linears_for(self.model, profile)
            if self._draft_ms is None:  # what a draft token costs before one is timed: the draft model's plain step
                self._draft_ms = profile.step_ms

    def reset(self, prompt_ids: Tensor) -> None:
        from specdec.runner import TreeRunner

        if self.runner is not None:
            self.runner.close()
        self.runner = TreeRunner(self.model, fast=self._fast, route=self.config.fast, lean=self.config.fast)
        self.rates = AcceptanceRates(self.config.prior, self.config.decay)
        self._held: list[int] = []  # the tokens whose KV the draft cache holds, in order
        self._keys = {}

    # ------------------------------------------------------------------ drafting
    def _chain_length(self) -> int:
        """k maximising (1 + expected accepted) / (cost of the verify forward + cost of drafting k tokens)."""
        t = self.target
        if t is None or t.cost is None:
            return self.config.k
        step_ms = getattr(t.cost, "step_ms", None) or t.step_ms  # at this prefix, where the cost knows it
        per_token = (self._draft_ms / step_ms) if (self._draft_ms and step_ms) else 0.1
        best, best_ratio, gain, p = 0, 1.0, 1.0, 1.0
        for k in range(1, self.config.k + 1):
            p *= self.rates[min(k, 4)]
            gain += p
            ratio = gain / (t.cost(k + 1) + k * per_token)
            if ratio > best_ratio:
                best, best_ratio = k, ratio
        return best

    def _context(self, state: DraftState) -> list[int]:
        """The token sequence the draft model continues, ending with the root (here: everything committed; RAPID
        drafts over a shortened prompt instead)."""
        return state.token_ids.tolist()

    @torch.inference_mode()
    def propose(self, state: DraftState) -> TokenTree:
        ids = self._context(state)
        self._keys = {}
        k = self._chain_length()
        if k == 0:
            self._idle += 1
            if self._idle < _PROBE_EVERY or not self._held:  # (a probe never pays for the draft cache's first prefill)
                self._drafted = 0
                return TokenTree.root_only(state.root)
            k = 1  # now and then one draft anyway: the costs and rates it measures may have changed
        self._idle = 0
        # 1. catch up: keep the held prefix that is still committed, feed the rest (the root last)
        keep = 0
        while keep < len(self._held) and keep < len(ids) - 1 and self._held[keep] == ids[keep]:
            keep += 1
        self.runner.rollback(keep)
        feed = ids[keep:]
        t0 = time.perf_counter()
        # the prompt (a prefill), or the committed tokens the cache lacks (appended causally), in the pieces the
        # runner's kernels run fastest
        out = self.runner.extend(torch.tensor(feed))
        self._held = ids[:]
        catch_up = time.perf_counter() - t0
        t0 = time.perf_counter()
        # 2. draft a chain
        tokens, probs, logits = [], [], out.logits[-1]
        for d in range(k):
            q = torch.softmax(logits.float(), -1)
            if self.config.sample:
                tok = int(torch.multinomial(q, 1, generator=self.target.generator))
            else:
                tok = int(torch.argmax(q))
            tokens.append(tok)
            probs.append(q)
            if d + 1 < k:
                logits = self.runner.forward(TokenTree.root_only(tok)).logits[-1]
                self._held.append(tok)
        chain = time.perf_counter() - t0
        if len(feed) <= _SMALL_FEED:  # a step's usual catch-up (the accepted tokens) counts about half a draft forward
            elapsed = (catch_up + chain) * 1e3 / (k + 0.5)
        else:  # a prefill (the prompt, or a re-fed context): a one-off, not what a draft token costs
            elapsed = chain * 1e3 / (k - 1) if k > 1 else None
        if elapsed is not None:
            self._draft_ms = elapsed if self._draft_ms is None else 0.8 * self._draft_ms + 0.2 * elapsed
        self._drafted = k
        scores, s = [1.0], 1.0
        for d in range(1, k + 1):
            s *= self.rates[min(d, 4)]
            scores.append(s)
            self._keys[tuple(tokens[:d])] = min(d, 4)
        tree = TokenTree(torch.tensor([state.root] + tokens), torch.arange(-1, k), scores=torch.tensor(scores))
        if self.config.sample:
            tree.draft_probs = torch.stack([probs[0]] + probs).cpu()
        return tree

    def observe(self, result: StepResult) -> None:
        if self._keys:
            learn(self.rates, self._keys, result.tree, result.path)

    def spawn(self) -> "DraftModelDrafter":
        """A session (see :meth:`Drafter.spawn`) with no runner yet: its ``reset`` opens its own (closing a
        runner it shared with the drafter it came from would take that sequence's cache away)."""
        session = super().spawn()
        session.runner = None
        return session

    def close(self, output_ids: list[int]) -> None:
        """The sequence ended: give the draft model back its own attention (its runner routed it to tree attention;
        with RAPID's ``self`` that model is the target, which the next plain HF call must find as it was)."""
        if self.runner is not None:
            self.runner.close()
            self.runner = None
