"""EAGLE-3-class drafter (Li et al., 2025, "EAGLE-3: Scaling up Inference Acceleration of Large Language Models
via Training-Time Test"; its dynamic tree from EAGLE-2, 2024).

Notation: f_t^(l) is the target's hidden state at position t after layer l, x_t the token at t, e(x) the
target's (frozen) token embedding, W' the output head restricted to a draft vocabulary (FR-Spec: the most
frequent target tokens; a small vocabulary makes the drafter's own head cheap on a small target).

* **Fusion**: the low, middle and high layers' states, side by side, pass one linear map:
  g_t = FC([f_t^(low); f_t^(mid); f_t^(high)]) ∈ R^H.
* **One decoder layer with its own KV cache**: its input at position t pairs a state with the *next* token,
  u_t = [RMSNorm(e(x_{t+1})); RMSNorm(s_t)] ∈ R^{2H}; queries, keys and values come from u_t (so the
  projections read 2H), the residual stream starts at s_t, and an MLP follows (a Llama layer otherwise).
  Its output h_t predicts x_{t+2}: p = softmax(W' RMSNorm(h_t)).
* **Drafting deeper** feeds the layer its own output: s = h of the parent node, the token = the parent's
  drafted token, at the next position, attending to the committed positions (computed from the target's
  states, s_t = g_t) and to its own ancestors' entries.
* **Training-time test**: the layer is trained on its own unrolled outputs for k steps (step j at index t reads
  h^{j-1}_t and token x_{t+1+j}, attends to step 0's entries at positions <= t and to its own chain's entries
  of steps 1..j), with KL to the target's distribution at each step (:mod:`specdec.training.eagle`).

Drafting (EAGLE-2's dynamic tree): depth by depth, the children of the ``beam`` most probable nodes (by path
probability under the drafter) are expanded; node scores estimate the chance the target accepts each node,
and the engine trims the tree to the size that pays on this machine. With ``sample=true`` the children are
drawn from q and carry it (``draft_probs``), so speculative sampling stays lossless.
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.drafters.base import (DraftState, Drafter, StepResult, Target, config_from_options, drafter_path, keep_draft_rows,
                                   most_frequent_rows, read_drafter_config_versioned, read_drafter_weights, register_drafter,
                                   set_draft_counts, write_drafter)
from specdec.drafters.clover import DRAFT_PRECISIONS, drafting_cost, grow_tree, place_heads, prob_prior
from specdec.sizing import AcceptanceRates, learn
from specdec.tree import TokenTree

__all__ = ["EagleConfig", "EagleModel", "EagleDrafter", "EagleDrafterConfig", "default_feature_layers"]

FORMAT_VERSION = 1


def default_feature_layers(num_layers: int) -> list[int]:
    """EAGLE-3's low, middle and high layers as ``hidden_states`` indices for a target of ``num_layers`` layers
    (after layer 2, the middle one and the third from last; fewer, distinct, on a shallow model)."""
    picks = [min(2, num_layers - 1), num_layers // 2, num_layers - 3]
    out: list[int] = []
    for i in picks:
        i = max(1, min(num_layers - 1, i))
        if i not in out:
            out.append(i)
    return out or [num_layers]


@dataclass
class EagleConfig:
    """The drafter's shape (saved as config.json)."""

    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    feature_layers: list[int]
    draft_vocab_size: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    ttt_steps: int = 4  # steps unrolled in training (the depth it was trained for)
    target_model: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_heads} heads, and those into "
                             f"{self.num_kv_heads} key/value heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def for_target(cls, model, feature_layers: list[int] | None = None, draft_vocab_size: int | None = None, **extra) -> "EagleConfig":
        c = model.config
        theta = getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        return cls(hidden_size=c.hidden_size, vocab_size=model.get_output_embeddings().weight.shape[0],
                   num_heads=c.num_attention_heads, num_kv_heads=getattr(c, "num_key_value_heads", c.num_attention_heads),
                   intermediate_size=c.intermediate_size, feature_layers=feature_layers or default_feature_layers(c.num_hidden_layers),
                   draft_vocab_size=draft_vocab_size, rope_theta=float(theta), rms_norm_eps=getattr(c, "rms_norm_eps", 1e-5), **extra)


class _RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


_INV_FREQ: dict = {}


