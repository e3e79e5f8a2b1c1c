"""The generate loop: draft a tree, verify it in one forward, keep the longest accepted path.

One step, in the words of ARCHITECTURE.md::

    tree = drafter.propose(state)                       # root = last committed token
    tree = trim(tree, cost)                             # the size that pays on this machine
    logits = target(tree, positions = P + depth,        # P = committed prefix length
                    mask = prefix ∪ ancestors)
    acceptance = verifier.accept(tree, logits)          # accepted path + bonus token
    cache.commit(P, acceptance.path)                    # one gather; rejected KV dropped
    drafter.observe(...)

The prefill runs the whole prompt and yields the first new token (as HF
``generate`` does); after that, each step is one target forward, and
``stats.target_forwards`` counts those decode forwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from specdec.config import GenerationConfig, options_into
from specdec.drafters.base import DraftState, Drafter, StepResult, Target, build_drafter
from specdec.kernels import FastLinears
from specdec.runner import TreeRunner
from specdec.sizing import cap, trim
from specdec.tree import TokenTree
from specdec.verifiers import make_verifier
from specdec.verifiers.base import Verifier

__all__ = ["GenerationResult", "GenerationStats", "StepProfile", "generate", "generate_events", "stream", "decode_steps", "prepare_input_ids", "is_batch"]


@dataclass
class StepProfile:
    """Wall time per phase of the decode steps, in seconds (prefill excluded)."""

    draft: float = 0.0
    forward: float = 0.0
    accept: float = 0.0
    commit: float = 0.0
    other: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in self.__dict__.items()}


class _Clock:
    """Adds the time since the previous lap to a named phase of each :class:`StepProfile` given."""

    def __init__(self, *profiles: StepProfile) -> None:
        self.profiles, self.t = profiles, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        for profile in self.profiles:
            setattr(profile, phase, getattr(profile, phase) + now - self.t)
        self.t = now


@dataclass
class GenerationStats:
    """Counters of one generation.

    ``mean_accepted_length`` (τ) is ``new_tokens / target_forwards``: tokens
    emitted per decode forward; plain decoding gives ~1 (slightly above,
    since the prefill emits the first token). ``tokens_per_step`` lists, per
    decode step, the tokens it emitted: accepted drafts plus the bonus token.
    ``first_token_s`` is the time to the first token (the prefill and what precedes it, from the call's
    start); ``decode_tokens_per_s`` counts the tokens after the first over the time after it, so prefill and
    decoding are reported apart.
    """

    new_tokens: int = 0
    target_forwards: int = 0
    prompt_tokens: int = 0
    wall_time_s: float = 0.0
    prefill_time_s: float = 0.0
    first_token_s: float = 0.0
    drafted_tokens: int = 0
    tokens_per_step: list[int] = field(default_factory=list)
    profile: StepProfile = field(default_factory=StepProfile)

    @property
    def mean_accepted_length(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else float(self.new_tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        decode = self.wall_time_s - self.first_token_s
        return (self.new_tokens - 1) / decode if self.new_tokens > 1 and decode > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards,
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "wall_time_s": round(self.wall_time_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "prompt_tokens": self.prompt_tokens,
            "prefill_time_s": round(self.prefill_time_s, 4),
            "first_token_s": round(self.first_token_s, 4),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "drafted_tokens": self.drafted_tokens,
            "tokens_per_step_histogram": histogram(self.tokens_per_step),
            "profile": self.profile.as_dict(),
        }


@dataclass
class GenerationResult:
    """``text`` (None without a tokenizer), ``token_ids`` (new tokens only), ``stats``, ``finish_reason``."""

    text: str | None
    token_ids: list[int]
    stats: GenerationStats
    finish_reason: str  # "eos" | "stop" | "length"


def histogram(counts: Sequence[int]) -> dict[str, int]:
    """``{"1": how many steps emitted 1 token, "2": ..., ...}`` in increasing order."""
    hist: dict[str, int] = {}
    for n in counts:
        hist[str(n)] = hist.get(str(n), 0) + 1
    return dict(sorted(hist.items(), key=lambda kv: int(kv[0])))


# --------------------------------------------------------------------------- inputs
def prepare_input_ids(tokenizer, prompt) -> Tensor:
    """Turn a prompt into [T] input ids.

    ``prompt`` may be a string (tokenised as is), a list of chat messages
    (``[{"role": ..., "content": ...}]``, the chat template applied with the
    generation prompt), or a tensor / list of token ids.
    """
    if isinstance(prompt, Tensor):
        ids = prompt.reshape(-1) if prompt.dim() == 1 or prompt.shape[0] == 1 else None
        if ids is None:
            raise ValueError(f"prompt ids must be one sequence ([T] or [1, T]), got shape {tuple(prompt.shape)}")
        return ids.to(torch.long).cpu()
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        return torch.tensor(prompt, dtype=torch.long)
    if isinstance(prompt, (str, list, tuple)) and len(prompt) == 0:
        raise ValueError("the prompt is empty; give non-empty text, chat messages or token ids")
    if tokenizer is None:
        raise ValueError("a text or chat prompt needs a tokenizer; pass token ids to generate without one")
    if isinstance(prompt, str):
        return torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("this tokenizer has no chat template; pass the prompt as a plain string")
        text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    raise ValueError(
        "prompt must be a non-empty string, a non-empty list of chat messages ({'role', 'content'} dicts), "
        f"or token ids; got {type(prompt).__name__} {str(prompt)[:40]!r}"
    )


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


class _StopStrings:
    """Stops when the generated text comes to contain a stop string (checked after every token)."""

    def __init__(self, tokenizer, stops: Sequence[str]) -> None:
        if tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.window = max(len(s) for s in stops) + 2  # a token decodes to >= 1 character, mostly

    def hit(self, new_ids: list[int]) -> bool:
        text = self.tokenizer.decode(new_ids[-self.window :], skip_special_tokens=False)
        return any(s in text for s in self.stops)


# --------------------------------------------------------------------------- the loop
@dataclass
class StepEvent:
    """One step's output: the tokens it emitted, and whether generation ended."""

    new_tokens: list[int]
    finish_reason: str | None


