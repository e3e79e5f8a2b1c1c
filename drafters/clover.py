"""Clover and Clover-2: regressive draft heads (Xiao et al., 2024, "Clover: Regressive Lightweight
Speculative Decoding with Sequential Knowledge"; Clover-2, 2024).

Medusa's heads each guess one future position from the same hidden state and
cannot know what the heads before them guessed. Clover adds that sequential
knowledge with three parts. Notation: h_t ∈ R^H is the target's last hidden
state at position t (it predicted token x_{t+1}); e(x) the target's own
(frozen) token embedding; W the target's (frozen) output head, restricted to a
draft vocabulary; RMSNorm with learnt gain.

* **Attention Decoder** (fuses a state with a token): the token enters as
  ê = RMSNorm(e(x)) (so it is on the scale of the states), and per attention
  head j of size D = H / heads,

      g_j   = 1 + cos( [W_q RMSNorm(s)]_j , [W_k ê]_j )     (one scalar per head, in [0, 2])
      AD(s, ê) = s + concat_j( g_j · [W_v ê]_j )

  it lets the token choose which parts of the state to write into. W_v starts
  at zero, so AD starts as the identity on s, and the gate starts near 1, so
  W_v learns at full rate from the first step.
* **Augmenting Block**: one decoder layer of the target's own architecture
  (initialised from the target's last layer), run causally over the fused
  states of the whole sequence, u_t = AD_in(h_t, ê_{t+1}), behind a learnt
  per-channel gate α that starts at zero:

      z_t = RMSNorm( u_t + α ⊙ (Layer(u_1 .. u_t)_t − u_t) )

  it reshapes the states for speculation rather than next-token prediction,
  and keeps its own KV cache over the committed positions. (The layer reads
  the target's final states, not the inputs its copy was trained on; the
  gate lets training open it gradually instead of starting from noise.)
* **Regressive Connection** (the heads): the first draft token comes from z_t,
  every later one from the state updated with the token chosen at its parent:

      s_0 = z_t,                              o_0 = s_0 + SiLU(A s_0)
      s_d = AD_r(s_{d-1}, ê(y_d)),            o_d = s_d + SiLU(B [s_d ; ê(y_d)])      (d >= 1)
      p(y_{d+1} | ...) = softmax( W RMSNorm(o_d) )

  y_1 is drawn from o_0's distribution, y_{d+1} from o_d's. A, B, AD_in, AD_r,
  α and the norms are trained (A and B start at zero, as Medusa's residual
  blocks do, so every depth starts from the target's own head); W and e are
  the target's.

Clover-2 keeps the architecture and changes training: knowledge distillation
(KL to the target's own distribution instead of cross-entropy on its tokens)
and a regression of each head's state o_d onto the target's hidden state at
the position it stands for (SmoothL1), so the heads imitate the target's
features (:mod:`specdec.training.clover`).

Drafting walks the tree depth by depth: the children of a node come from the
head fed with that node's own token, so siblings at depth d + 1 are
conditioned on their own parent. Each depth keeps the ``beam`` most probable
nodes by path probability; the engine then trims the tree to what pays.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.drafters.base import (DraftState, Drafter, StepResult, Target, config_from_options, drafter_path,
                                   keep_draft_rows, most_frequent_rows, read_drafter_config, read_drafter_weights,
                                   register_drafter, set_draft_counts, write_drafter)
from specdec.drafters.trie import depth_bucket, freq_bucket
from specdec.sizing import AcceptanceRates, best_of_sorted, descending, learn, nodes_cost
from specdec.tree import TokenTree

# what a trained drafter's ``dtype=`` option accepts (see :func:`place_heads`)
DRAFT_PRECISIONS = ("auto", "q8_0", "float32", "bfloat16", "float16", "float64")

__all__ = ["CloverConfig", "CloverHeads", "CloverDrafter", "AttentionDecoder", "decoder_parts"]

FORMAT_VERSION = 2  # 2: gated Augmenting Block, residual heads, normalised token input (format 1 is not read)


@dataclass
class CloverConfig:
    """What ``config.json`` holds."""

    hidden_size: int
    vocab_size: int  # the target's vocabulary
    num_heads: int = 4  # draft depth trained (the regressive head is shared by every depth after the first)
    attention_heads: int = 9  # heads of the Attention Decoders
    draft_vocab_size: int | None = None  # None: the full vocabulary
    augment: bool = True  # the Augmenting Block (a copy of the target's last decoder layer)
    version: int = 1  # 1: Clover; 2: Clover-2 (trained with distillation and state regression)
    rms_norm_eps: float = 1e-5
    target_model: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_heads < 1 or self.hidden_size % self.attention_heads:
            raise ValueError(f"num_heads must be >= 1 and hidden_size ({self.hidden_size}) divisible by attention_heads ({self.attention_heads})")
        if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in (0, vocab_size={self.vocab_size}]")


class AttentionDecoder(nn.Module):
    """AD(s, ê) = s + concat_j((1 + cos([W_q RMSNorm(s)]_j, [W_k ê]_j)) · [W_v ê]_j): a token writes into a state, per head."""

    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads, self.eps = heads, eps
        self.norm = nn.RMSNorm(hidden, eps=eps)
        self.q, self.k, self.v = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        nn.init.zeros_(self.v.weight)  # starts as the identity on s: training adds what the token contributes
        nn.init.zeros_(self.v.bias)

    def gate(self, s: Tensor, e: Tensor) -> Tensor:
        """[..., heads]: 1 + the per-head cosine between the state's query and the token's key."""
        shape = (*s.shape[:-1], self.heads, s.shape[-1] // self.heads)
        return 1.0 + F.cosine_similarity(self.q(self.norm(s)).view(shape), self.k(e).view(shape), dim=-1, eps=self.eps)

    def forward(self, s: Tensor, e: Tensor) -> Tensor:
        """s, e: [..., H] → [..., H]."""
        shape = (*s.shape[:-1], self.heads, s.shape[-1] // self.heads)
        return s + (self.v(e).view(shape) * self.gate(s, e)[..., None]).reshape(s.shape)


def decoder_parts(model) -> tuple[nn.Module, nn.Module]:
    """The target's last decoder layer and its rotary embedding (HF decoder-only models)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(decoder, "layers", None)
    if layers is None or not hasattr(decoder, "rotary_emb"):
        raise ValueError(f"Clover's Augmenting Block needs a decoder with .layers and .rotary_emb; {type(model).__name__} has none")
    return layers[-1], decoder.rotary_emb