def _rotate(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """Rotary embedding of x [B, heads, T, D] at positions pos [B, T] (Llama's half-split layout)."""
    d = x.shape[-1]
    key = (d, theta, x.device)
    if key not in _INV_FREQ:
        _INV_FREQ[key] = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos.to(torch.float32)[..., None] * _INV_FREQ[key]  # [B, T, D/2]
    cos, sin = ang.cos(), ang.sin()
    cos, sin = torch.cat([cos, cos], -1)[:, None].to(x.dtype), torch.cat([sin, sin], -1)[:, None].to(x.dtype)
    half = d // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def attend(q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> Tensor:
    """Attention: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], visible [B or 1, Tq, Tk] bool -> [B, Tq, Hq·D]."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], enable_gqa=True)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class _Entries:
    """The drafter's own keys and values [1, Hkv, capacity, D], grown by doubling: the committed positions
    first, then (scratch, overwritten by the next step) the entries of the tree being drafted."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def reserve(self, at: int, need: int, like: Tensor, heads: int, dim: int) -> None:
        """Room for entries below ``need``, keeping those below ``at``."""
        if self.k is None or need > self.k.shape[2]:
            cap = max(need, 2 * (0 if self.k is None else self.k.shape[2]), 64)
            big_k, big_v = like.new_empty(1, heads, cap, dim), like.new_empty(1, heads, cap, dim)
            if self.k is not None:
                big_k[:, :, :at], big_v[:, :, :at] = self.k[:, :, :at], self.v[:, :, :at]
            self.k, self.v = big_k, big_v

    def write(self, at: int, k: Tensor, v: Tensor) -> None:
        need = at + k.shape[2]
        self.reserve(at, need, k, k.shape[1], k.shape[3])
        self.k[:, :, at:need], self.v[:, :, at:need] = k, v


class EagleModel(nn.Module):
    """FC fusion, one decoder layer over [token; state], the draft-vocabulary head.

    The target's embedding is attached (never saved); ``head`` starts from the target's output rows of the
    draft vocabulary and is trained with the rest.
    """

    def __init__(self, config: EagleConfig, draft_vocab: Tensor, head_rows: Tensor | None = None,
                 draft_counts: Tensor | None = None) -> None:
        super().__init__()
        c = self.config = config
        h, d = c.hidden_size, c.head_dim
        self.fc = nn.Linear(len(c.feature_layers) * h, h, bias=False)
        self.norm_e, self.norm_s = _RMSNorm(h, c.rms_norm_eps), _RMSNorm(h, c.rms_norm_eps)
        self.q_proj = nn.Linear(2 * h, c.num_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, c.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, c.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(c.num_heads * d, h, bias=False)
        self.norm_mlp = _RMSNorm(h, c.rms_norm_eps)
        self.gate = nn.Linear(h, c.intermediate_size, bias=False)
        self.up = nn.Linear(h, c.intermediate_size, bias=False)
        self.down = nn.Linear(c.intermediate_size, h, bias=False)
        self.norm_out = _RMSNorm(h, c.rms_norm_eps)
        self.head = nn.Linear(h, draft_vocab.numel(), bias=False)
        if head_rows is not None:
            self.head.weight.data.copy_(head_rows)
        self.register_buffer("draft_vocab", draft_vocab.clone())
        set_draft_counts(self, draft_counts)
        self._embed: tuple = ()

    def keep_rows(self, rows: Tensor) -> "EagleModel":
        """Keep only these rows of the draft vocabulary (indices into it): a smaller, cheaper head."""
        self.head.weight = nn.Parameter(self.head.weight.data[rows].clone(), requires_grad=self.head.weight.requires_grad)
        self.head.out_features = rows.numel()
        keep_draft_rows(self, rows)
        self.config.draft_vocab_size = rows.numel()
        return self

    def attach(self, embeddings: nn.Module) -> "EagleModel":
        """The target's token embedding (kept outside the module: frozen, shared, not saved)."""
        self._embed = (embeddings,)
        return self

    def embed(self, ids: Tensor) -> Tensor:
        return self._embed[0](ids).to(self.fc.weight.dtype)

    def fuse(self, features: Tensor) -> Tensor:
        """[..., L·H] the target's chosen layers -> [..., H] the state of a committed position."""
        return self.fc(features.to(self.fc.weight.dtype))

    def project(self, state: Tensor, token: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, Hq, T, D], k, v [B, Hkv, T, D] (rotary at ``pos`` [B, T]) from states [B, T, H] and next tokens [B, T]."""
        c = self.config
        u = torch.cat([self.norm_e(self.embed(token)), self.norm_s(state)], -1)
        b, t, _ = u.shape
        q = self.q_proj(u).view(b, t, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(u).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(u).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        return _rotate(q, pos, c.rope_theta), _rotate(k, pos, c.rope_theta), v

    def finish(self, attn: Tensor, state: Tensor) -> Tensor:
        """The layer's output h [B, T, H] from the attention output [B, T, Hq·D] and the residual ``state``."""
        x = state + self.o_proj(attn)
        y = self.norm_mlp(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))

    def logits(self, h: Tensor) -> Tensor:
        """[..., H] -> [..., V'] logits over the draft vocabulary."""
        return self.head(self.norm_out(h))

    # ------------------------------------------------------------------ files
    def save_pretrained(self, path: str | Path) -> None:
        write_drafter(path, self.config, self)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "EagleModel":
        path = Path(path)
        raw = read_drafter_config_versioned(path, FORMAT_VERSION, "EAGLE")
        try:
            config = EagleConfig(**raw)
        except TypeError as err:
            raise ValueError(f"{path / 'config.json'} is not an EAGLE drafter config: {err}") from None
        state = read_drafter_weights(path / "model.safetensors")
        if "draft_vocab" not in state:
            raise ValueError(f"{path / 'model.safetensors'} holds no draft_vocab: not an EAGLE drafter")
        model = cls(config, state["draft_vocab"], draft_counts=state.get("draft_counts"))
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{path} does not hold an EAGLE drafter of its config's shape: {str(err).splitlines()[0]}") from None
        return model.eval()


class _NativeLayer:
    """The draft layer, its norms and head run as one native call (``specdec_eagle_layer`` in ``csrc/step.c``), the
    linears from Q8_0 blocks: on a CPU a draft depth is then a few hundred microseconds of reading weights instead
    of ~60 small torch ops. Built from the model's weights when the drafter is bound and kept by later binds while
    those weights are unchanged (a model changed afterwards needs a new bind); :meth:`of` gives None where the
    native code is unavailable or the shapes do not fit it."""

    def __init__(self, model: EagleModel) -> None:
        from specdec.fastops import ops_lib
        from specdec.lean import _addr, _bits, eagle_layer_lib
        from specdec.native import attention_lib, quant_linear_lib, rows_linear_lib
        from specdec.quant import q8_0_blocks

        c = model.config
        self._fn, keep = eagle_layer_lib(), []

        def f32(t: Tensor) -> int:
            t = t.detach().float().contiguous()
            keep.append(t)
            return t.data_ptr()

        def linear(mod: nn.Linear) -> list[int]:
            blocks = q8_0_blocks(mod.weight)
            keep.append(blocks)
            return [0, 2, blocks.data_ptr(), 0, *mod.weight.shape]

        norms = [x for norm in (model.norm_e, model.norm_s, model.norm_mlp, model.norm_out) for x in (f32(norm.weight), _bits(norm.eps))]
        desc = [c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, model.head.weight.shape[0],
                _addr(quant_linear_lib()), _addr(rows_linear_lib()), _addr(attention_lib()), _addr(ops_lib().specdec_rmsnorm),
                *norms, _bits(c.head_dim ** -0.5)]
        for mod in (model.q_proj, model.k_proj, model.v_proj, model.o_proj, model.gate, model.up, model.down, model.head):
            desc += linear(mod)
        self._desc = (ctypes.c_int64 * len(desc))(*desc)
        self._keep = keep
        self.config = c
        self._cos = self._sin = torch.empty(0)
        self.weights = self._weights(model)

    @staticmethod
    def _weights(model: EagleModel) -> tuple:
        """What the description was built from: the model's parameters' storage and versions."""
        return tuple((p.data_ptr(), p._version) for p in model.parameters())

    @classmethod
    def of(cls, model: EagleModel, built: "_NativeLayer | None" = None) -> "_NativeLayer | None":
        """The native layer of ``model``: ``built`` itself when it was made from these very weights (a drafter
        bound once per generation builds its blocks once), a new one, or None where it cannot run."""
        from specdec.fastops import ops_lib
        from specdec.lean import eagle_layer_lib
        from specdec.native import attention_lib, quant_linear_lib, rows_linear_lib

        if os.environ.get("SPECDEC_NATIVE_DRAFT", "1") == "0":
            return None
        if built is not None and built.weights == cls._weights(model):
            return built
        if any(f() is None for f in (eagle_layer_lib, quant_linear_lib, rows_linear_lib, attention_lib, ops_lib)):
            return None
        c = model.config
        if c.hidden_size % 32 or c.intermediate_size % 32 or c.head_dim > 512 or c.head_dim % 2:
            return None
        return cls(model)

    def _tables(self, end: int) -> tuple[Tensor, Tensor]:
        """cos/sin [positions, head dim] of the layer's rotary embedding (as :func:`_rotate` computes them), for
        positions below ``end`` at least; grown by doubling."""
        if self._cos.shape[0] < end:
            n, d = max(end, 2 * self._cos.shape[0], 1024), self.config.head_dim
            inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
            ang = torch.arange(n, dtype=torch.float32)[:, None] * inv
            self._cos = torch.cat([ang.cos(), ang.cos()], -1).contiguous()
            self._sin = torch.cat([ang.sin(), ang.sin()], -1).contiguous()
        return self._cos, self._sin

    def __call__(self, entries: _Entries, emb: Tensor, s: Tensor, pos: Tensor, at: int, shared: int, vis: Tensor,
                 logit_rows: int) -> tuple[Tensor, Tensor]:
        c, n = self.config, s.shape[0]
        emb, s = emb.float().contiguous(), s.float().contiguous()
        pos = pos.to(torch.int64).contiguous()
        entries.reserve(at, at + n, s, c.num_kv_heads, c.head_dim)
        cos, sin = self._tables(int(pos.max()) + 1)
        vis = vis.to(torch.uint8).contiguous()
        h = torch.empty(n, c.hidden_size)
        logits = torch.empty(logit_rows, self._desc[5])
        rc = self._fn(self._desc, emb.data_ptr(), s.data_ptr(), n, pos.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                      entries.k.data_ptr(), entries.v.data_ptr(), entries.k.shape[2], at, shared, vis.data_ptr(),
                      h.data_ptr(), logit_rows, logits.data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"the native EAGLE layer failed (code {rc})")
        return h, logits


@dataclass
class EagleDrafterConfig:
    """Spec options: ``eagle:PATH,depth=6,beam=8,topk=8`` (``sample=true`` for sampling runs: drafts drawn from q)."""

    depth: int = 6  # draft depth (the engine trims what does not pay)
    beam: int = 8  # nodes kept per depth (by path probability)
    topk: int = 8  # children tried per node
    decay: float = 0.9
    min_score: float = 0.05  # with a measured cost: stop deepening once every new node's acceptance estimate is below it
    # (and once no node of the newest depth would survive the engine's trim: see clover.grow_tree)
    sample: bool = False
    dtype: str = "auto"  # the drafter's precision: "auto" (q8_0 for an fp32 target on a CPU with the native kernel,
    # else bfloat16 where measured faster), "q8_0" or a dtype name (see clover.place_heads)
    # > 0: draft only over the N most frequent tokens of the draft vocabulary (a cheaper head at every depth;
    # see specdec.drafters.base.most_frequent_rows); 0: the whole draft vocabulary
    vocab: int = 0

    def __post_init__(self) -> None:
        if self.depth < 1 or self.beam < 1 or self.topk < 1:
            raise ValueError("eagle options need depth >= 1, beam >= 1 and topk >= 1")
        if self.vocab < 0:
            raise ValueError(f"vocab must be 0 (the whole draft vocabulary) or a positive count, got {self.vocab}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.dtype not in DRAFT_PRECISIONS:
            raise ValueError(f"dtype must be one of {', '.join(DRAFT_PRECISIONS)}, got {self.dtype!r}")


@register_drafter("eagle")
class EagleDrafter(Drafter):
    """Drafts an EAGLE-2 dynamic tree with an EAGLE-3 layer over the target's low/mid/high features."""

    name = "eagle"
    needs_hidden_states = True
    skippable = True  # its next propose encodes every position committed since its last (see Drafter.skippable)

    def __init__(self, model: EagleModel, options: EagleDrafterConfig | None = None, source: str = "") -> None:
        self.model, self.options = model, options or EagleDrafterConfig()
        self._native: _NativeLayer | None = None
        if self.options.vocab:
            self.model.keep_rows(most_frequent_rows(model.draft_counts, self.options.vocab, self.name, source))
        self.vocab_size = model.config.vocab_size
        self.hidden_layers = tuple(model.config.feature_layers)
        self.rates = AcceptanceRates(prob_prior, self.options.decay)
        self._cost = None

    @classmethod
    def from_spec(cls, args: list[str], kwargs: dict[str, str]) -> "EagleDrafter":
        path = drafter_path(args, "eagle-smollm2-135m", cls.name, kwargs)
        return cls(EagleModel.from_pretrained(path), config_from_options(EagleDrafterConfig, kwargs, cls.name), str(path))

    def bind(self, target: Target) -> None:
        super().bind(target)
        c = self.model.config
        if target.hidden_size != c.hidden_size:
            raise ValueError(f"the EAGLE drafter was trained for hidden size {c.hidden_size}, the target has "
                             f"{target.hidden_size}; use a drafter trained for this model")
        n = getattr(target.model.config, "num_hidden_layers", None)
        if n is not None and any(not -(n + 1) <= x <= n for x in c.feature_layers):
            raise ValueError(f"the EAGLE drafter reads layers {c.feature_layers}; the target has hidden states 0 .. {n}")
        self.precision = place_heads(self.model, target, self.model.head.weight.shape[0], self.options.dtype)
        self.model.attach(target.input_embeddings)
        self._native = _NativeLayer.of(self.model, self._native) if self.precision == "q8_0" else None

    def reset(self, prompt_ids: Tensor) -> None:
        self.entries = _Entries()  # the committed positions' keys and values, then the drafted tree's
        self.p = 0  # committed entries
        self.rates = AcceptanceRates(prob_prior, self.options.decay)
        self._keys: dict = {}
        self._cost = drafting_cost(getattr(self, "target", None))

    @torch.inference_mode()
    def propose(self, state: DraftState) -> TokenTree:
        m, dev = self.model, self.target.device
        # 1. Entries of the positions committed since the last step (index t pairs f_t with x_{t+1}); what earlier
        #    steps committed before hidden_start is kept, the rest (last step's tree) is overwritten.
        n = state.hidden_states.shape[0]
        start = min(state.hidden_start, self.p)
        g = m.fuse(state.hidden_states.to(dev))  # [n, H]
        tok = state.token_ids[start + 1 : start + 1 + n].to(dev)
        p = self.p = start + n
        causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
        h, first = self._layer(g, tok, torch.arange(start, p, device=dev), start, start, causal, 1)
        h = h[-1]  # [H]: index P - 2, predicts the root's child
        # 2. Depth by depth: each frontier node attends to the committed entries and its own ancestors' entries.
        #    Tree node i > 0 has entry p + i - 1; its state, depth and ancestors (as entries) are kept in tensors.
        cap = self.options.beam * self.options.depth + 1
        states = h.new_empty(cap, h.shape[0])
        states[0] = h
        depth = torch.zeros(cap, dtype=torch.long, device=dev)
        anc = torch.zeros(cap, cap, dtype=torch.bool, device=dev)  # anc[i, j]: node j + 1 is node i's ancestor or itself
        made = [1]  # tree nodes so far (the root)

        def expand(rows: list[int], tokens: list[int], parents: list[int], new: list[int]) -> Tensor:
            base, f = made[0], len(parents)
            idx = torch.arange(base, base + f, device=dev)
            par = torch.tensor(parents, device=dev)
            depth[idx] = depth[par] + 1
            anc[idx] = anc[par]
            anc[idx, idx - 1] = True
            out, logits = self._layer(states[par], torch.tensor(tokens, device=dev), p - 1 + depth[idx], p + base - 1, p,
                                      anc[idx, : base - 1 + f], f)
            states[idx] = out
            made[0] = base + f
            return logits

        tree, self._keys = grow_tree(state.root, first, expand, m.draft_vocab, self.options.depth, self.options, self.rates,
                                     self.target.generator, self._cost, self.vocab_size, self.target.max_nodes)
        return tree

    def _layer(self, s: Tensor, tokens: Tensor, pos: Tensor, at: int, shared: int, vis: Tensor,
               logit_rows: int) -> tuple[Tensor, Tensor]:
        """The draft layer over n nodes (states ``s`` [n, H], their next tokens and positions [n]): their keys and
        values are written at entries ``at`` .. ``at + n - 1``; a node attends to the entries below ``shared`` and
        to those from ``shared`` on where ``vis`` [n, at + n - shared] is true. Returns the outputs h [n, H] and the
        log-probabilities over the draft vocabulary [logit_rows, V'] of the last ``logit_rows`` nodes."""
        m, e = self.model, self.entries
        if self._native is not None:
            h, logits = self._native(e, m.embed(tokens), s, pos, at, shared, vis, logit_rows)
            return h, torch.log_softmax(logits, -1)
        q, k, v = m.project(s[None], tokens[None], pos[None])
        e.write(at, k, v)
        total = at + s.shape[0]
        visible = torch.cat([torch.ones(s.shape[0], shared, dtype=torch.bool, device=s.device), vis], 1)
        h = m.finish(attend(q, e.k[:, :, :total], e.v[:, :, :total], visible[None]), s[None])[0]
        return h, torch.log_softmax(m.logits(h[h.shape[0] - logit_rows :]).float(), -1)

    def observe(self, result: StepResult) -> None:
        if self._keys:
            learn(self.rates, self._keys, result.tree, result.path)