@torch.inference_mode()
def decode_steps(
    model,
    input_ids: Tensor,
    drafter: Drafter,
    verifier: Verifier,
    *,
    max_new_tokens: int,
    eos_ids: set[int],
    stop: _StopStrings | None = None,
    generator: torch.Generator | None = None,
    stats: GenerationStats | None = None,
    attn: str = "torch",
    fast: FastLinears | None = None,
    route: bool | None = None,
    cost: Callable[[int], float] | None = None,
    max_nodes: int = 64,
) -> Iterator[StepEvent]:
    """The core generator: yields each step's emitted tokens until EOS, a stop string or the length limit.

    Args:
        input_ids: [T] long prompt ids (T >= 1).
        fast: fast linear kernels for the target's forwards (None: the model's own).
        route: tree attention through transformers' attention interface (None: where the model
            supports it); False hands the model a 4-D mask for its own attention.
        cost: v(n), the measured cost of a forward over n nodes; with it, trees
            that carry scores are trimmed to the size that pays (None: as proposed).
        max_nodes: the most nodes one forward may hold.
    """
    from specdec.batch import BatchEngine, Request

    stats = stats if stats is not None else GenerationStats()
    request = Request(input_ids, drafter, verifier, max_new_tokens, generator, stop, stats)
    new: list[int] = []
    finished = False
    try:
        # A single generation is a batch of one: the same loop as every batch and the server.
        with BatchEngine(model, eos_ids=eos_ids, max_rows=1, attn=attn, fast=fast, route=route, cost=cost,
                         max_nodes=max_nodes) as engine:
            engine.add(request)
            events = engine.admit()  # the prefill: its first token goes out before any decode step
            while True:
                for _, event in events:
                    new.extend(event.new_tokens)
                    finished = event.finish_reason is not None  # the engine has closed the drafter
                    yield event
                    if finished:
                        return
                events = engine.step()
    finally:
        if not finished:
            drafter.close(list(new))  # its consumer stopped listening


