"""The generate loop: draft a tree, verify it in one forward, keep the longest accepted path.

One step, in the words of ARCHITECTURE.md::

    tree = drafter.propose(state)                       # root = last committed token
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

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor

from specdec.cache import TreeKVCache
from specdec.drafters.base import DraftState, Drafter, StepResult, build_drafter
from specdec.tree import TokenTree
from specdec.tree_attention.reference import additive_tree_mask


def pack_ancestor_mask(mask: Tensor) -> Tensor:
    from specdec.tree_attention.triton_kernel import pack_ancestor_mask as pack

    return pack(mask)
from specdec.tree_attention.hf import resolve_backend, tree_attention_for
from specdec.verifiers import make_verifier
from specdec.verifiers.base import Verifier

__all__ = ["GenerationResult", "GenerationStats", "StepProfile", "generate", "stream", "decode_steps", "prepare_input_ids"]


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


@dataclass
class GenerationStats:
    """Counters of one generation.

    ``mean_accepted_length`` (τ) is ``new_tokens / target_forwards``: tokens
    emitted per decode forward; plain decoding gives ~1 (slightly above,
    since the prefill emits the first token).
    """

    new_tokens: int = 0
    target_forwards: int = 0
    prompt_tokens: int = 0
    wall_time_s: float = 0.0
    prefill_time_s: float = 0.0
    drafted_tokens: int = 0
    accepted_lengths: list[int] = field(default_factory=list)  # tokens emitted per decode step
    profile: StepProfile = field(default_factory=StepProfile)

    @property
    def mean_accepted_length(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else float(self.new_tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards,
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "wall_time_s": round(self.wall_time_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "prompt_tokens": self.prompt_tokens,
            "prefill_time_s": round(self.prefill_time_s, 4),
            "drafted_tokens": self.drafted_tokens,
            "accepted_length_histogram": _histogram(self.accepted_lengths),
            "profile": self.profile.as_dict(),
        }


@dataclass
class GenerationResult:
    """``text`` (None without a tokenizer), ``token_ids`` (new tokens only), ``stats``, ``finish_reason``."""

    text: str | None
    token_ids: list[int]
    stats: GenerationStats
    finish_reason: str  # "eos" | "stop" | "length"


def _histogram(lengths: Sequence[int]) -> dict[str, int]:
    hist: dict[str, int] = {}
    for n in lengths:
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
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
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


def _forward(model, cache: TreeKVCache, tree: TokenTree, hidden: bool, attn: str = "torch"):
    """One target forward over the tree; returns ([N, V] logits, [N, H] last hidden states or None).

    ``attn="torch"`` hands the model a dense 4-D additive mask (its own
    attention runs it); ``"triton"`` hands the packed ancestor bits to the
    tree kernel registered in transformers' attention interface.
    """
    prefix_len = cache.get_seq_length()
    device = model.device
    kwargs = {}
    if len(tree) > 1 and attn == "triton":
        kwargs["specdec_tree_bits"] = pack_ancestor_mask(tree.ancestor_mask.to(device))
        kwargs["specdec_ancestor_mask"] = tree.ancestor_mask.to(device)
    elif len(tree) > 1:  # a lone root is a plain causal step: no mask needed
        kwargs["attention_mask"] = additive_tree_mask(prefix_len, tree.ancestor_mask, model.dtype).to(device)
    out = model(
        input_ids=tree.tokens[None].to(device),
        position_ids=tree.position_ids(prefix_len)[None].to(device),
        cache=cache,
        use_cache=True,
        output_hidden_states=hidden,
        **kwargs,
    )
    return _upcast(out.logits[0]), (out.hidden_states[-1][0] if hidden else None)


def _upcast(logits: Tensor) -> Tensor:
    """Half-precision logits go to float32 for acceptance; float32/64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


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
) -> Iterator[StepEvent]:
    """The core generator: yields each step's emitted tokens until EOS, a stop string or the length limit.

    Args:
        input_ids: [T] long prompt ids (T >= 1).
    """
    stats = stats if stats is not None else GenerationStats()
    prof = stats.profile
    hidden_needed = drafter.needs_hidden_states
    ids = input_ids.clone()
    new: list[int] = []
    cache = TreeKVCache()
    drafter.reset(ids)

    # 1. Prefill: the whole prompt; its last logits give the first token.
    t0 = time.perf_counter()
    logits, hidden = _forward_prefill(model, cache, ids, hidden_needed)
    first = verifier.accept(TokenTree.root_only(int(ids[-1])), logits[-1:], generator, ids[:-1]).bonus
    stats.prefill_time_s += time.perf_counter() - t0
    hidden = hidden[-1:] if hidden is not None else None
    pending = [first]

    while True:
        # 2. Emit what the last step accepted, cut at EOS / stop / length exactly where plain decoding stops.
        emitted, reason = [], None
        for tok in pending:
            emitted.append(tok)
            new.append(tok)
            if tok in eos_ids:
                reason = "eos"
            elif stop is not None and stop.hit(new):
                reason = "stop"
            elif len(new) >= max_new_tokens:
                reason = "length"
            if reason:
                break
        stats.new_tokens = len(new)
        ids = torch.cat([ids, torch.tensor(emitted, dtype=torch.long)])
        yield StepEvent(emitted, reason)
        if reason:
            return

        # 3. Draft.
        t1 = time.perf_counter()
        tree = drafter.propose(DraftState(ids, input_ids.numel(), hidden))
        if int(tree.tokens[0]) != int(ids[-1]):
            raise RuntimeError(f"drafter {drafter.name!r} proposed a tree whose root is not the last committed token")
        t2 = time.perf_counter()

        # 4. Verify: one target forward over the tree, then accept.
        prefix_len = cache.get_seq_length()
        logits, hidden_all = _forward(model, cache, tree, hidden_needed, attn)
        t3 = time.perf_counter()
        acceptance = verifier.accept(tree, logits, generator, ids[:-1])
        t4 = time.perf_counter()

        # 5. Commit the accepted path's KV; hand its hidden states to the drafter.
        cache.commit(prefix_len, acceptance.path)
        hidden = hidden_all[acceptance.path] if hidden_all is not None else None
        t5 = time.perf_counter()
        pending = acceptance.new_tokens(tree)
        drafter.observe(StepResult(tree, acceptance.path, pending, hidden))
        stats.target_forwards += 1
        stats.drafted_tokens += tree.num_drafts
        stats.accepted_lengths.append(len(pending))
        t6 = time.perf_counter()
        prof.draft += t2 - t1
        prof.forward += t3 - t2
        prof.accept += t4 - t3
        prof.commit += t5 - t4
        prof.other += t6 - t5


