"""The drafter contract, and the registry that builds drafters from spec strings.

The contract, in one screen
---------------------------
A drafter is bound to a target once per generation, then asked for a tree
before every step and told what happened after it::

    drafter.bind(target)            # Target: model, tokenizer, input embeddings, output head,
                                    #   the run's seeded generator, the cost curve v(n)
    drafter.reset(prompt_ids)       # [T] long: a new generation starts
    loop:
        tree = drafter.propose(state)   # DraftState -> TokenTree rooted at the last committed token
        ...                             # the engine trims the tree to what pays (node scores),
                                        # verifies it in one target forward, commits the accepted path
        drafter.observe(result)         # StepResult: the verified tree, accepted path, emitted tokens,
                                        #   the target's outputs at the tree's auxiliary nodes

What each kind of drafter uses:

* **n-gram / retrieval drafters** (prompt lookup, REST, suffix): ``state.token_ids``;
  node ``scores`` so the engine sizes their trees; ``observe`` to learn acceptance.
* **draft heads** (Medusa, Clover, EAGLE-style): ``needs_hidden_states = True``;
  ``state.hidden_states`` holds the target's last-layer states of every position
  committed since the previous proposal (the whole prompt before the first
  step, then the accepted path); ``target.input_embeddings`` and
  ``target.output_weight`` are the target's own embedding and output head.
* **prompt-token drafters** (PPD): tree nodes marked ``auxiliary`` ride along in
  the verifying forward; their input is the drafter's own embedding
  (``TokenTree.input_embeds``), not a vocabulary token; they are never accepted
  and their KV is never committed; the target's logits (and, with
  ``needs_hidden_states``, hidden states) at them come back in
  ``result.aux_logits`` / ``result.aux_hidden`` — the next step's drafts.
* **separate draft models**: run their own :class:`~specdec.runner.TreeRunner`
  (own KV cache) and commit ``result.path``'s tokens in it in ``observe``.
* **sampling drafters**: draw with ``target.generator`` (seeded from the run's
  seed), and put their distribution q in ``TokenTree.draft_probs`` for lossless
  speculative sampling.
* **fusion** (``a+b``): trees merge node by node; every per-node field
  (scores, auxiliary flags and embeddings, draft distributions, sources)
  survives; each drafter hears the whole verified tree.
* **lifecycle**: a drafter object is the shared part (weights, datastore, and
  what it learns across requests: ``shared_state``); each sequence gets its
  own session, :meth:`open` / :meth:`spawn` (a shallow copy: nothing is
  copied, the session's own state is what ``reset`` assigns), which hears ``reset(prompt)``, then ``propose`` / ``observe``
  per step, and ``close(output)`` when the sequence ends (finished, stopped
  or cancelled): where a drafter learns across requests (the suffix drafter's
  store of earlier outputs), ``close`` puts what this sequence taught into the
  shared part, so every later session, on any row, sees it.
* **batch > 1**: one session per row; the engine drafts all rows of one
  drafter class with ``propose_batch(drafters, states)`` (the base class
  proposes row by row; a class whose work batches well, like Medusa's heads,
  runs once for all rows).

Spec strings name a registered drafter and its options::

    prompt-lookup                          defaults
    prompt-lookup:max_ngram=4,num_tokens=8 keyword options
    medusa:PATH                            one positional argument (a path)
    medusa+prompt-lookup                   several drafters fused into one tree
    none                                   no drafting: plain decoding

The options parse into the drafter's config dataclass (through
:func:`specdec.config.coerce`), so a typo or a bad value is an error that
names the valid options, raised before any model work.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from specdec.tree import TokenTree

__all__ = ["Target", "DraftState", "StepResult", "Drafter", "NoDrafter", "register_drafter", "build_drafter",
           "registered_drafters", "parse_spec", "read_drafter_config", "read_drafter_config_versioned", "read_drafter_weights",
           "drafter_path", "write_drafter", "most_frequent_rows", "set_draft_counts", "add_draft_counts", "keep_draft_rows"]


@dataclass
class Target:
    """What a drafter may use of the target model, handed over once per generation (:meth:`Drafter.bind`).

    Attributes:
        model: the target (a HF causal LM).
        tokenizer: its tokenizer, or None.
        input_embeddings: the target's token embedding module (``[V] ids -> [.., H]``).
        output_weight: [V, H] the target's output head (``lm_head``) weight.
        vocab_size: V.
        hidden_size: H (None when the model does not say).
        device, dtype: where and in what the target runs.
        generator: the run's random source for stochastic drafters, on ``device``,
            seeded from the generation's seed (so seeded runs reproduce).
        cost: v(n), the measured cost of a forward over n nodes in plain steps, or None.
        step_ms: the measured wall time of one plain target step, or None.
        max_nodes: the most nodes the engine lets one verifying forward hold (it trims every tree to that).
    """

    model: Any
    tokenizer: Any = None
    input_embeddings: nn.Module | None = None
    output_weight: Tensor | None = None
    vocab_size: int = 0
    hidden_size: int | None = None
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    generator: torch.Generator | None = None
    cost: Callable[[int], float] | None = None
    step_ms: float | None = None
    max_nodes: int = 64

    @classmethod
    def of(cls, model, tokenizer=None, *, seed: int | None = None, cost: Callable[[int], float] | None = None) -> "Target":
        """Describe ``model``; the generator is seeded with ``seed`` (a fresh random seed when None)."""
        device = torch.device(getattr(model, "device", "cpu"))
        head = model.get_output_embeddings()
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, ())))
        return cls(
            model=model, tokenizer=tokenizer, input_embeddings=embed, output_weight=head.weight,
            vocab_size=head.weight.shape[0], hidden_size=getattr(model.config, "hidden_size", None),
            device=device, dtype=getattr(model, "dtype", torch.float32), generator=generator, cost=cost,
        )


@dataclass
class DraftState:
    """What a drafter sees before a step.

    Attributes:
        token_ids: [T] long, all committed tokens (prompt + generated); the
            last one is the root of the tree to propose.
        prompt_len: how many of ``token_ids`` are the prompt.
        hidden_states: [K, H] the target's last-layer hidden states (after the
            final norm) at every position committed since the previous
            proposal: all prompt positions before the first step, then the
            root and the accepted drafts of the last step. Row i is position
            ``hidden_start + i`` and predicted ``token_ids[hidden_start + i + 1]``;
            the last row predicted the root. None unless the drafter sets
            ``needs_hidden_states``.
        hidden_start: the position of ``hidden_states``' first row.
        target_kv: ``target_kv(start, stop)`` returns the target's cached keys and values of the committed
            positions ``start .. stop - 1`` (every position before the root), one ``[1, H, n, D]`` view per layer
            (keys, values); valid during this ``propose`` only (copy what you keep). None where the engine does
            not offer it.
    """

    token_ids: Tensor
    prompt_len: int
    hidden_states: Tensor | None = None
    hidden_start: int = 0
    target_kv: Callable[[int, int], tuple[list[Tensor], list[Tensor]]] | None = None

    @property
    def root(self) -> int:
        return int(self.token_ids[-1])


@dataclass
class StepResult:
    """What a drafter hears after a step.

    Attributes:
        tree: the tree the target verified (trimmed by the engine; in a fusion,
            every drafter's nodes together; ``tree.sources`` says whose).
        path: [A + 1] long, accepted node indices, root first (never an auxiliary node).
        new_tokens: the tokens the step emitted (accepted drafts + the bonus
            token), after any truncation at a stop.
        aux_logits: [M, V] the target's logits at the tree's auxiliary nodes, in
            tree order (None when the tree has none).
        aux_hidden: [M, H] the target's hidden states there (with ``needs_hidden_states``).
    """

    tree: TokenTree
    path: Tensor
    new_tokens: list[int]
    aux_logits: Tensor | None = None
    aux_hidden: Tensor | None = None


class Drafter:
    """Base class. Subclasses implement :meth:`propose`; the rest is optional.

    Class attributes:
        name: the registry name.
        needs_hidden_states: ask the engine for the target's hidden states.
        hidden_layers: which of them (indices into HF's ``hidden_states``: -1, the default, is the last layer
            after the final norm; an EAGLE-3 drafter asks for a low, a middle and a high layer). The engine
            fetches only these, and ``DraftState.hidden_states`` holds them side by side: [K, L·H].
        vocab_size: the vocabulary the drafter was built for (None: any).
        shared_state: names of attributes that sessions may change for every later session (the suffix
            drafter's store learns in ``close``); everything else a session inherits it only reads, and
            everything it changes it first assigns in ``reset`` (see :meth:`spawn`).
        stateless: proposing reads only the step's :class:`DraftState` (and statistics it may skip
            updating): a batch under load may then skip drafting for steps where no tree has paid lately.
        skippable: a step left out (no ``propose``, no ``observe``) costs the drafter only that step's drafts: its
            next ``propose`` catches up from the :class:`DraftState`, whose hidden states then cover every
            position committed since its last one (the engine keeps them). The engine skips drafting for such
            drafters while their drafted steps have yielded fewer tokens per second than plain steps, drafting
            included (trained heads and EAGLE, whose own forwards cost a share of the step), and drafts again
            every few steps to see whether that has changed.
        defers: in a fusion, this drafter proposes only on steps where the others proposed nothing (after them,
            whatever its place in the spec), and hears only the steps it proposed for: a drafter whose own
            forwards cost a large share of a step (a draft model, RAPID) then adds its drafts where the cheap
            ones have none instead of paying for them on every step.
        session_options: fields of the drafter's ``config`` dataclass that one request may set for its own
            session (:meth:`open`; the server's ``drafter_options``): settings read while proposing, never
            the shared part's (weights, a store's file or size).
    """

    name: str = "drafter"
    shared_state: tuple[str, ...] = ()
    session_options: tuple[str, ...] = ()
    stateless: bool = False  # a step without propose/observe loses this drafter nothing (the batch may skip drafting)
    skippable: bool = False  # a skipped step loses it only that step's drafts (it catches up at its next propose)
    defers: bool = False  # in a fusion: proposes only where the other drafters proposed nothing
    needs_hidden_states: bool = False
    hidden_layers: tuple[int, ...] = (-1,)
    vocab_size: int | None = None

    def hidden_request(self) -> "tuple[int, ...] | bool":
        """What the engine's forwards must return for this drafter: the ``hidden_layers`` it reads, or False."""
        return tuple(self.hidden_layers) if self.needs_hidden_states else False

    def bind(self, target: Target) -> None:
        """Check the drafter fits the target and keep what it needs; called once per generation."""
        if self.vocab_size is not None and self.vocab_size != target.vocab_size:
            raise ValueError(
                f"drafter {self.name!r} was built for a vocabulary of {self.vocab_size} tokens, "
                f"but the target model has {target.vocab_size}; use a drafter trained for this model"
            )
        self.target = target

    def reset(self, prompt_ids: Tensor) -> None:
        """Start a new generation for ``prompt_ids`` ([T] long)."""

    def prompt_cache(self, cache) -> None:
        """The target's KV cache of the prompt (a :class:`~specdec.cache.TreeKVCache`: positions 0 .. T - 1 in
        every layer), handed over once after the prefill, before the first :meth:`propose`; the engine no longer
        writes it. A drafter may read it and keep it for the sequence (RAPID drafts with the target's own KV of
        the retrieved chunks); the default ignores it."""

    def propose(self, state: DraftState) -> TokenTree:
        raise NotImplementedError

    def observe(self, result: StepResult) -> None:
        """Feedback after verification (acceptance statistics, the next step's drafts)."""

    def close(self, output_ids: list[int]) -> None:
        """The sequence ended with these new tokens (finished, stopped or cancelled); keep what it taught in the
        shared part (the default keeps nothing). Called once per sequence, by every engine loop."""

    def propose_stateless(self, state: DraftState) -> TokenTree | None:
        """A tree from this drafter's stateless parts only, for steps where the engine leaves its skippable parts
        out (their drafting has not paid lately): a fusion's prompt lookup keeps drafting while EAGLE waits.
        None (the default) where there is no such part; stateless parts hear nothing of these steps."""
        return None

    @classmethod
    def propose_batch(cls, drafters: "list[Drafter]", states: list[DraftState]) -> list[TokenTree]:
        """Every row's tree, for rows whose sessions are all of this class (default: one ``propose`` per row)."""
        return [d.propose(s) for d, s in zip(drafters, states)]

    def open(self, options: dict[str, Any] | None = None) -> "Drafter":
        """A session of this drafter for one request (the engine calls its ``reset(prompt)`` when the request
        joins, and ``close(output)`` when it ends): what :meth:`spawn` gives, with the request's ``options``
        (names from ``session_options``; strings are parsed as in a spec) over the drafter's own config.
        An option outside ``session_options`` is an error that lists the ones it takes."""
        session = self.spawn()
        if options:
            allowed = set(self.session_options)
            unknown = sorted(set(options) - allowed)
            if unknown:
                valid = ", ".join(self.session_options) if self.session_options else "none"
                raise ValueError(f"drafter {self.name!r} takes no per-request option {', '.join(map(repr, unknown))}; "
                                 f"per-request options: {valid}")
            from specdec.config import options_into

            session.config = options_into(type(self.config), dict(options), base=self.config,
                                          what=f"per-request option for drafter {self.name!r}:")
        return session

    def spawn(self) -> "Drafter":
        """A session of this drafter for another sequence: a shallow copy, so everything the drafter holds
        (weights, the Target, its config, ``shared_state``, statistics learned across requests) is shared as it
        is and nothing is copied; the session's own state is what :meth:`reset` builds when the sequence joins.

        The contract this relies on: ``reset`` (and ``propose`` / ``observe`` after it) *assign* per-sequence
        state (``self.rates = AcceptanceRates(...)``), never change in place an object the drafter held before
        ``reset`` (``self._keys.clear()`` would reach every session). A drafter holding a per-sequence resource
        it must release in ``reset`` (a draft model's runner) clears it here. ``tests/test_batch.py`` checks the
        contract for every drafter."""
        return copy.copy(self)


class NoDrafter(Drafter):
    """Drafts nothing: every step is one plain decoding step (a baseline)."""

    name = "none"
    stateless = True

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


def drafter_path(args: list[str], shipped: str, spec: str, kwargs: dict | None = None):
    """The directory a trained drafter's spec names: its one positional argument (``medusa:DIR``) or its
    ``path`` option (``medusa:path=DIR``, taken out of ``kwargs``), else the one shipped in
    ``specdec/data/<shipped>`` (an error says how to give one when none ships)."""
    from importlib import resources
    from pathlib import Path

    named = (kwargs or {}).pop("path", None)
    given = list(args) + ([named] if named else [])
    if len(given) > 1:
        raise ValueError(f"{spec} takes one path, got {given}")
    if given:
        return Path(given[0])
    path = Path(str(resources.files("specdec.data").joinpath(shipped)))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no {spec} drafter ships with this installation; give one: {spec}:PATH "
                                f"(train one with `specdec train`, see docs/)")
    return path