def _step_result(tree: TokenTree, acceptance, pending: list[int], out) -> StepResult:
    """What the drafter hears: the verified tree, the accepted path, and the target's outputs at auxiliary nodes."""
    if tree.auxiliary is None or not bool(tree.auxiliary.any()):
        return StepResult(tree, acceptance.path, pending)
    aux = torch.nonzero(tree.auxiliary).flatten().to(out.logits.device)
    hidden = out.hidden_states[aux] if out.hidden_states is not None else None
    return StepResult(tree, acceptance.path, pending, aux_logits=out.logits[aux], aux_hidden=hidden)


def _emit(pending: list[int], new: list[int], eos_ids: set[int], stop: _StopStrings | None, limit: int) -> tuple[list[int], str | None]:
    """Append ``pending`` to ``new`` token by token, stopping at EOS, a stop string or the length limit."""
    emitted: list[int] = []
    for tok in pending:
        emitted.append(tok)
        new.append(tok)
        if tok in eos_ids:
            return emitted, "eos"
        if stop is not None and stop.hit(new):
            return emitted, "stop"
        if len(new) >= limit:
            return emitted, "length"
    return emitted, None


# --------------------------------------------------------------------------- public calls
@dataclass
class _Run:
    """Everything a generation needs, validated before any model work (``inputs``: one [T] per sequence)."""

    inputs: list[Tensor]
    drafter: Drafter
    verifier: Verifier
    config: GenerationConfig
    stop: _StopStrings | None
    generator: torch.Generator | None
    attn: str
    fast: FastLinears | None
    cost: Callable[[int], float] | None


def is_batch(prompt) -> bool:
    """A list whose items are prompts (strings, chat-message lists, id tensors or id lists) is a batch;
    a list of message dicts is one chat, and a list of ints is one prompt of token ids."""
    if not isinstance(prompt, (list, tuple)) or not prompt:
        return False

    def one(p) -> bool:
        if isinstance(p, (str, Tensor)):
            return True
        return isinstance(p, (list, tuple)) and bool(p) and (all(isinstance(m, dict) for m in p) or all(isinstance(t, int) for t in p))

    return all(one(p) for p in prompt)


def _input_ids(model, tokenizer, prompt) -> Tensor:
    """One prompt's [T] ids, checked against the model's context and vocabulary."""
    input_ids = prepare_input_ids(tokenizer, prompt)
    if input_ids.numel() == 0:
        raise ValueError("the prompt has no tokens; give a non-empty prompt")
    ctx = _context_length(model)
    if ctx is not None and input_ids.numel() >= ctx:
        raise ValueError(f"the prompt has {input_ids.numel()} tokens but the model's context is {ctx}; shorten the prompt")
    vocab = model.get_output_embeddings().weight.shape[0]
    if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
        raise ValueError(f"prompt token ids must lie in [0, {vocab}) for this model")
    return input_ids


def _setup(model, tokenizer, prompts: list, drafter, config: GenerationConfig | None, options: dict) -> _Run:
    """Validate everything before any model work; return the pieces of a run."""
    config = options_into(GenerationConfig, options, what="generation option", base=config or GenerationConfig())
    inputs = [_input_ids(model, tokenizer, p) for p in prompts]
    model_dtype = str(getattr(model, "dtype", "")).replace("torch.", "")
    if config.dtype is not None and config.dtype != model_dtype:
        raise ValueError(f"dtype={config.dtype!r} but the model is {model_dtype}; specdec never converts your model: "
                         f"load it with load_model(..., dtype={config.dtype!r})")
    device = torch.device(getattr(model, "device", "cpu"))
    seed = config.seed if config.seed is not None else int(torch.randint(0, 2**62, ()))
    drafter_obj = build_drafter(drafter)
    target = Target.of(model, tokenizer, seed=seed + 1)  # the drafter's generator: its own stream of the run's seed
    drafter_obj.bind(target)
    verifier = make_verifier(config)
    stop_checker = _StopStrings(tokenizer, config.stop) if config.stop else None
    generator = torch.Generator(device=device).manual_seed(seed) if config.temperature > 0 else None
    from specdec.tree_attention.hf import resolve_backend

    attn = resolve_backend(config.attn, device)
    fast, profile = _hardware(model, config, attn)  # the first model work: everything above is validated
    cost = _cost_of(profile) if profile is not None and config.size_trees else None
    if config.node_budget:  # nodes cost nothing, and max_nodes = node_budget caps every tree (each row of a batch too)
        cost = _free
    target.cost, target.step_ms = cost, (profile.step_ms if profile is not None else None)
    target.max_nodes = config.node_budget or config.max_tree_nodes
    return _Run(inputs, drafter_obj, verifier, config, stop_checker, generator, attn, fast, cost)


