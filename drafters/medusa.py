"""Medusa heads: K extra decoding heads on the target's last hidden state.

Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with
Multiple Decoding Heads". Head k (0-based) reads the hidden state h_t that
predicted the root token x_{t+1} and guesses x_{t+k+2}: the token k+1 places
past the root. Each head is ``num_layers`` residual blocks ``x + SiLU(W x)``
(distinct weights per layer and head; W zero-initialised so an untrained head
starts as the identity) followed by a vocabulary projection:

* ``own_projection=False``: the target's frozen ``lm_head`` (small heads; the
  projection is not stored);
* ``own_projection=True``: a projection of the head's own, initialised from
  ``lm_head`` (the original Medusa);
* ``draft_vocab``: the projection covers only the most frequent tokens of the
  training data (as EAGLE-3 and FR-Spec do). On SmolLM2-135M the 49,152-token
  output layer is a fifth of a decode step on this CPU, so full-vocabulary
  heads would eat the gain; a draft vocabulary of 8,192 covers ~98.6% of
  labels at a sixth of the cost.

A trained drafter is a directory: ``config.json`` + ``model.safetensors``.
Trees come from the heads' top-k: a static tree given as path tuples
(``(0,)`` = head 0's best, ``(0, 1)`` = head 1's second best below it, ...),
or a dynamic tree that keeps the ``budget`` most probable nodes, scoring a
node by the product of its path's head probabilities.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from specdec.drafters.base import (DraftState, Drafter, StepResult, Target, config_from_options, drafter_path, read_drafter_config,
                                   read_drafter_config_versioned,
                                   read_drafter_weights, register_drafter, write_drafter)
from specdec.sizing import AcceptanceRates, learn
from specdec.tree import TokenTree, parents_from_paths

__all__ = ["MedusaConfig", "MedusaHeads", "MedusaDrafter", "DEFAULT_TREES", "tree_from_accuracies", "export_medusa_checkpoint", "import_medusa_checkpoint"]

FORMAT_VERSION = 1


def tree_from_accuracies(acc: list[list[float]], size: int) -> list[tuple[int, ...]]:
    """Build a static tree the way Medusa does: greedily add the path with the highest expected hit rate.

    Args:
        acc: ``acc[k][i]`` = measured probability that head k's i-th choice is right.
        size: number of draft nodes.

    A path's value is the product of its choices' accuracies; every prefix of
    a chosen path is chosen first (values shrink along a path), so the result
    is a tree.
    """
    heap = [(-acc[0][i], (i,)) for i in range(len(acc[0]))]
    heapq.heapify(heap)
    paths: list[tuple[int, ...]] = []
    while heap and len(paths) < size:
        neg, path = heapq.heappop(heap)
        paths.append(path)
        depth = len(path)
        if depth < len(acc):
            for i in range(len(acc[depth])):
                heapq.heappush(heap, (neg * acc[depth][i], path + (i,)))
    return paths


# Per-head top-k accuracies measured in PLATFORM.md's first calibration (head 0 top-1 .31, cumulative top-5 .52).
_CALIBRATION = [[0.31, 0.09, 0.05, 0.04, 0.03], [0.21, 0.07, 0.04, 0.03, 0.02], [0.18, 0.06, 0.03, 0.02, 0.02], [0.15, 0.05, 0.03, 0.02, 0.01]]
DEFAULT_TREES = {n: tree_from_accuracies(_CALIBRATION, n) for n in (4, 8, 16, 32, 64)}


@dataclass
class MedusaConfig:
    """What ``config.json`` holds."""

    hidden_size: int
    vocab_size: int  # the target's vocabulary
    num_heads: int = 4
    num_layers: int = 1
    own_projection: bool = False
    draft_vocab_size: int | None = None  # None: the full vocabulary
    target_model: str = ""
    tree: list[list[int]] | None = None  # static tree (path tuples) used when the checkpoint has no held-out accuracies
    medusa_version: int = 1
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_heads < 1 or self.num_layers < 0:
            raise ValueError("num_heads must be >= 1 and num_layers >= 0")
        if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in (0, vocab_size={self.vocab_size}]")


class ResBlock(nn.Module):
    """x + SiLU(W x + b), W zero-initialised."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """K heads; ``forward(hidden [..., H]) -> logits [K, ..., V_out]`` over the (draft) vocabulary."""

    def __init__(self, config: MedusaConfig, lm_head_weight: Tensor | None = None, draft_vocab: Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        # One ModuleList per head: [ResBlock(h) for _ in range(n)] builds distinct layers (never `[ResBlock(h)] * n`).
        self.blocks = nn.ModuleList(nn.Sequential(*[ResBlock(config.hidden_size) for _ in range(config.num_layers)]) for _ in range(config.num_heads))
        v_out = config.draft_vocab_size or config.vocab_size
        dv = draft_vocab if draft_vocab is not None else torch.arange(v_out)
        if dv.numel() != v_out:
            raise ValueError(f"draft vocabulary has {dv.numel()} ids, config says {v_out}")
        self.register_buffer("draft_vocab", dv.to(torch.long).clone())  # [V_out] token id of each output row
        self.proj = None
        if config.own_projection:
            self.proj = nn.ModuleList(nn.Linear(config.hidden_size, v_out, bias=False) for _ in range(config.num_heads))
            if lm_head_weight is not None:
                for p in self.proj:
                    p.weight.data.copy_(lm_head_weight[self.draft_vocab])
        self._shared: Tensor | None = None
        if lm_head_weight is not None:
            self.attach_lm_head(lm_head_weight)

    def attach_lm_head(self, lm_head_weight: Tensor) -> None:
        """Give heads without their own projection the target's (frozen) output rows."""
        if lm_head_weight.shape != (self.config.vocab_size, self.config.hidden_size):
            raise ValueError(
                f"heads expect an lm_head of shape ({self.config.vocab_size}, {self.config.hidden_size}), got {tuple(lm_head_weight.shape)}"
            )
        self._shared = lm_head_weight.detach()[self.draft_vocab.to(lm_head_weight.device)]

    def features(self, hidden: Tensor) -> Tensor:
        """[..., H] → [K, ..., H] head features before the projection."""
        return torch.stack([blocks(hidden) for blocks in self.blocks])

    def forward(self, hidden: Tensor) -> Tensor:
        feats = self.features(hidden)
        if self.proj is not None:
            return torch.stack([p(f) for p, f in zip(self.proj, feats)])
        if self._shared is None:
            raise RuntimeError("these heads share the target's lm_head: call attach_lm_head(model.lm_head.weight) first")
        return feats @ self._shared.to(feats.dtype).T

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path) -> None:
        write_drafter(path, self.config, self)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> "MedusaHeads":
        path = Path(path)
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path} is not a Medusa drafter directory (needs config.json and model.safetensors)")
        raw = read_drafter_config_versioned(path, FORMAT_VERSION, "Medusa")
        config = MedusaConfig(**{k: v for k, v in raw.items() if k in MedusaConfig.__dataclass_fields__})
        state = read_drafter_weights(path / "model.safetensors")
        if "draft_vocab" not in state:
            raise ValueError(f"{path / 'model.safetensors'} holds no Medusa heads (no draft_vocab tensor)")
        heads = cls(config, draft_vocab=state["draft_vocab"])
        try:
            heads.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{path / 'model.safetensors'} does not match its config.json: {str(err).splitlines()[0]}") from None
        if dtype is not None:
            heads.to(dtype)
        return heads.eval()