def set_draft_counts(module: nn.Module, counts: Tensor | None) -> None:
    """Give ``module`` (a drafter with a ``draft_vocab`` buffer) its ``draft_counts``: how often each draft token was
    a training label (a saved buffer; what ``vocab=N`` ranks by), or None when unknown (nothing saved)."""
    if "draft_counts" in module._buffers or hasattr(module, "draft_counts"):
        delattr(module, "draft_counts")
    if counts is None:
        module.draft_counts = None
    else:
        module.register_buffer("draft_counts", counts.to(device=module.draft_vocab.device, dtype=torch.long).clone())


def add_draft_counts(module: nn.Module, counts: Tensor) -> None:
    """Add ``counts`` ([V'] label counts over ``module.draft_vocab``) to the module's ``draft_counts``, starting
    them when the module has none (a drafter trained on in a later run keeps counting)."""
    if counts.shape != module.draft_vocab.shape:
        raise ValueError(f"draft counts of shape {tuple(counts.shape)} for a draft vocabulary of {module.draft_vocab.numel()}")
    if module.draft_counts is None:
        set_draft_counts(module, counts)
    else:
        module.draft_counts += counts.to(device=module.draft_counts.device, dtype=torch.long)


def keep_draft_rows(module: nn.Module, rows: Tensor) -> None:
    """Keep only these rows (indices into it) of ``module``'s draft vocabulary and of its counts."""
    module.draft_vocab = module.draft_vocab[rows].clone()
    if module.draft_counts is not None:
        module.draft_counts = module.draft_counts[rows].clone()