def _forward_prefill(model, cache: TreeKVCache, ids: Tensor, hidden: bool):
    """Causal forward over the prompt: [T, V] logits (only the last row is used) and hidden states."""
    out = model(
        input_ids=ids[None].to(model.device),
        cache=cache,
        use_cache=True,
        output_hidden_states=hidden,
        logits_to_keep=1,
    )
    return _upcast(out.logits[0]), (out.hidden_states[-1][0] if hidden else None)


# --------------------------------------------------------------------------- public calls
def _setup(model, tokenizer, prompt, drafter, max_new_tokens, temperature, stop, seed, attn="auto", **sampling):
    """Validate everything before any model work; return the pieces of a run."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    input_ids = prepare_input_ids(tokenizer, prompt)
    if input_ids.numel() == 0:
        raise ValueError("the prompt has no tokens; give a non-empty prompt")
    ctx = _context_length(model)
    if ctx is not None and input_ids.numel() >= ctx:
        raise ValueError(
            f"the prompt has {input_ids.numel()} tokens but the model's context is {ctx}; shorten the prompt"
        )
    vocab = model.get_output_embeddings().weight.shape[0]
    if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
        raise ValueError(f"prompt token ids must lie in [0, {vocab}) for this model")
    drafter_obj = build_drafter(drafter)
    drafter_obj.bind(model, tokenizer)
    verifier = make_verifier(model, temperature=temperature, **sampling)
    if temperature > 0 and seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    stop_checker = _StopStrings(tokenizer, stops) if stops else None
    generator = None
    if seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
    backend = resolve_backend(attn, model)
    return input_ids, drafter_obj, verifier, stop_checker, generator, backend


def stream(
    model,
    tokenizer,
    prompt,
    *,
    drafter: "str | Drafter | None" = "prompt-lookup",
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    stop: "str | Sequence[str] | None" = None,
    seed: int | None = None,
    result: dict | None = None,
    **sampling,
) -> Iterator[str]:
    """Speculative generation that yields text as it is accepted.

    Takes the same arguments as :func:`generate`. Yields text pieces (never a
    half-decoded multi-byte character). If ``result`` is a dict, the finished
    :class:`GenerationResult` is stored in it under ``"result"``.
    """
    if tokenizer is None:
        raise ValueError("stream() yields text and needs a tokenizer; use generate() for token ids only")
    sent = 0
    ids: list[int] = []
    holder: dict = {}
    for event in _run(model, tokenizer, prompt, drafter, max_new_tokens, temperature, stop, seed, holder, **sampling):
        ids.extend(event.new_tokens)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if event.finish_reason is None and text.endswith("\ufffd"):
            continue  # wait for the rest of a multi-byte character
        if len(text) > sent:
            yield text[sent:]
            sent = len(text)
    if result is not None:
        result["result"] = holder["result"]


def _run(model, tokenizer, prompt, drafter, max_new_tokens, temperature, stop, seed, holder, **sampling) -> Iterator[StepEvent]:
    input_ids, drafter_obj, verifier, stop_checker, generator, backend = _setup(
        model, tokenizer, prompt, drafter, max_new_tokens, temperature, stop, seed, **sampling
    )
    stats = GenerationStats(prompt_tokens=input_ids.numel())
    new: list[int] = []
    reason = "length"
    t0 = time.perf_counter()
    routed = tree_attention_for(model, backend) if backend == "triton" else contextlib.nullcontext()
    with routed:
        steps = decode_steps(
            model, input_ids, drafter_obj, verifier,
            max_new_tokens=max_new_tokens, eos_ids=_eos_ids(model, tokenizer),
            stop=stop_checker, generator=generator, stats=stats, attn=backend,
        ) if max_new_tokens > 0 else iter(())
        for event in steps:
            new.extend(event.new_tokens)
            reason = event.finish_reason or reason
            stats.wall_time_s = time.perf_counter() - t0
            yield event
    stats.wall_time_s = time.perf_counter() - t0
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else None
    holder["result"] = GenerationResult(text=text, token_ids=new, stats=stats, finish_reason=reason)


def generate(
    model,
    tokenizer,
    prompt,
    *,
    drafter: "str | Drafter | None" = "prompt-lookup",
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    stop: "str | Sequence[str] | None" = None,
    seed: int | None = None,
    **sampling,
) -> GenerationResult:
    """Generate with speculative decoding; greedy output equals the model's own greedy output.

    Args:
        model: a HF causal LM (see :func:`specdec.load_model`).
        tokenizer: its tokenizer; may be None when ``prompt`` is token ids.
        prompt: a string (used as is), a list of chat messages (chat template
            applied with the generation prompt), or token ids ([T] or [1, T]).
        drafter: a spec string (``"prompt-lookup"``, ``"none"``, ...) or a
            :class:`~specdec.drafters.Drafter`.
        max_new_tokens: generation stops after exactly this many new tokens.
        temperature: 0 for greedy (exact); > 0 samples.
        attn: tree attention in the verifying forward: ``"torch"`` (dense
            mask through the model's own attention), ``"triton"`` (the tree
            kernel inside the model's attention layers) or ``"auto"`` (triton
            on CUDA, torch elsewhere). Passed through ``**sampling``.
        stop: stop string(s); generation stops once the new text contains one
            (the tokens that complete it are kept, as HF ``stop_strings`` does).
        seed: makes sampling reproducible.
        **sampling: verifier options (see :func:`specdec.verifiers.make_verifier`).

    Returns:
        :class:`GenerationResult` with ``text``, ``token_ids`` (new only),
        ``stats`` and ``finish_reason``.
    """
    holder: dict = {}
    for _ in _run(model, tokenizer, prompt, drafter, max_new_tokens, temperature, stop, seed, holder, **sampling):
        pass
    return holder["result"]