@dataclass
class MedusaDrafterConfig:
    """Spec options: ``medusa:PATH,tree=32`` (static candidate tree of 32 nodes), ``medusa:PATH,budget=24`` (dynamic)."""

    tree: int = 0  # size of the static candidate tree; 0: 64 nodes (trimmed by the engine to what pays)
    budget: int = 0  # > 0: dynamic candidate tree of this many draft nodes, scored by the heads' probabilities
    topk: int = 8  # candidates per head in the dynamic tree
    decay: float = 0.9  # weight of the past in the running acceptance estimates

    def __post_init__(self) -> None:
        if self.tree < 0 or self.budget < 0 or self.topk < 1:
            raise ValueError("medusa options need tree >= 0, budget >= 0 and topk >= 1")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")


@register_drafter("medusa")
class MedusaDrafter(Drafter):
    """Drafts a tree from the Medusa heads' top-k (a static candidate tree, or a dynamic budget).

    Every node carries a score, the estimated probability that it is accepted,
    so the engine trims the candidates to the tree that pays on this machine.
    Static trees: the product along the path of running estimates of
    P(choice i of head d is right | its parent was), starting from the
    heads' held-out accuracies and learnt from the target's verdicts. Dynamic
    trees: the product of the heads' own probabilities.
    """

    name = "medusa"
    needs_hidden_states = True
    skippable = True  # it reads only the last committed position's state (see Drafter.skippable)

    def __init__(self, heads: MedusaHeads, *, paths: list[tuple[int, ...]] | None = None, budget: int = 0, topk: int = 8,
                 decay: float = 0.9) -> None:
        self.heads = heads.eval()
        self.vocab_size = heads.config.vocab_size
        self.budget, self.topk, self.decay = budget, topk, decay
        self.accuracy = heads.config.extra.get("heldout_accuracy") or _CALIBRATION
        if paths is None:  # a wide candidate tree; the engine keeps what pays
            has_acc = "heldout_accuracy" in heads.config.extra
            paths = tree_from_accuracies(self.accuracy, 64) if has_acc or not heads.config.tree else [tuple(p) for p in heads.config.tree]
        paths = [p for p in paths if len(p) <= heads.config.num_heads]
        self.parents, choices = parents_from_paths(paths)
        self.depths = TokenTree(torch.zeros_like(self.parents), self.parents).depths
        self.choices = choices.clamp(min=0)
        self.k_needed = int(self.choices.max()) + 1
        self.node_keys = list(zip(self.depths.tolist(), self.choices.tolist()))  # (depth, choice) per node
        self.reset(torch.empty(0, dtype=torch.long))

    @classmethod
    def from_spec(cls, args: list[str], kwargs: dict[str, str]) -> "MedusaDrafter":
        path = drafter_path(args, "medusa-smollm2-135m", cls.name, kwargs)
        opts = config_from_options(MedusaDrafterConfig, kwargs, cls.name)
        heads = MedusaHeads.from_pretrained(path)
        accuracy = heads.config.extra.get("heldout_accuracy") or _CALIBRATION
        paths = tree_from_accuracies(accuracy, opts.tree) if opts.tree else None
        return cls(heads, paths=paths, budget=opts.budget, topk=opts.topk, decay=opts.decay)

    def _prior(self, key: tuple[int, int]) -> float:
        depth, choice = key
        acc = self.accuracy
        return acc[depth - 1][choice] if depth - 1 < len(acc) and choice < len(acc[depth - 1]) else 0.01

    def reset(self, prompt_ids: Tensor) -> None:
        self.rates = AcceptanceRates(self._prior, self.decay)
        self._keys: dict[tuple[int, ...], tuple[int, int]] = {}

    def bind(self, target: Target) -> None:
        super().bind(target)
        hidden = target.hidden_size
        if hidden != self.heads.config.hidden_size:
            raise ValueError(
                f"Medusa heads were trained for hidden size {self.heads.config.hidden_size}, the target has {hidden}; "
                "use heads trained for this model"
            )
        weight = target.output_weight
        self.heads.to(device=weight.device, dtype=weight.dtype)
        # fp32 on a CPU: the heads' own linears run from Q8_0 blocks (see specdec.drafters.clover.place_heads)
        from specdec.drafters.clover import draft_in_q8_0

        self.precision = "q8_0" if draft_in_q8_0(self.heads, target) else str(weight.dtype).removeprefix("torch.")
        if self.heads.proj is None:
            self.heads.attach_lm_head(weight)

    @torch.inference_mode()
    def propose(self, state: DraftState) -> TokenTree:
        return self._tree(state.root, self.heads(state.hidden_states[-1]))  # the state that predicted the root

    @staticmethod
    @torch.inference_mode()
    def propose_batch(drafters: list["MedusaDrafter"], states: list[DraftState]) -> list[TokenTree]:
        """Every row of a batch at once: one call of the shared heads over the rows' last hidden states."""
        heads = drafters[0].heads
        if any(d.heads is not heads for d in drafters):
            return [d.propose(s) for d, s in zip(drafters, states)]
        logits = heads(torch.stack([s.hidden_states[-1] for s in states]))  # [K, B, V_out]
        return [d._tree(s.root, logits[:, b]) for b, (d, s) in enumerate(zip(drafters, states))]

    def _tree(self, root: int, logits: Tensor) -> TokenTree:
        """The candidate tree from the heads' logits [K, V_out] for one sequence."""
        if self.budget > 0:
            self._keys = {}
            return self._dynamic(root, logits)
        top = torch.topk(logits, self.k_needed, dim=-1).indices  # [K, k]
        vocab = self.heads.draft_vocab
        tokens = vocab[top[(self.depths - 1).clamp(min=0), self.choices]].cpu()
        tokens[0] = root
        tree = TokenTree(tokens, self.parents)
        self._keys = dict(zip(tree.token_paths[1:], self.node_keys[1:]))
        tree.scores = torch.tensor(self.rates.path_scores(self.parents.tolist(), self.node_keys))
        return tree

    def observe(self, result: StepResult) -> None:
        if self._keys:
            learn(self.rates, self._keys, result.tree, result.path)

    def _dynamic(self, root: int, logits: Tensor) -> TokenTree:
        """Keep the ``budget`` nodes with the highest path probability (heads treated as independent)."""
        logp, idx = torch.log_softmax(logits.float(), -1).topk(self.topk, dim=-1)  # [K, topk]
        logp, idx = logp.cpu().tolist(), self.heads.draft_vocab[idx].cpu().tolist()
        heap = [(-logp[0][i], 0, i, 0) for i in range(self.topk)]  # (-score, depth, choice, parent node)
        tokens, parents, scores = [root], [-1], [0.0]
        while heap and len(tokens) <= self.budget:
            neg, depth, choice, parent = heapq.heappop(heap)
            tokens.append(idx[depth][choice])
            parents.append(parent)
            scores.append(-neg)
            node = len(tokens) - 1
            if depth + 1 < len(logp):
                for i in range(self.topk):
                    heapq.heappush(heap, (neg - logp[depth + 1][i], depth + 1, i, node))
        return TokenTree(torch.tensor(tokens), torch.tensor(parents), scores=torch.tensor(scores).exp())