def most_frequent_rows(counts: Tensor | None, size: int, spec: str, source: str = "") -> Tensor:
    """Row indices (ascending) of the ``size`` most frequent tokens of a draft vocabulary, by ``counts`` (how
    often each row's token was a training label, saved with the drafter as ``draft_counts``).

    A drafter's output head costs it a read of every draft-vocabulary row at every depth; keeping the most
    frequent rows (FR-Spec) makes each depth cheaper, at the price of never proposing the tokens left out
    (each dropped token is a miss where the target wants it; outputs never change)."""
    if counts is None:
        raise ValueError(f"{spec}: vocab=N needs the token counts of the drafter's training data, and {source or 'this drafter'} "
                         f"holds none (it was saved before they were kept); drop vocab= or retrain it with specdec train")
    if not 1 <= size <= counts.numel():
        raise ValueError(f"{spec}: vocab must be between 1 and the draft vocabulary's {counts.numel()} tokens, got {size}")
    order = torch.argsort(counts, descending=True, stable=True)  # ties: the lower row first
    return torch.sort(order[:size]).values


def read_drafter_config(path) -> dict:
    """A drafter directory's config.json as a dict; a missing or damaged file is an error naming it."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: a drafter directory needs config.json and model.safetensors") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"could not read {path} (damaged or not JSON?): {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return raw


def read_drafter_config_versioned(path, current: int, kind: str) -> dict:
    """``path/config.json`` of a ``kind`` drafter whose layout is format ``current``: a missing version, or
    another one, is an error that says what to do (retrain, or upgrade specdec)."""
    from pathlib import Path

    path = Path(path)
    raw = read_drafter_config(path / "config.json")
    version = raw.get("format_version")
    if not isinstance(version, int) or version < current:
        raise ValueError(f"{path} holds a {kind} drafter of format {version}, this specdec reads format {current}; "
                         f"retrain it with `specdec train` (see `specdec train --list`)")
    if version > current:
        raise ValueError(f"{path} was saved by a newer specdec ({kind} format {version}); upgrade specdec")
    return raw


def write_drafter(path, config, module: nn.Module) -> None:
    """A trained drafter's directory: ``config.json`` (the config dataclass) and ``model.safetensors`` (the
    module's state), each written to a temporary file and renamed, so a kill never leaves half a file."""
    import json
    import os
    from dataclasses import asdict
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".model.{os.getpid()}.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(tmp))
    os.replace(tmp, path / "model.safetensors")
    tmp = path / f".config.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(asdict(config), indent=2))
    os.replace(tmp, path / "config.json")


def read_drafter_weights(path) -> dict[str, Tensor]:
    """A drafter's safetensors file; a missing, truncated or foreign file is an error naming it."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a drafter directory needs config.json and model.safetensors")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise ValueError(f"could not read {path} (truncated or not a safetensors file?): {err}") from None


def _import_builtin_drafters() -> None:
    # Importing the modules registers them.
    from specdec.drafters import clover, draft_model, eagle, gad, iad, medusa, ppd, prompt_lookup, rapid, rest, suffix  # noqa: F401
