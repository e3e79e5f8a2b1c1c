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

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.drafters.base import (DraftState, Drafter, StepResult, Target, config_from_options, drafter_path, keep_draft_rows,
                                   most_frequent_rows, read_drafter_config_versioned, read_drafter_weights, register_drafter,
                                   set_draft_counts, write_drafter)
from specdec.drafters.clover import drafting_cost, grow_tree, heads_dtype, prob_prior
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

    def write(self, at: int, k: Tensor, v: Tensor) -> None:
        need = at + k.shape[2]
        if self.k is None or need > self.k.shape[2]:
            cap = max(need, 2 * (0 if self.k is None else self.k.shape[2]), 64)
            big_k, big_v = k.new_empty(*k.shape[:2], cap, k.shape[3]), v.new_empty(*v.shape[:2], cap, v.shape[3])
            if self.k is not None:
                big_k[:, :, :at], big_v[:, :, :at] = self.k[:, :, :at], self.v[:, :, :at]
            self.k, self.v = big_k, big_v
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
    dtype: str = "auto"  # the drafter's compute dtype: "auto" (bfloat16 where measured faster), or a dtype name
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
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"dtype must be auto, float32, bfloat16, float16 or float64, got {self.dtype!r}")


@register_drafter("eagle")
class EagleDrafter(Drafter):
    """Drafts an EAGLE-2 dynamic tree with an EAGLE-3 layer over the target's low/mid/high features."""

    name = "eagle"
    needs_hidden_states = True
    skippable = True  # its next propose encodes every position committed since its last (see Drafter.skippable)

    def __init__(self, model: EagleModel, options: EagleDrafterConfig | None = None, source: str = "") -> None:
        self.model, self.options = model, options or EagleDrafterConfig()
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
        self.model.to(device=target.device, dtype=heads_dtype(target, self.model.head.weight.shape[0], self.options.dtype))
        self.model.attach(target.input_embeddings)

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
        g = m.fuse(state.hidden_states.to(dev))[None]  # [1, n, H]
        tok = state.token_ids[start + 1 : start + 1 + n].to(dev)[None]
        q, k, v = m.project(g, tok, torch.arange(start, start + n, device=dev)[None])
        self.entries.write(start, k, v)
        p = self.p = start + n
        visible = torch.ones(n, p, dtype=torch.bool, device=dev).tril(p - n)[None]
        e = self.entries
        h = m.finish(attend(q, e.k[:, :, :p], e.v[:, :, :p], visible), g)[0, -1]  # [H]: index P - 2, predicts the root's child
        first = torch.log_softmax(m.logits(h).float(), -1)[None]
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
            s = states[par][None]  # [1, F, H]
            q, k, v = m.project(s, torch.tensor(tokens, device=dev)[None], (p - 1 + depth[idx])[None])
            e.write(p + base - 1, k, v)
            total = p + base - 1 + f
            vis = torch.cat([torch.ones(f, p, dtype=torch.bool, device=dev), anc[idx, : base - 1 + f]], 1)
            out = m.finish(attend(q, e.k[:, :, :total], e.v[:, :, :total], vis[None]), s)[0]  # [F, H]
            states[idx] = out
            made[0] = base + f
            return torch.log_softmax(m.logits(out).float(), -1)

        tree, self._keys = grow_tree(state.root, first, expand, m.draft_vocab, self.options.depth, self.options, self.rates,
                                     self.target.generator, self._cost, self.vocab_size, self.target.max_nodes)
        return tree

    def observe(self, result: StepResult) -> None:
        if self._keys:
            learn(self.rates, self._keys, result.tree, result.path)

