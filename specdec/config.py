"""One typed configuration for a generation, and the one string-to-field coercion every parser uses.

:class:`GenerationConfig` is shared by :func:`specdec.generate`,
:func:`specdec.stream`, the CLI and the bench. Keyword options to
``generate`` are its fields; an unknown one is an error naming the valid
fields.

:func:`coerce` turns a string (``"true"``, ``"8"``, ``"0.5"``, ``"a,b"``) into
the type a dataclass field declares. Drafter spec options
(``prompt-lookup:max_ngram=4``) and training recipe overrides
(``specdec train lr=1e-3``) both go through it, so ``adaptive=ture`` is the
same one-line error everywhere.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

__all__ = ["GenerationConfig", "coerce", "options_into", "ACCEPTANCES", "DTYPES"]

ACCEPTANCES = ("exact", "typical", "gad", "rapid")
DTYPES = ("float32", "bfloat16", "float16", "float64")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _field_type(cls, name: str):
    hints = typing.get_type_hints(cls)
    return hints[name]


def _strip_optional(tp):
    """(inner type, allows None) for ``X | None`` / ``Optional[X]``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def coerce(cls, name: str, raw: str, *, what: str = "option") -> Any:
    """Parse ``raw`` into the declared type of field ``name`` of dataclass ``cls``.

    Booleans take true/false/yes/no/on/off/1/0 (anything else is an error),
    numbers must parse, ``none`` is None where the field allows it, lists are
    comma-separated, ``Literal`` fields must be one of their values.
    """
    tp, optional = _strip_optional(_field_type(cls, name))
    text = raw.strip()
    if optional and text.lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            low = text.lower()
            if low not in _TRUE + _FALSE:
                raise ValueError
            return low in _TRUE
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if origin is typing.Literal:
            if text not in typing.get_args(tp):
                raise ValueError
            return text
        if origin in (list, tuple):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            items = [x.strip() for x in text.split(",") if x.strip()]
            vals = [inner(x) for x in items] if inner in (int, float, str) else items
            return vals if origin is list else tuple(vals)
    except ValueError:
        raise ValueError(f"{what} {name}={raw!r} is not valid: expected {_describe(tp)}") from None
    import yaml  # anything else (dicts, unions): YAML's reading of the text

    return yaml.safe_load(text)


def _describe(tp) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) in (list, tuple):
        return "a comma-separated list"
    return getattr(tp, "__name__", str(tp))


