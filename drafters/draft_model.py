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
   trim further;
4. and drafting is judged by what it returns: the wall time from a proposal to
   the verdict it hears (the drafting, the verifying forward, acceptance and
   commit) and the tokens the step emitted give tokens per second for the
   steps it drafted for and for those it did not (decayed sums kept across
   sequences). While
   drafted steps return fewer tokens per second, it drafts nothing (one chain
   every 16 steps keeps that figure fresh), and while they return more, one
   step in 16 goes without its drafts to keep the other fresh (unsized runs,
   ``size_trees=False``, draft every step in full). The cost model
   alone cannot see everything a step costs (the draft cache's bookkeeping,
   the verify forward's real price at this prefix on a loaded machine), and
   on a CPU a draft model's token costs a large share of the target's step,
   so a few percent of error decides whether drafting pays. In a fusion the
   steps it did not draft for are the other drafters' steps: it drafts only
   when it adds to what they return.
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


class _Yield:
    """Tokens per second of the steps a drafter drafted for (index 1) and of those it did not (index 0): the wall
    time from its proposal to the verdict it hears (drafting, the verifying forward, acceptance and commit) against
    the tokens the step emitted, as decayed sums. A step that carried one-off work (a draft cache's prefill) does
    not count. Only steps the drafter proposed for count, so in a fusion it compares its drafts with what the steps
    it is asked for return without them."""

    def __init__(self, decay: float = 0.85) -> None:
        self.decay = decay
        self.tokens = [0.0, 0.0]
        self.seconds = [0.0, 0.0]
        self.steps = [0, 0]
        self.last: tuple | None = None  # (start time, drafted, clean) of the proposal awaiting its verdict

    def begin(self, now: float, drafted: bool, clean: bool = True) -> None:
        self.last = (now, drafted, clean)

    def end(self, now: float, tokens: int) -> None:
        if self.last is not None:
            t0, drafted, clean = self.last
            if clean and now > t0:
                i = int(drafted)
                self.tokens[i] = self.decay * self.tokens[i] + tokens
                self.seconds[i] = self.decay * self.seconds[i] + (now - t0)
                self.steps[i] += 1
        self.last = None

    def rate(self, drafted: bool) -> float | None:
        i = int(drafted)
        return self.tokens[i] / self.seconds[i] if self.seconds[i] > 0 else None

    def loses(self) -> bool:
        """Whether drafted steps have returned fewer tokens per second than the others (False until both are known)."""
        with_drafts, without = self.rate(True), self.rate(False)
        return with_drafts is not None and without is not None and with_drafts < without


@register_drafter("draft-model")
class DraftModelDrafter(Drafter):
    """Drafts a chain with a small model of the same tokenizer, in its own KV cache. In a fusion it defers to the
    other drafters (:attr:`Drafter.defers`): its forwards cost a share of every step it drafts for."""

    name = "draft-model"
    defers = True
    shared_state = ("_yield",)  # what drafting returns on this machine: learnt across sequences

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
        self._streak = 0  # drafted steps since the last step without drafts
        self._probing = False
        self._yield = _Yield()

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
            self.runner.cache.release()  # its buffers serve the next cache
        self.runner = TreeRunner(self.model, fast=self._fast, route=self.config.fast, lean=self.config.fast)
        self.rates = AcceptanceRates(self.config.prior, self.config.decay)
        self._held: list[int] = []  # the tokens whose KV the draft cache holds, in order
        self._keys = {}
        self._streak = 0
        self._probing = False

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
        now = time.perf_counter()
        ids = self._context(state)
        self._keys = {}
        k = self._chain_length()
        if getattr(getattr(self, "target", None), "cost", None) is not None:  # (unsized runs draft every step in full)
            if self._probing:  # the second step of a probe: the first caught up on what the cache missed
                self._probing, k = False, max(k, 1)
            elif k and self._yield.loses():
                k = 0  # drafted steps have returned less than the others: the cost model misses something here
            elif k:
                self._streak += 1
                fresh = self._yield.steps[0] == 0 and self._yield.steps[1] >= 2  # nothing known yet of steps without
                if fresh or self._streak > _PROBE_EVERY:  # a step without drafts, to keep their figure fresh
                    self._streak = 0
                    self._drafted = 0
                    self._yield.begin(now, False)
                    return TokenTree.root_only(state.root)
        if k == 0:
            self._idle += 1
            if self._idle < _PROBE_EVERY or not self._held:  # (a probe never pays for the draft cache's first prefill)
                self._drafted = 0
                self._yield.begin(now, False)
                return TokenTree.root_only(state.root)
            k = 1  # now and then one draft anyway: the costs and rates it measures may have changed
            self._probing = True  # and the next step too: this one's catch-up is not what a drafted step costs
        self._idle = 0
        # 1. catch up: keep the held prefix that is still committed, feed the rest (the root last)
        keep = 0
        while keep < len(self._held) and keep < len(ids) - 1 and self._held[keep] == ids[keep]:
            keep += 1
        t0 = time.perf_counter()
        out, added = self._catch_up(ids, keep, state)
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
        self._yield.begin(now, True, added <= _SMALL_FEED)
        if added <= _SMALL_FEED:  # a step's usual catch-up (the accepted tokens) counts about half a draft forward
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

    def _catch_up(self, ids: list[int], keep: int, state: DraftState | None = None):
        """Bring the draft cache up to ``ids``, of which it holds the first ``keep`` (it is rolled back to them here):
        the prompt (a prefill) or the committed tokens it lacks, appended causally in the pieces the runner's
        kernels run fastest. Returns the forward's output (the last position's logits predict the first draft) and
        the number of entries added."""
        self.runner.rollback(keep)
        feed = ids[keep:]
        return self.runner.extend(torch.tensor(feed)), len(feed)

    def observe(self, result: StepResult) -> None:
        self._yield.end(time.perf_counter(), len(result.new_tokens))
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
            self.runner.cache.release()
            self.runner = None