def _cost_of(profile):
    """v(n) for the trim and the drafters: the profile's own curve, or, where it holds curves measured after long
    prefixes (``specdec profile --prefixes``), the curve of each step's prefix length."""
    from specdec.profile import ContextCost

    return ContextCost(profile) if profile.curves else profile.cost


def _free(n: int) -> float:
    """A forward of any size costs one step: trimming then keeps the best nodes that fit in ``max_nodes``."""
    return 1.0


def _hardware(model, config: GenerationConfig, attn: str):
    """The fast kernels and the cost profile for this model on this machine (measured once, then cached)."""
    if not isinstance(model, torch.nn.Module) or not (config.fast or config.size_trees):
        return None, None
    from specdec.profile import fast_linears_for, get_profile

    profile = get_profile(model, fast=config.fast, attn=attn)
    return (fast_linears_for(model, profile) if config.fast else None), profile


def _events(model, tokenizer, run: _Run, stats: list[GenerationStats]) -> Iterator[tuple[int, StepEvent]]:
    """(sequence index, event) pairs: one sequence through the single loop, several through the batched one."""
    c = run.config
    if c.max_new_tokens == 0:
        return iter(())
    common = dict(max_new_tokens=c.max_new_tokens, eos_ids=_eos_ids(model, tokenizer), generator=run.generator, attn=run.attn,
                  fast=run.fast, route=c.fast, cost=run.cost, max_nodes=c.node_budget or c.max_tree_nodes)
    if len(run.inputs) == 1:
        steps = decode_steps(model, run.inputs[0], run.drafter, run.verifier, stop=run.stop, stats=stats[0], **common)
        return ((0, e) for e in steps)
    from specdec.batch import decode_batch

    drafters = [run.drafter] + [run.drafter.open() for _ in run.inputs[1:]]
    return decode_batch(model, run.inputs, drafters, run.verifier, stops=[run.stop] * len(run.inputs), stats=stats,
                        max_rows=c.max_batch, batch_cost=batch_cost_for(model, run), **common)


def batch_cost_for(model, run: "_Run"):
    """v(B, n) measured over rows × nodes for this model and setting (cached), where trees are sized by cost."""
    if run.cost is None or run.cost is _free or not isinstance(model, torch.nn.Module):
        return None
    from specdec.profile import get_batch_profile

    return get_batch_profile(model, fast=run.config.fast, attn=run.attn, linears=run.fast).cost


def _generate_events(model, tokenizer, prompts: list, drafter, config, options, holder: dict) -> Iterator[tuple[int, StepEvent]]:
    """Run and yield (sequence index, event); the finished results land in ``holder["results"]``, in prompt order."""
    run = _setup(model, tokenizer, prompts, drafter, config, options)
    stats = [GenerationStats(prompt_tokens=ids.numel()) for ids in run.inputs]
    new: list[list[int]] = [[] for _ in run.inputs]
    reason = ["length"] * len(run.inputs)
    t0 = time.perf_counter()
    for i, event in _events(model, tokenizer, run, stats):
        now = time.perf_counter() - t0
        if event.new_tokens and not new[i]:
            stats[i].first_token_s = now
        new[i].extend(event.new_tokens)
        reason[i] = event.finish_reason or reason[i]
        stats[i].wall_time_s = now
        yield i, event
    holder["results"] = [
        GenerationResult(text=tokenizer.decode(n, skip_special_tokens=True) if tokenizer is not None else None,
                         token_ids=n, stats=s, finish_reason=r)
        for n, s, r in zip(new, stats, reason)
    ]