def options_into(cls, options: dict[str, Any], *, what: str = "option", base=None):
    """Build ``cls`` from ``base`` (or defaults) and ``options``; strings are coerced, unknown keys are errors."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"unknown {what}{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(sorted(fields))}")
    values = {k: coerce(cls, k, v, what=what) if isinstance(v, str) and _strip_optional(_field_type(cls, k))[0] is not str else v
              for k, v in options.items()}
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


@dataclass
class GenerationConfig:
    """How to generate (shared by ``generate``, ``stream``, the CLI and the bench).

    Attributes:
        max_new_tokens: generation stops after exactly this many new tokens.
        temperature: 0 for greedy (exact); > 0 samples.
        top_k, top_p, repetition_penalty: HF ``generate`` semantics (sampling only).
        acceptance: ``"exact"`` (lossless), ``"typical"`` (Medusa's typical acceptance, lossy, sampling)
            or ``"gad"`` (GAD's relaxed verification, lossy, greedy) or ``"rapid"`` (RAPID's knowledge transfer:
            speculative sampling against the target's distribution tilted toward the drafter's; lossy, sampling).
        typical_epsilon, typical_delta: typical acceptance's thresholds.
        gad_top_beta, gad_tau: GAD's relaxed verification: a draft is accepted when it is among the
            target's top-β tokens and its logit is within τ of the top-1 (β = 1 is exactly greedy).
        rapid_strength, rapid_threshold: RAPID's knowledge transfer: at a node whose children were drawn from
            the drafter's q, the target's logits z become z - strength * (p - q) on the tokens where
            q >= threshold * max(q) (p = softmax(z)); strength 0 is exact speculative sampling.
        stop: stop strings; generation ends once the new text contains one.
        seed: makes sampling (and stochastic drafters) reproducible.
        attn: tree attention in the verifying forward: ``"auto"``, ``"torch"`` or ``"triton"``.
        fast: run the engine's forwards through the measured fast kernels
            (:mod:`specdec.kernels`) and tree attention through transformers'
            attention interface; False runs the model's own kernels and
            attention (a 4-D mask), the reference path.
        dtype: the dtype the model must be in (checked; specdec never converts
            your model: load it with ``load_model(..., dtype=...)``); None: any.
        size_trees: trim every drafter's tree to the size that pays on this
            machine (:mod:`specdec.sizing`, from the measured cost profile).
        max_tree_nodes: the most nodes one verifying forward may hold.
        node_budget: > 0: every tree that carries scores is cut to its ``node_budget`` best nodes by them
            (as if nodes cost nothing up to that size), whatever this machine's cost: drafters compared at
            one budget. Overrides ``size_trees`` and ``max_tree_nodes``.
        max_batch: for a list of prompts, > 0 is continuous batching: at most this many sequences are in
            flight, and a waiting prompt joins as soon as one finishes (0: all prompts at once).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    acceptance: str = "exact"
    typical_epsilon: float = 0.09
    typical_delta: float = 0.3
    gad_top_beta: int = 3
    gad_tau: float = 2.0
    rapid_strength: float = 1.0
    rapid_threshold: float = 0.1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    attn: str = "auto"
    fast: bool = True
    dtype: str | None = None
    size_trees: bool = True
    max_tree_nodes: int = 64
    node_budget: int = 0
    max_batch: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.node_budget, bool) or not isinstance(self.node_budget, int) or self.node_budget < 0:
            raise ValueError(f"node_budget must be an integer >= 0 (0: off), got {self.node_budget!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.acceptance not in ACCEPTANCES:
            raise ValueError(f"acceptance must be one of {', '.join(ACCEPTANCES)}, got {self.acceptance!r}")
        from specdec.verifiers.sampling import check_warping

        check_warping(self.top_k, self.top_p, self.repetition_penalty)
        if self.temperature == 0 and self.repetition_penalty not in (None, 1.0):
            raise ValueError("repetition_penalty is only supported with temperature > 0 for now")
        if not 0 < self.typical_epsilon <= 1 or self.typical_delta <= 0:
            raise ValueError(f"typical acceptance needs 0 < typical_epsilon <= 1 and typical_delta > 0, "
                             f"got {self.typical_epsilon}, {self.typical_delta}")
        from specdec.tree_attention.hf import BACKENDS

        if self.attn not in BACKENDS:
            raise ValueError(f"attn must be one of {', '.join(BACKENDS)}, got {self.attn!r}")
        if self.dtype is not None:
            self.dtype = str(self.dtype).replace("torch.", "")
            if self.dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.gad_top_beta < 1 or self.gad_tau < 0:
            raise ValueError(f"GAD acceptance needs gad_top_beta >= 1 and gad_tau >= 0, got {self.gad_top_beta}, {self.gad_tau}")
        if self.rapid_strength < 0 or not 0.0 <= self.rapid_threshold <= 1.0:
            raise ValueError(f"RAPID acceptance needs rapid_strength >= 0 and rapid_threshold in [0, 1], got "
                             f"{self.rapid_strength}, {self.rapid_threshold}")
        if self.acceptance == "rapid" and self.temperature == 0:
            raise ValueError("acceptance='rapid' tilts speculative sampling toward the drafter's distribution: use it with "
                             "temperature > 0 and a drafter that samples its drafts (e.g. rapid:sample=true)")
        if self.acceptance == "gad" and self.temperature > 0:
            raise ValueError("acceptance='gad' relaxes greedy verification: use it with temperature 0")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 0:
            raise ValueError(f"max_batch must be an integer >= 0 (0: every prompt at once), got {self.max_batch!r}")
        if self.max_tree_nodes < 1:
            raise ValueError(f"max_tree_nodes must be >= 1, got {self.max_tree_nodes}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