# ---------------------------------------------------------------------- original Medusa checkpoints
def export_medusa_checkpoint(heads: MedusaHeads, path: str | Path, lm_head_weight: Tensor | None = None, base_model: str = "") -> None:
    """Write the original Medusa layout: ``config.json`` (``medusa_num_heads``, ``medusa_num_layers``,
    ``base_model_name_or_path``) and ``medusa_lm_head.safetensors`` with keys ``{head}.{layer}.linear.*``
    and ``{head}.{num_layers}.weight`` (the head's own full-vocabulary projection)."""
    cfg = heads.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, blocks in enumerate(heads.blocks):
        for layer, block in enumerate(blocks):
            state[f"{k}.{layer}.linear.weight"] = block.linear.weight.detach().cpu().contiguous()
            state[f"{k}.{layer}.linear.bias"] = block.linear.bias.detach().cpu().contiguous()
        full = _full_projection(heads, k, lm_head_weight)
        state[f"{k}.{cfg.num_layers}.weight"] = full.cpu().contiguous()
    save_file(state, str(path / "medusa_lm_head.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "medusa_num_heads": cfg.num_heads, "medusa_num_layers": cfg.num_layers,
        "base_model_name_or_path": base_model or cfg.target_model, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
    }, indent=2))


def _full_projection(heads: MedusaHeads, k: int, lm_head_weight: Tensor | None) -> Tensor:
    cfg = heads.config
    if heads.proj is None and lm_head_weight is None:
        raise ValueError("heads that share the target's lm_head need lm_head_weight to export a full projection")
    base = lm_head_weight.detach().clone() if lm_head_weight is not None else torch.zeros(cfg.vocab_size, cfg.hidden_size)
    if heads.proj is not None:
        base[heads.draft_vocab] = heads.proj[k].weight.detach().to(base.dtype)
    return base