def generate_events(model, tokenizer, prompts: list, drafter="prompt-lookup", config: GenerationConfig | None = None,
                    **options) -> Iterator[tuple[int, StepEvent]]:
    """The batch's raw progress: ``(prompt index, StepEvent)`` pairs as each sequence emits tokens (its
    ``new_tokens``; ``finish_reason`` set on its last event). Arguments as :func:`generate`, with ``prompts``
    always a list; ``max_batch`` > 0 streams a long list through that many rows (continuous batching)."""
    yield from _generate_events(model, tokenizer, list(prompts), drafter, config, options, {})


def stream(model, tokenizer, prompt, config: GenerationConfig | None = None, *,
           drafter: "str | Drafter | None" = "prompt-lookup", result: dict | None = None, **options) -> Iterator:
    """Speculative generation that yields text as it is accepted.

    Takes the same arguments as :func:`generate`. Yields text pieces (never a
    half-decoded multi-byte character); for a batch of prompts, ``(index,
    piece)`` pairs as each sequence advances. If ``result`` is a dict, the
    finished :class:`GenerationResult` (a list of them for a batch) is stored in
    it under ``"result"``.
    """
    if tokenizer is None:
        raise ValueError("stream() yields text and needs a tokenizer; use generate() for token ids only")
    batch = is_batch(prompt)
    prompts = list(prompt) if batch else [prompt]
    sent = [0] * len(prompts)
    ids: list[list[int]] = [[] for _ in prompts]
    holder: dict = {}
    for i, event in _generate_events(model, tokenizer, prompts, drafter, config, options, holder):
        ids[i].extend(event.new_tokens)
        text = tokenizer.decode(ids[i], skip_special_tokens=True)
        if event.finish_reason is None and text.endswith("\ufffd"):
            continue  # wait for the rest of a multi-byte character
        if len(text) > sent[i]:
            yield (i, text[sent[i] :]) if batch else text[sent[i] :]
            sent[i] = len(text)
    if result is not None:
        result["result"] = holder["results"] if batch else holder["results"][0]


def generate(model, tokenizer, prompt, config: GenerationConfig | None = None, *,
             drafter: "str | Drafter | None" = "prompt-lookup", **options):
    """Generate with speculative decoding; greedy output equals the engine's own plain greedy output.

    Args:
        model: a HF causal LM (see :func:`specdec.load_model`).
        tokenizer: its tokenizer; may be None when ``prompt`` is token ids.
        prompt: a string (used as is), a list of chat messages (chat template
            applied with the generation prompt), or token ids ([T] or [1, T]);
            or a **list of such prompts** (a batch: see :func:`is_batch`), run
            together, each row drafting, verifying and committing on its own.
        config: a :class:`~specdec.config.GenerationConfig`; keyword
            ``options`` (its field names: ``max_new_tokens``, ``temperature``,
            ``top_p``, ``top_k``, ``repetition_penalty``, ``acceptance``,
            ``stop``, ``seed``, ``attn``, ``fast``, ``dtype``, ``size_trees``,
            ``max_tree_nodes``, ...) override it field by field.
        drafter: a spec string (``"prompt-lookup"``, ``"none"``, ...) or a
            :class:`~specdec.drafters.Drafter` (for a batch, each sequence gets
            its own copy through ``Drafter.spawn``).

    Returns:
        :class:`GenerationResult` with ``text``, ``token_ids`` (new only),
        ``stats`` and ``finish_reason``; a list of them, in prompt order, for a batch.

    The first call on a model measures this machine's forward cost (a few
    seconds; cached under ``$SPECDEC_CACHE``, see :mod:`specdec.profile`).
    """
    batch = is_batch(prompt)
    holder: dict = {}
    for _ in _generate_events(model, tokenizer, list(prompt) if batch else [prompt], drafter, config, options, holder):
        pass
    return holder["results"] if batch else holder["results"][0]