class CloverHeads(nn.Module):
    """The trainable parts and the draft computation (see the module docstring for the equations).

    Args:
        config: sizes and options.
        layer: the Augmenting Block's decoder layer (a copy of the target's last layer), or None.
        rotary: the target's rotary embedding module (positions for the Augmenting Block).
        embed: the target's input embedding module (frozen, not saved).
        lm_head_weight: [V, H] the target's output head (frozen, not saved; rows of the draft vocabulary used).
        draft_vocab: [V'] token id of each output row.
    """

    def __init__(self, config: CloverConfig, layer: nn.Module | None = None, rotary: nn.Module | None = None,
                 embed: nn.Module | None = None, lm_head_weight: Tensor | None = None, draft_vocab: Tensor | None = None,
                 draft_counts: Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        h, eps = config.hidden_size, config.rms_norm_eps
        self.fuse = AttentionDecoder(h, config.attention_heads, eps)  # AD_in
        self.regress = AttentionDecoder(h, config.attention_heads, eps)  # AD_r
        self.tok_norm = nn.RMSNorm(h, eps=eps)  # ê = RMSNorm(e(x))
        self.first = nn.Linear(h, h)  # A
        self.next = nn.Linear(2 * h, h)  # B
        for lin in (self.first, self.next):  # residual heads start as the identity (the target's own head)
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.out_norm = nn.RMSNorm(h, eps=eps)
        self.aug_norm = nn.RMSNorm(h, eps=eps)
        self.aug_gate = nn.Parameter(torch.zeros(h))  # α: the Augmenting Block opens as training finds it useful
        self.layer = None
        if config.augment:
            if layer is None:
                raise ValueError("an augmenting Clover needs the target's last decoder layer to build its block")
            self.layer = copy.deepcopy(layer)
            self.layer.self_attn.layer_idx = 0  # its own cache holds one layer
            for p in self.layer.parameters():
                p.requires_grad_(True)
        self._frozen = (embed, rotary)  # the target's modules: a tuple, so they are neither registered nor saved
        v_out = config.draft_vocab_size or config.vocab_size
        dv = draft_vocab if draft_vocab is not None else torch.arange(v_out)
        self.register_buffer("draft_vocab", dv.to(torch.long).clone())
        set_draft_counts(self, draft_counts)
        self._head: Tensor | None = None
        if lm_head_weight is not None:
            self.attach(embed, lm_head_weight, rotary)

    def attach(self, embed: nn.Module, lm_head_weight: Tensor, rotary: nn.Module | None) -> None:
        """Give the heads the target's frozen embedding, output rows and rotary embedding."""
        if lm_head_weight.shape != (self.config.vocab_size, self.config.hidden_size):
            raise ValueError(f"Clover heads expect an lm_head of shape ({self.config.vocab_size}, {self.config.hidden_size}), "
                             f"got {tuple(lm_head_weight.shape)}")
        self._frozen = (embed, rotary)
        self._head = lm_head_weight.detach()[self.draft_vocab.to(lm_head_weight.device)].to(self.first.weight.dtype)

    def keep_rows(self, rows: Tensor) -> "CloverHeads":
        """Keep only these rows of the draft vocabulary (indices into it); call before :meth:`attach`."""
        keep_draft_rows(self, rows)
        self._head = None
        return self

    def embed(self, ids: Tensor) -> Tensor:
        """ê = RMSNorm(e(ids)): the target's frozen embedding, on the scale of the states."""
        with torch.no_grad():
            e = self._frozen[0](ids).to(self.first.weight.dtype)
        return self.tok_norm(e)

    # ------------------------------------------------------------------ the computation
    def encode(self, hidden: Tensor, next_ids: Tensor, position_ids: Tensor, cache=None, mask: Tensor | None = None) -> Tensor:
        """z for each position: hidden [B, T, H] at positions ``position_ids`` [B, T], next_ids [B, T] the tokens they
        predicted; ``cache`` (the Augmenting Block's own) and ``mask`` ([B, 1, T, P + T] additive) as for a decoder layer."""
        u = self.fuse(hidden.to(self.first.weight.dtype), self.embed(next_ids))
        if self.layer is not None:
            cos_sin = self._frozen[1](u, position_ids)
            kwargs = {"cache": cache, "use_cache": cache is not None} if cache is not None else {}
            out = self.layer(u, attention_mask=mask, position_ids=position_ids, position_embeddings=cos_sin, **kwargs)
            if isinstance(out, tuple):
                out = out[0]
            u = u + self.aug_gate * (out - u)
        return self.aug_norm(u)

    def head_first(self, z: Tensor) -> Tensor:
        """o_0 = z + SiLU(A z)."""
        return z + F.silu(self.first(z))

    def head_next(self, s: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """s_d = AD_r(s_{d-1}, ê(y_d)); o_d = s_d + SiLU(B [s_d ; ê(y_d)]). Returns (s_d, o_d)."""
        e = self.embed(token_ids)
        s = self.regress(s, e)
        return s, s + F.silu(self.next(torch.cat([s, e], dim=-1)))

    def logits(self, o: Tensor) -> Tensor:
        """[..., H] → [..., V'] over the draft vocabulary, through the target's own output rows."""
        if self._head is None:
            raise RuntimeError("these heads use the target's lm_head: call attach(...) (a drafter does it at bind)")
        return self.out_norm(o) @ self._head.to(o.dtype).T

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path) -> None:
        write_drafter(path, self.config, self)

    @classmethod
    def from_pretrained(cls, path: str | Path, layer: nn.Module | None = None) -> tuple["CloverHeads", dict]:
        """Read a Clover directory. The Augmenting Block needs the target's layer for its structure: pass it, or
        call :meth:`load_state` later with the returned state (a drafter does at bind)."""
        path = Path(path)
        raw = read_drafter_config(path / "config.json")
        if raw.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(f"{path} was saved by a newer specdec (format {raw['format_version']}); upgrade specdec")
        if raw.get("format_version", 1) < FORMAT_VERSION:
            raise ValueError(f"{path} holds Clover heads of the first layout (format {raw.get('format_version', 1)}), which this "
                             f"specdec no longer reads; retrain them (specdec train --recipe clover-smollm2-cpu)")
        config = CloverConfig(**{k: v for k, v in raw.items() if k in CloverConfig.__dataclass_fields__})
        state = read_drafter_weights(path / "model.safetensors")
        if "draft_vocab" not in state:
            raise ValueError(f"{path / 'model.safetensors'} holds no Clover heads (no draft_vocab tensor)")
        return config, state

    def load_state(self, state: dict, source: str = "") -> "CloverHeads":
        try:
            self.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{source or 'the Clover checkpoint'} does not fit this target: {str(err).splitlines()[0]}") from None
        return self


@dataclass
class CloverDrafterConfig:
    """Spec options: ``clover:PATH,depth=5,beam=6,topk=6`` (``sample=true`` for sampling runs: drafts drawn from q)."""

    depth: int = 0  # draft depth; 0: the trained num_heads
    beam: int = 6  # nodes kept per depth (by path probability)
    topk: int = 6  # children tried per node
    decay: float = 0.9
    min_score: float = 0.05  # when nodes cost something (a measured cost, no node budget): stop deepening once every new node's acceptance estimate is below it
    sample: bool = False  # draw drafts from the heads' distribution and carry it (draft_probs) for speculative sampling
    dtype: str = "auto"  # the heads' precision: "auto" (q8_0 for an fp32 target on a CPU with the native kernel, else
    # bfloat16 where measured faster), "q8_0" or a dtype name (see place_heads)
    # > 0: draft only over the N most frequent tokens of the draft vocabulary (a cheaper head at every depth;
    # see specdec.drafters.base.most_frequent_rows); 0: the whole draft vocabulary
    vocab: int = 0

    def __post_init__(self) -> None:
        if self.depth < 0 or self.beam < 1 or self.topk < 1:
            raise ValueError("clover options need depth >= 0, beam >= 1 and topk >= 1")
        if self.vocab < 0:
            raise ValueError(f"vocab must be 0 (the whole draft vocabulary) or a positive count, got {self.vocab}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.dtype not in DRAFT_PRECISIONS:
            raise ValueError(f"dtype must be one of {', '.join(DRAFT_PRECISIONS)}, got {self.dtype!r}")


# The heads' own probability of a draft, bucketed for the running acceptance estimates (finer than the
# frequency buckets of the copy drafters: most siblings sit below 0.2, and a node budget must rank them).
PROB_BUCKETS = (0.03, 0.07, 0.15, 0.3, 0.5, 0.7, 0.85)
_PROB_MIDS = (0.015, 0.05, 0.11, 0.22, 0.4, 0.6, 0.78, 0.92)


def prob_prior(key: tuple) -> float:
    """Before any verdict: the bucket's middle probability, a little discounted."""
    return 0.9 * _PROB_MIDS[key[-1]]


_MEASURED: dict = {}


def drafting_cost(target: Target | None) -> Callable[[int], float] | None:
    """The target's cost curve when extra nodes cost it something, else None (nodes are free: draft every depth)."""
    cost = getattr(target, "cost", None)
    return cost if nodes_cost(cost) else None


def place_heads(module: nn.Module, target: Target, rows: int, choice: str = "auto") -> str:
    """Put a drafter's own module on the target's device in the precision it drafts in, and say which.

    ``q8_0`` (``auto``'s first choice for an fp32 target on a CPU where the native kernel builds): the module
    stays fp32 and its linear layers run from Q8_0 blocks (:func:`specdec.quant.quantize_linears`), reading a
    quarter of fp32's bytes per draft depth. Otherwise a dtype (:func:`heads_dtype`). Drafts are guesses the
    target verifies, so the choice never changes an output."""
    from specdec.quant import dequantize_linears

    if choice in ("auto", "q8_0") and draft_in_q8_0(module, target):
        return "q8_0"
    dequantize_linears(module)
    dtype = heads_dtype(target, rows, "auto" if choice == "q8_0" else choice)
    module.to(device=target.device, dtype=dtype)
    return str(dtype).removeprefix("torch.")


def draft_in_q8_0(module: nn.Module, target: Target) -> bool:
    """For an fp32 target on a CPU where the native kernel builds: put ``module`` there in fp32 with its linear
    layers running from Q8_0 blocks (:func:`specdec.quant.quantize_linears`), and say True; otherwise change
    nothing and say False."""
    from specdec.quant import quantize_linears

    if target.dtype != torch.float32 or torch.device(target.device).type != "cpu":
        return False
    module.to(device=target.device, dtype=torch.float32)
    return quantize_linears(module) > 0


def heads_dtype(target: Target, rows: int, choice: str = "auto") -> torch.dtype:
    """The dtype the heads draft in. Drafts are only guesses the target verifies (and in sampling runs q is
    computed in that dtype and used as such), so their precision never changes an output; the cost of drafting
    is reading the heads' weights (mostly the draft-vocabulary rows of the output head, once per depth). With
    ``auto``, an fp32 target on a CPU drafts in bfloat16 when a bfloat16 product of the head's shape measures
    faster here (on CPUs with native bf16 it reads half the bytes; elsewhere it is emulated and slower)."""
    if choice != "auto":
        return getattr(torch, choice)
    if target.dtype != torch.float32 or torch.device(target.device).type != "cpu":
        return target.dtype
    key = (rows, target.hidden_size, torch.get_num_threads())
    if key not in _MEASURED:
        import statistics
        import time

        w = torch.randn(rows, target.hidden_size)
        x = torch.randn(6, target.hidden_size)
        best = {}
        for dt in (torch.float32, torch.bfloat16):
            wd, xd = w.to(dt), x.to(dt)
            times = []
            for _ in range(7):
                t = time.perf_counter()
                for _ in range(5):
                    F.linear(xd, wd)
                times.append(time.perf_counter() - t)
            best[dt] = statistics.median(times)
        _MEASURED[key] = torch.bfloat16 if best[torch.bfloat16] < 0.8 * best[torch.float32] else torch.float32
    return _MEASURED[key]


@register_drafter("clover")
class CloverDrafter(Drafter):
    """Drafts a tree depth by depth with Clover heads; each child is conditioned on its own parent's token."""

    name = "clover"
    needs_hidden_states = True
    skippable = True  # its next propose encodes every position committed since its last (see Drafter.skippable)

    def __init__(self, config: CloverConfig, state: dict, options: CloverDrafterConfig | None = None, source: str = "") -> None:
        self.clover_config, self._state, self.source = config, state, source
        self.options = options or CloverDrafterConfig()
        self.vocab_size = config.vocab_size
        self.heads: CloverHeads | None = None
        self.rates = AcceptanceRates(prob_prior, self.options.decay)
        self._cost = None  # the target's v(n) when extra nodes cost it anything (set at reset from target.cost)

    @classmethod
    def from_spec(cls, args: list[str], kwargs: dict[str, str]) -> "CloverDrafter":
        path = drafter_path(args, "clover-smollm2-135m", cls.name, kwargs)
        opts = config_from_options(CloverDrafterConfig, kwargs, cls.name)
        config, state = CloverHeads.from_pretrained(path)
        return cls(config, state, opts, str(path))

    @classmethod
    def from_heads(cls, heads: CloverHeads, options: CloverDrafterConfig | None = None) -> "CloverDrafter":
        """A drafter from heads in memory (e.g. just trained)."""
        return cls(heads.config, {k: v.detach().clone() for k, v in heads.state_dict().items()}, options)

    def bind(self, target: Target) -> None:
        super().bind(target)
        if target.hidden_size != self.clover_config.hidden_size:
            raise ValueError(f"Clover heads were trained for hidden size {self.clover_config.hidden_size}, the target has "
                             f"{target.hidden_size}; use heads trained for this model")
        layer, rotary = decoder_parts(target.model) if self.clover_config.augment else (None, None)
        if self.heads is None:
            heads = CloverHeads(self.clover_config, layer, rotary, draft_vocab=self._state["draft_vocab"],
                                draft_counts=self._state.get("draft_counts"))
            heads.load_state(self._state, self.source)
            if self.options.vocab:
                heads.keep_rows(most_frequent_rows(heads.draft_counts, self.options.vocab, self.name, self.source))
            self.heads = heads.eval()
        rows = self.heads.draft_vocab.numel()
        self.precision = place_heads(self.heads, target, rows, self.options.dtype)
        self.heads.attach(target.input_embeddings, target.output_weight, rotary)

    def reset(self, prompt_ids: Tensor) -> None:
        from specdec.cache import TreeKVCache

        self.cache = TreeKVCache()
        self.rates = AcceptanceRates(prob_prior, self.options.decay)
        self._keys: dict = {}
        self._cost = drafting_cost(getattr(self, "target", None))

    @torch.inference_mode()
    def propose(self, state: DraftState) -> TokenTree:
        heads, dev = self.heads, self.target.device
        # 1. the Augmenting Block over the positions committed since the last step (its own cache holds the rest)
        k = state.hidden_states.shape[0]
        pos = torch.arange(state.hidden_start, state.hidden_start + k, device=dev)
        next_ids = state.token_ids[state.hidden_start + 1 : state.hidden_start + 1 + k].to(dev)
        mask = _causal_mask(self.cache.get_seq_length(), k, heads.first.weight.dtype, dev) if k > 1 or self.cache.get_seq_length() else None
        z = heads.encode(state.hidden_states[None], next_ids[None], pos[None], self.cache, mask)[0, -1]  # [H]
        # 2. depth by depth
        return self._tree(state.root, z)

    def _tree(self, root: int, z: Tensor) -> TokenTree:
        """Depth by depth from the state ``z`` (see :func:`grow_tree`); each child's state comes from the
        regressive head fed with the child's own token."""
        heads = self.heads
        first = torch.log_softmax(heads.logits(heads.head_first(z)).float(), -1)[None]  # [1, V']
        states = [z[None]]

        def expand(rows: list[int], tokens: list[int], parents: list[int], nodes: list[int]) -> Tensor:
            s, o = heads.head_next(states[0][rows], torch.tensor(tokens, device=z.device))
            states[0] = s
            return torch.log_softmax(heads.logits(o).float(), -1)

        tree, self._keys = grow_tree(root, first, expand, heads.draft_vocab, self.options.depth or self.clover_config.num_heads,
                                     self.options, self.rates, self.target.generator, self._cost, self.vocab_size,
                                     self.target.max_nodes)
        return tree

    def observe(self, result: StepResult) -> None:
        if self._keys:
            learn(self.rates, self._keys, result.tree, result.path)


def _causal_mask(prefix: int, n: int, dtype: torch.dtype, device) -> Tensor:
    """[1, 1, n, prefix + n] additive: the prefix and the chunk's own earlier positions are visible."""
    from specdec.tree_attention.reference import additive_tree_mask

    return additive_tree_mask(prefix, torch.tril(torch.ones(n, n, dtype=torch.bool)), dtype).to(device)


def deepening_pays(score: list[float], frontier: list[int], cost: Callable[[int], float], max_nodes: int) -> bool:
    """Whether a node of the newest depth is among the drafts the engine's trim would keep from this tree.

    ``score`` holds every node's acceptance estimate (root first), ``frontier`` the newest depth's nodes. The
    trim keeps the k best-scoring drafts (:func:`specdec.sizing.best_size`); a child never scores above its
    parent, so when no frontier node makes the cut, the next depth's nodes rank below nodes already left out.
    """
    top = descending(score[1:], max_nodes - 1)
    k, _ = best_of_sorted(top, cost)
    return k > 0 and max(score[n] for n in frontier) >= top[k - 1]


def grow_tree(root: int, first_logp: Tensor, expand: Callable, vocab: Tensor, depth: int, opts, rates: AcceptanceRates,
              generator, cost: Callable[[int], float] | None, vocab_size: int, max_nodes: int = 64) -> tuple[TokenTree, dict]:
    """A draft tree grown depth by depth from a drafter's distributions (Clover's heads, EAGLE's layer).

    Args:
        root: the last committed token (node 0).
        first_logp: [1, V'] log-probabilities of the root's children over the draft vocabulary.
        expand: ``expand(rows, tokens, parents, nodes) -> [F', V']`` log-probabilities of the children of the
            new frontier: node ``nodes[i]`` holds ``tokens[i]``, is a child of node ``parents[i]`` and of frontier
            row ``rows[i]`` of the previous call (row 0: the root).
        vocab: [V'] the draft vocabulary's token ids.
        opts: ``beam``, ``topk``, ``min_score``, ``sample`` (see :class:`CloverDrafterConfig`).
        rates: running acceptance estimates keyed by (depth bucket, probability bucket).
        cost: the target's v(n) when extra nodes cost it something (None: nodes are free, draft every depth).
        max_nodes: the most nodes the engine lets a forward hold (what it trims to).

    Each depth keeps the ``beam`` most probable nodes by path probability. Node scores are the estimated
    chance the target accepts the node (the product of its path's estimates), which the engine sizes by.

    With a cost, drafting stops at the first depth none of whose nodes the engine's trim would keep (see
    :func:`deepening_pays`) or whose nodes all score below ``opts.min_score``: their children score no
    higher than they do, so a deeper pass would cost a drafter forward for nodes the engine throws away.

    With ``opts.sample`` (for speculative sampling), each node's children are drawn from q without
    replacement, and every child carries q renormalised over the tokens its earlier siblings took
    (``draft_probs``: the sampler accepts with p/q, exactly). A node keeps a prefix of its draws, in draw
    order, with scores that never rise along it, so any trim the engine makes keeps a prefix too.

    Returns:
        (tree, keys): ``keys`` maps each node's token path to its estimate's key (for :func:`learn`).
    """
    sample = opts.sample
    vocab_cpu = vocab.cpu()
    tokens, parents, score, path_lp = [root], [-1], [1.0], [0.0]
    q_rows: list[Tensor | None] = [None]
    paths: list[tuple[int, ...]] = [()]
    keys: dict = {}
    logp, frontier = first_logp, [0]
    for d in range(1, depth + 1):
        k = min(opts.topk, logp.shape[-1])
        if sample:  # draw order: torch draws without replacement, each draw from what is left, renormalised
            p = logp.exp()
            ids = torch.multinomial(p, k, replacement=False, generator=generator)
            values, ids, probs = logp.gather(1, ids).cpu(), ids.cpu(), p.cpu()
        else:
            top = logp.topk(k, dim=-1)  # [F, k]
            values, ids = top.values.cpu(), top.indices.cpu()
        cand = values + torch.tensor([path_lp[n] for n in frontier])[:, None]
        chosen = torch.topk(cand.flatten(), min(opts.beam, cand.numel())).indices.tolist()
        if sample:  # as many children per node as the beam gave it, but the first of its draws
            counts = torch.bincount(torch.tensor(chosen) // k, minlength=len(frontier)).tolist()
            chosen = [i * k + j for i in range(len(frontier)) for j in range(counts[i])]
        new_frontier, rows, new_tokens, new_parents = [], [], [], []
        for f in chosen:
            i, j = divmod(f, k)
            parent, tok = frontier[i], int(vocab_cpu[ids[i, j]])
            key = (depth_bucket(d), freq_bucket(float(values[i, j].exp()), PROB_BUCKETS))
            tokens.append(tok)
            parents.append(parent)
            path_lp.append(float(cand[i, j]))
            s_new = score[parent] * rates[key]
            if sample:
                if j:  # never above the sibling drawn before it
                    s_new = min(s_new, score[-1])
                left = probs[i].clone()
                left[ids[i, :j]] = 0.0
                q = torch.zeros(vocab_size, dtype=torch.float32)
                q[vocab_cpu] = left / left.sum().clamp(min=1e-30)
                q_rows.append(q)
            score.append(s_new)
            paths.append(paths[parent] + (tok,))
            keys[paths[-1]] = key
            new_frontier.append(len(tokens) - 1)
            rows.append(i)
            new_tokens.append(tok)
            new_parents.append(parent)
        if d == depth or (cost is not None and (max(score[n] for n in new_frontier) < opts.min_score
                                                 or not deepening_pays(score, new_frontier, cost, max_nodes))):
            break  # (nodes that unlikely are trimmed by the engine anyway: drafting deeper would be wasted)
        logp = expand(rows, new_tokens, new_parents, new_frontier)
        frontier = new_frontier
    tree = TokenTree(torch.tensor(tokens), torch.tensor(parents), scores=torch.tensor(score))
    if sample:
        q_rows[0] = torch.zeros(vocab_size, dtype=torch.float32)
        tree.draft_probs = torch.stack(q_rows)
    return tree, keys
