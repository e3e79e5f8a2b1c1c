"""RAPID: retrieval-augmented speculative decoding for long inputs (Chen et al., 2025).

Spec ``rapid`` (the target's own weights draft: ``self``), ``rapid:PATH`` (a draft model of the target's
tokenizer: an HF directory or a .gguf file), with options ``chunk``, ``top_chunks``, ``head``, ``tail``,
``recent``, ``period``, ``min_accept`` and the draft model's (``k``, ``sample``, ``fast``, ``prior``, ``decay``).

The drafter is a language model run over a *shortened* context, so drafting stays cheap while the target
verifies against the whole of it:

1. **Chunking.** A prompt longer than ``head + tail + top_chunks * chunk`` tokens is cut into three parts: its
   first ``head`` tokens (the system prompt, the chat template's opening) and its last ``tail`` (the question
   and the template's assistant header) are always kept; the middle is split into chunks of ``chunk`` tokens.
   A shorter prompt is drafted over whole (the drafter is then a plain draft model).
2. **Retrieval.** The chunks are ranked by BM25 over token ids against a query made of the tail and the last
   ``recent`` generated tokens; the best ``top_chunks`` are kept, in their original order. Why BM25 over ids
   rather than the target's embeddings: it needs no forward pass (ranking 30 chunks of an 8K prompt takes well
   under a millisecond), no tokenizer round trip and no extra dependency, and the questions of long-input tasks
   (QA, extraction) name the words the answering chunk holds; a dense retriever would cost a forward over every
   chunk, more than the drafts it could save on a CPU.
3. **Drafting.** The draft model continues ``head + chunks + tail + output`` in its own KV cache (what
   :class:`~specdec.drafters.draft_model.DraftModelDrafter` does over the whole sequence): a chain whose length
   maximises expected accepted tokens per cost, nodes scored by learnt acceptance (so the engine can trim), and
   with ``sample=true`` the draft distributions as ``draft_probs`` (speculative sampling stays exact).
4. **Re-retrieval.** Every ``period`` steps, or sooner when the running acceptance of the first draft falls below
   ``min_accept``, the chunks are ranked again with the newest output in the query; when the chosen set changes,
   the draft cache rolls back to the first changed position and the rest is fed again (one forward over up to
   ``top_chunks * chunk + tail`` tokens plus the output: the price of a re-retrieval).

What the options cost: the draft model reads its own weights once per drafted token, with attention over
``head + top_chunks * chunk + tail`` positions plus the output instead of the whole prompt; a larger
``top_chunks`` or ``chunk`` raises acceptance where the answer spans chunks and makes every draft token and every
re-retrieval dearer; a shorter ``period`` follows the output more closely and pays a re-feed each time the
chosen chunks change.

Output never changes: the target verifies every draft (exact greedy or speculative sampling). RAPID's optional
"knowledge transfer", which does change the output, is the lossy acceptance ``acceptance="rapid"``
(:mod:`specdec.verify`), never part of this drafter.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.drafters.base import DraftState, Target, config_from_options, register_drafter
from specdec.drafters.draft_model import DraftModelConfig, DraftModelDrafter

__all__ = ["RapidConfig", "RapidDrafter", "BM25", "split_prompt", "line_breaks"]


@dataclass
class RapidConfig(DraftModelConfig):
    """Options (spec ``rapid[:PATH],key=value,...``); the draft model's own (``k``, ``sample``, ...) as in
    :class:`~specdec.drafters.draft_model.DraftModelConfig`.

    Attributes:
        chunk: tokens per chunk of the prompt's middle.
        top_chunks: chunks kept in the draft model's context.
        head: prompt tokens always kept at the start.
        tail: prompt tokens always kept at the end (the question).
        recent: generated tokens added to the retrieval query.
        period: steps between re-retrievals (0: retrieve once, at the start).
        min_accept: re-retrieve sooner when the running acceptance of the first draft falls below this.
        kv: where the short context's keys/values come from. ``recompute``: the draft model runs over the short
            context (RAPID as published; the only choice for a separate draft model). ``target``: with the
            target's own weights (``self``), the drafts attend to the target's own KV of the kept positions,
            gathered from its prompt cache (no draft prefill, a re-retrieval is a gather). ``auto`` (default):
            ``target`` for ``self``, else ``recompute``.
    """

    k: int = 4
    chunk: int = 256
    top_chunks: int = 4
    head: int = 32
    tail: int = 256
    recent: int = 64
    period: int = 32
    min_accept: float = 0.3
    kv: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv not in ("auto", "target", "recompute"):
            raise ValueError(f"kv must be auto, target or recompute, got {self.kv!r}")
        if self.chunk < 1 or self.top_chunks < 1 or self.head < 0 or self.tail < 1 or self.recent < 0 or self.period < 0:
            raise ValueError("rapid needs chunk, top_chunks, tail >= 1 and head, recent, period >= 0")
        if not 0.0 <= self.min_accept <= 1.0:
            raise ValueError(f"min_accept must be in [0, 1], got {self.min_accept}")


class BM25:
    """Okapi BM25 over token-id documents (k1 = 1.2, b = 0.75; idf floored at 0 by the +1 inside the log)."""

    def __init__(self, docs: list[list[int]], k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.tfs = [Counter(d) for d in docs]
        self.lengths = [len(d) for d in docs]
        self.avg = max(1.0, sum(self.lengths) / max(1, len(docs)))
        df = Counter(t for tf in self.tfs for t in tf)
        n = len(docs)
        self.idf = {t: math.log(1.0 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}

    def scores(self, query) -> list[float]:
        """Each document's score for the distinct tokens of ``query``."""
        terms = [t for t in set(query) if t in self.idf]
        out = []
        for tf, length in zip(self.tfs, self.lengths):
            norm = self.k1 * (1.0 - self.b + self.b * length / self.avg)
            out.append(sum(self.idf[t] * tf[t] * (self.k1 + 1.0) / (tf[t] + norm) for t in terms if t in tf))
        return out

    def top(self, query, k: int) -> list[int]:
        """The ``k`` best documents' indices, in document order (ties: the earlier document)."""
        s = self.scores(query)
        best = sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]
        return sorted(best)