def import_medusa_checkpoint(path: str | Path) -> MedusaHeads:
    """Read the original Medusa layout into heads with their own full-vocabulary projection."""
    path = Path(path)
    raw = read_drafter_config(path / "config.json")
    for key in ("medusa_num_heads", "medusa_num_layers"):
        if key not in raw:
            raise ValueError(f"{path}/config.json has no {key!r}: not a Medusa checkpoint")
    state = read_drafter_weights(path / "medusa_lm_head.safetensors")
    k, n = raw["medusa_num_heads"], raw["medusa_num_layers"]
    vocab, hidden = state[f"0.{n}.weight"].shape
    heads = MedusaHeads(MedusaConfig(hidden_size=hidden, vocab_size=vocab, num_heads=k, num_layers=n, own_projection=True,
                                     target_model=raw.get("base_model_name_or_path", "")))
    ours = {}
    for h in range(k):
        for layer in range(n):
            ours[f"blocks.{h}.{layer}.linear.weight"] = state[f"{h}.{layer}.linear.weight"]
            ours[f"blocks.{h}.{layer}.linear.bias"] = state[f"{h}.{layer}.linear.bias"]
        ours[f"proj.{h}.weight"] = state[f"{h}.{n}.weight"]
    ours["draft_vocab"] = heads.draft_vocab
    heads.load_state_dict(ours)
    return heads
