"""Input-guided aggressive decoding (IAD; Ge et al., "Lossless Acceleration for Seq2seq Generation with
Aggressive Decoding", 2022).

For tasks whose output mostly repeats the input (grammar correction,
rewriting, simplification), the input itself is the draft: the output so far
is aligned to a position in the source, and the source's next tokens are
drafted. After a correction (the target's bonus token differs from the
source), the drafter **re-aligns** by the paper's rule: the shortest suffix
n-gram of the output that occurs at exactly one place in the source fixes
the new position. A suffix found at several places is ambiguous: a longer
suffix is tried; if the longest allowed is still ambiguous, the continuations
of the (at most ``max_alignments``) candidate positions go out as a small
tree; a suffix found nowhere means the output has left the source, and the
step drafts nothing until a suffix matches again.

The source is, by default, the content of the last user message inside the
prompt (found through the tokenizer's chat template; the whole prompt when
there is none). ``IADDrafter(source_text=...)``, the spec option
``iad:source_file=PATH`` or the CLI's ``--source-text`` set it explicitly.
Nodes are scored by learnt acceptance rates per depth, so the engine drafts
long runs where the output tracks the source and none where it does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from specdec.drafters.base import DraftState, Drafter, StepResult, Target, config_from_options, register_drafter
from specdec.sizing import AcceptanceRates, learn
from specdec.tree import TokenTree

__all__ = ["IADConfig", "IADDrafter", "align", "user_content_span"]


@dataclass
class IADConfig:
    """Options (spec ``iad:key=value,...``).

    Attributes:
        max_ngram: longest output suffix used to re-align.
        num_tokens: longest draft (the source's next tokens).
        max_alignments: candidate positions drafted as a tree when the alignment stays ambiguous.
        source_file: a text file whose content is the source ("" for the last user message).
        decay: weight of the past in the running acceptance estimates.
    """

    max_ngram: int = 8
    num_tokens: int = 24
    max_alignments: int = 3
    source_file: str = ""
    decay: float = 0.9

    def __post_init__(self) -> None:
        if self.max_ngram < 1 or self.num_tokens < 1 or self.max_alignments < 1:
            raise ValueError("max_ngram, num_tokens and max_alignments must be >= 1")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.source_file and not Path(self.source_file).is_file():
            raise FileNotFoundError(f"IAD source file {self.source_file} does not exist")


def align(source: list[int], index: dict[tuple[int, ...], list[int]], output: list[int], max_ngram: int) -> tuple[str, list[int]]:
    """Where the output continues in the source.

    Returns ``("unique", [p])`` (the next source position is p), ``("ambiguous", [p1, p2, ...])``
    (the longest allowed suffix still occurs at several places), or ``("none", [])``.

    Example: source ``a b c a b d``; output ``... a b`` occurs twice (ambiguous
    at n = 2); output ``... c a b`` occurs once → unique, next position 5 (``d``).
    """
    last: list[int] = []
    for n in range(1, min(max_ngram, len(output)) + 1):
        ends = index.get(tuple(output[-n:]), [])
        if not ends:  # a longer suffix cannot occur either
            return ("ambiguous", last) if last else ("none", [])
        if len(ends) == 1:
            return "unique", ends
        last = ends
    return ("ambiguous", last) if last else ("none", [])


def _ngram_index(source: list[int], max_ngram: int) -> dict[tuple[int, ...], list[int]]:
    """n-gram → the source positions right after each occurrence (n = 1..max_ngram)."""
    index: dict[tuple[int, ...], list[int]] = {}
    for n in range(1, max_ngram + 1):
        for end in range(n, len(source) + 1):
            index.setdefault(tuple(source[end - n : end]), []).append(end)
    return index


def user_content_span(tokenizer, prompt_ids: list[int]) -> tuple[int, int] | None:
    """[start, end) of the last user message's content inside chat-templated prompt ids, or None."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        return None
    marker = "\u2063IAD\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
    except Exception:  # templates may refuse a lone user turn; then there is no span to find
        return None
    before, _, after = text.partition(marker)
    head = tokenizer(before, add_special_tokens=False)["input_ids"][-2:]  # e.g. "<|im_start|>user\n" ends the prefix
    tail = tokenizer(after, add_special_tokens=False)["input_ids"]
    if not head or not tail or prompt_ids[-len(tail) :] != tail:
        return None
    end = len(prompt_ids) - len(tail)
    for start in range(end - len(head), -1, -1):
        if prompt_ids[start : start + len(head)] == head:
            return start + len(head), end
    return None


@register_drafter("iad")
class IADDrafter(Drafter):
    """Drafts the source's continuation from where the output aligns with it."""

    name = "iad"

    def __init__(self, config: IADConfig | None = None, source_text: str | None = None) -> None:
        self.config = config or IADConfig()
        self.source_text = source_text
        if source_text is None and self.config.source_file:
            self.source_text = Path(self.config.source_file).read_text()
        self._tokenizer = None
        self.source: list[int] = []
        self.index: dict = {}
        self._keys: dict = {}
        self.rates = AcceptanceRates(self._prior, self.config.decay)

    @classmethod
    def from_spec(cls, args: list[str], kwargs: dict[str, str]) -> "IADDrafter":
        if args:
            raise ValueError(f"iad takes key=value options only, got {args}")
        return cls(config_from_options(IADConfig, kwargs, cls.name))

    @staticmethod
    def _prior(key) -> float:
        kind, depth = key
        return (0.7 if kind == "unique" else 0.3) if depth == 1 else 0.9

    def bind(self, target: Target) -> None:
        super().bind(target)
        self._tokenizer = target.tokenizer
        if self.source_text is not None and target.tokenizer is None:
            raise ValueError("an IAD source text needs a tokenizer; pass token ids as the source instead")

    def reset(self, prompt_ids: Tensor) -> None:
        ids = prompt_ids.tolist()
        if self.source_text is not None:
            self.source = self._tokenizer(self.source_text, add_special_tokens=False)["input_ids"]
        else:
            span = user_content_span(self._tokenizer, ids)
            self.source = ids[span[0] : span[1]] if span else ids
        self.index = _ngram_index(self.source, self.config.max_ngram)
        self.rates = AcceptanceRates(self._prior, self.config.decay)
        self._keys = {}

    def propose(self, state: DraftState) -> TokenTree:
        c = self.config
        output = state.token_ids[state.prompt_len :].tolist()
        self._keys = {}
        kind, positions = align(self.source, self.index, output, c.max_ngram)
        if kind == "none":
            return TokenTree.root_only(state.root)
        seqs = [self.source[p : p + c.num_tokens] for p in positions[: c.max_alignments]]
        seqs = [s for s in seqs if s]
        if not seqs:
            return TokenTree.root_only(state.root)
        scores = []
        for s in seqs:
            row, score = [], 1.0
            for d in range(1, len(s) + 1):
                key = (kind, min(d, 2))
                self._keys.setdefault(tuple(s[:d]), key)
                score *= self.rates[key] / (len(seqs) if d == 1 else 1)
                row.append(score)
            scores.append(row)
        return TokenTree.from_sequences(state.root, seqs, scores=scores)

    def observe(self, result: StepResult) -> None:
        if self._keys:
            learn(self.rates, self._keys, result.tree, result.path)