def split_prompt(prompt: list[int], cfg: RapidConfig, breaks: frozenset[int] = frozenset()) -> tuple[list[int], list[list[int]], list[int]] | None:
    """(head, chunks of the middle, tail) of a prompt long enough to shorten, else None.

    Chunks are ``cfg.chunk`` tokens, except that a chunk ends after a line break (a token of ``breaks``) where one
    falls in its second half: paragraphs, list items and documents then stay whole more often, so the chunk a
    question matches holds the rest of its sentence too."""
    if len(prompt) <= cfg.head + cfg.tail + cfg.top_chunks * cfg.chunk:
        return None
    end = len(prompt) - cfg.tail
    chunks, start = [], cfg.head
    while start < end:
        stop = min(start + cfg.chunk, end)
        if stop < end and breaks:
            for j in range(stop, start + cfg.chunk // 2, -1):
                if prompt[j - 1] in breaks:
                    stop = j
                    break
        chunks.append(prompt[start:stop])
        start = stop
    return prompt[: cfg.head], chunks, prompt[end:]


_BREAKS: dict[tuple, frozenset[int]] = {}


def line_breaks(tokenizer) -> frozenset[int]:
    """The ids of ``tokenizer``'s tokens whose text holds a line break (computed once per tokenizer)."""
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    found = _BREAKS.get(key)
    if found is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        found = _BREAKS[key] = frozenset(i for i, t in enumerate(texts) if "\n" in t)
    return found


@register_drafter("rapid")
class RapidDrafter(DraftModelDrafter):
    """A draft model (the target itself by default) over the prompt's most relevant chunks."""

    name = "rapid"
    session_options = ("k", "top_chunks", "period", "min_accept")

    def __init__(self, model=None, tokenizer=None, config: RapidConfig | None = None) -> None:
        super().__init__(model, tokenizer, config or RapidConfig())  # model None: the target's own weights, at bind
        self._parts = None
        self._ranker = None
        self._chosen: list[int] = []
        self._short: list[int] = []
        self._prompt_len = 0
        self._since = 0
        self.retrievals = 0
        self._self = model is None  # the target's own weights draft (set at bind)
        self._prompt_kv = None
        self._positions: list[int] = []
        self._copied = 0  # with the target's KV: how many output entries after the prompt part are copies of its

    @classmethod
    def from_spec(cls, args: list[str], kwargs: dict[str, str]) -> "RapidDrafter":
        from specdec.models import load_model

        if len(args) > 1:
            raise ValueError("rapid takes at most one argument, the draft model: rapid (the target itself), rapid:self "
                             "or rapid:PATH (an HF directory or a .gguf file with the target's tokenizer)")
        config = config_from_options(RapidConfig, kwargs, cls.name)
        if not args or args[0] == "self":
            return cls(None, None, config)
        if config.kv == "target":
            raise ValueError("kv=target drafts with the target's own keys/values, which only the target's own weights "
                             "can read: use rapid (or rapid:self) with it, or kv=recompute with a draft model")
        model, tokenizer = load_model(args[0])
        return cls(model, tokenizer, config)

    def bind(self, target: Target) -> None:
        if self.model is None:  # self-drafting over the short context: the target's own weights
            self.model = target.model
        super().bind(target)

    def reset(self, prompt_ids: Tensor) -> None:
        super().reset(prompt_ids)
        self._prompt_kv = None
        self._copied = 0
        prompt = prompt_ids.tolist()
        self._prompt_len = len(prompt)
        tokenizer = getattr(getattr(self, "target", None), "tokenizer", None)
        self._parts = split_prompt(prompt, self.config, line_breaks(tokenizer) if tokenizer is not None else frozenset())
        self._chosen = []
        self._ranker = BM25(self._parts[1]) if self._parts else None
        if self._parts:
            self._retrieve([])

    # ------------------------------------------------------------------ retrieval
    def _retrieve(self, output: list[int]) -> None:
        head, chunks, tail = self._parts
        query = tail + output[-self.config.recent :] if self.config.recent else tail
        self._chosen = self._ranker.top(query, self.config.top_chunks)
        self._short = head + [t for i in self._chosen for t in chunks[i]] + tail  # rebuilt only when retrieved
        starts = [len(head)]
        for c in chunks:
            starts.append(starts[-1] + len(c))
        self._positions = (list(range(len(head))) + [p for i in self._chosen for p in range(starts[i], starts[i + 1])]
                           + list(range(self._prompt_len - len(tail), self._prompt_len)))
        self.retrievals += 1
        self._since = 0

    def short_context(self) -> list[int]:
        """The shortened prompt the draft model reads (a prompt long enough to shorten only)."""
        return self._short

    def _context(self, state: DraftState) -> list[int]:
        if self._parts is None:
            return state.token_ids.tolist()
        output = state.token_ids[self._prompt_len :].tolist()  # (not the whole long prompt, every step)
        due = self.config.period and self._since >= self.config.period
        poor = self._since >= max(4, self.config.period // 4) and self.rates[1] < self.config.min_accept
        if due or poor:
            self._retrieve(output[:-1])
        self._since += 1
        return self.short_context() + output

    # ------------------------------------------------------------------ the target's own KV (kv=target)
    def prompt_cache(self, cache) -> None:
        """Keep the target's prompt cache when drafting with its own KV (``kv=target`` or ``auto`` with ``self``)."""
        use = self._self and self.config.kv != "recompute"
        self._prompt_kv = cache if use and len(getattr(cache, "layers", ())) else None

    def _catch_up(self, ids: list[int], keep: int, state: DraftState | None = None):
        """With the target's own KV: the kept prompt positions are gathered from its prompt cache and the output's
        committed positions copied from its live cache (``DraftState.target_kv``): entries keep the rotary positions
        they were computed at, and only the root is fed, at its true position (then the chain)."""
        if self._prompt_kv is None:
            return super()._catch_up(ids, keep, state)
        positions = self._positions if self._parts is not None else list(range(self._prompt_len))
        n, added = len(positions), 0
        read = state.target_kv if state is not None else None
        if keep < n:  # the first proposal, or a re-retrieval changed the kept prompt positions
            self.runner.rollback(keep)
            self.runner.cache.append_from(self._prompt_kv, _ranges(positions[keep:n]))
            added, keep, self._copied = n - keep, n, 0
        if read is not None:  # the committed output before the root: the target's own entries, copied
            committed = len(ids) - 1 - n
            have = min(self._copied, committed)
            self.runner.rollback(n + have)  # (drops the last chain's own entries)
            if have < committed:
                self.runner.append_kv(*read(self._prompt_len + have, self._prompt_len + committed))
            self._copied, keep = committed, n + committed
        else:  # (a state built without the engine's reader: the output is fed)
            self.runner.rollback(keep)
        self.runner.position_shift = self._prompt_len - n
        feed = ids[keep:]
        return self.runner.extend(torch.tensor(feed)), added + len(feed)

    def close(self, output_ids: list[int]) -> None:
        self._prompt_kv = None
        super().close(output_ids)


def _ranges(positions: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive positions as (start, stop) pairs."""
    out: list[tuple[int, int]] = []
    for p in positions:
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out
