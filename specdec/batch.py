"""Batch > 1: tree speculation over several sequences at once, with ragged acceptance.

Layout (per-row lengths, not left padding): every row of the KV cache holds
its own committed prefix at positions 0 .. P_b - 1; a step writes row b's
tree right after it, at P_b .. P_b + N - 1 (trees are padded to a common N
with padding nodes that see only themselves and are never accepted), and one
mask per row says what each node sees. Positions are each row's own
(``P_b + depth``), so a row computes exactly what it would alone: no pad
tokens shift its positions (left padding would, or would need per-row position
offsets everywhere), and the cost of a row's attention follows its own length
plus the batch's longest. After verification each row commits its own
accepted path (a gather inside the row) and its length moves by its own
amount; rollback is a length. A finished sequence leaves the batch (its row is
dropped from the cache, the one time its KV is copied).

Prefill runs prompt by prompt (a long prompt is compute-bound on its own;
batching it saves little on a CPU) into single-row caches that are then
stacked once.

Drafting stays per sequence (each row keeps its own drafter, spawned from the
one given); a drafter class that can work on all rows at once implements
``propose_batch(drafters, states)`` (Medusa's heads do: one call for every row).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from specdec.cache import _MIN_CAPACITY, TreeKVCache, _TreeLayer
from specdec.drafters.base import DraftState, Drafter
from specdec.kernels import FastLinears
from specdec.runner import ForwardOutput, TreeRunner, _upcast
from specdec.sizing import trim_batch
from specdec.tree import TokenTree
from specdec.tree_attention.hf import TreeAttention
from specdec.tree_attention.reference import ragged_tree_mask

__all__ = ["BatchKVCache", "BatchRunner", "decode_batch", "pad_trees"]


class _BatchLayer(_TreeLayer):
    """One layer of a batch: preallocated [B, H, capacity, D], a committed length per row."""

    def setup(self, keys: list[Tensor], values: list[Tensor]) -> None:
        """Stack single-row layers ([1, H, L_b, D] each)."""
        self.lengths = [int(k.shape[-2]) for k in keys]
        self.length = max(self.lengths)
        b, h, dk, dv = len(keys), keys[0].shape[1], keys[0].shape[-1], values[0].shape[-1]
        cap = max(_MIN_CAPACITY, 2 * self.length)
        self._k = keys[0].new_zeros(b, h, cap, dk)
        self._v = values[0].new_zeros(b, h, cap, dv)
        for i, (k, v) in enumerate(zip(keys, values)):
            self._k[i, :, : k.shape[-2]] = k[0]
            self._v[i, :, : v.shape[-2]] = v[0]
        self.device, self.is_initialized = keys[0].device, True
        self._refresh_views()

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Write row b's n new entries right after its own prefix; return keys/values up to the longest row's end."""
        n = key_states.shape[-2]
        self.length = max(self.lengths)  # what _reserve keeps when it grows the buffers
        self._reserve(key_states, value_states, self.length + n)
        for b, start in enumerate(self.lengths):
            self._k[b, :, start : start + n] = key_states[b]
            self._v[b, :, start : start + n] = value_states[b]
        self.keys, self.values = self._k[:, :, : self.length + n], self._v[:, :, : self.length + n]
        return self.keys, self.values

    def commit_rows(self, paths: list[Tensor]) -> None:
        """Row b keeps its tree nodes ``paths[b]`` (relative to its prefix, in path order) and drops the rest."""
        for b, (start, path) in enumerate(zip(self.lengths, paths)):
            if not torch.equal(path, torch.arange(path.numel())):  # a chain from the root needs no copy
                idx = path.to(self._k.device) + start
                self._k[b, :, start : start + path.numel()] = self._k[b].index_select(1, idx)
                self._v[b, :, start : start + path.numel()] = self._v[b].index_select(1, idx)
        self.lengths = [start + path.numel() for start, path in zip(self.lengths, paths)]
        self.length = max(self.lengths)
        self._refresh_views()

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only ``rows`` (a finished row leaves the batch): the live entries move, the capacity stays."""
        idx = torch.tensor(rows, device=self._k.device)
        live = max((self.lengths[r] for r in rows), default=0)
        k, v = self._k.new_zeros(len(rows), *self._k.shape[1:]), self._v.new_zeros(len(rows), *self._v.shape[1:])  # finite where masked
        k[:, :, :live] = self._k[:, :, :live].index_select(0, idx)
        v[:, :, :live] = self._v[:, :, :live].index_select(0, idx)
        self._k, self._v = k, v
        self.lengths = [self.lengths[r] for r in rows]
        self.length = max(self.lengths) if rows else 0
        self._refresh_views()

    def get_seq_length(self) -> int:
        return max(self.lengths) if self.is_initialized and self.lengths else 0


class BatchKVCache(Cache):
    """A transformers ``Cache`` for a batch with a committed length per row (see the module docstring)."""

    def __init__(self, layers: list[_BatchLayer]) -> None:
        super().__init__(layers=layers)

    @classmethod
    def stack(cls, caches: list[TreeKVCache]) -> "BatchKVCache":
        layers = []
        for i in range(len(caches[0].layers)):
            layer = _BatchLayer()
            layer.setup([c.layers[i].keys for c in caches], [c.layers[i].values for c in caches])
            layers.append(layer)
        return cls(layers)

    @property
    def lengths(self) -> list[int]:
        return list(self.layers[0].lengths)

    def commit_rows(self, paths: list[Tensor]) -> None:
        for layer in self.layers:
            layer.commit_rows([p.cpu() for p in paths])

    def keep_rows(self, rows: list[int]) -> None:
        for layer in self.layers:
            layer.keep_rows(rows)


def pad_trees(trees: list[TokenTree]) -> tuple[Tensor, Tensor, Tensor]:
    """A common node count for a batch of trees.

    Returns:
        tokens [B, N] (padding: the root's token), depths [B, N] (padding: 0),
        ancestor masks [B, N, N] (a padding node sees only itself).
    """
    n = max(len(t) for t in trees)
    b = len(trees)
    tokens = torch.zeros(b, n, dtype=torch.long)
    depths = torch.zeros(b, n, dtype=torch.long)
    anc = torch.eye(n, dtype=torch.bool)[None].repeat(b, 1, 1)
    for i, t in enumerate(trees):
        k = len(t)
        tokens[i, :k], tokens[i, k:] = t.tokens, t.tokens[0]
        depths[i, :k] = t.depths
        anc[i, :k, :k] = t.ancestor_mask
    return tokens, depths, anc


class BatchRunner:
    """Runs a model over one tree per sequence in one forward, each row with its own committed length."""

    def __init__(self, model, *, attn: str = "auto", fast: FastLinears | None = None, route: bool | None = None) -> None:
        self._single = TreeRunner(model, attn=attn, fast=fast, route=route)  # routing, kernels and prefill
        self.model, self.device, self.backend, self.route = model, self._single.device, self._single.backend, self._single.route
        self.cache: BatchKVCache | None = None

    def close(self) -> None:
        self._single.close()

    def __enter__(self) -> "BatchRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def lengths(self) -> list[int]:
        return self.cache.lengths

    def prefill(self, prompts: list[Tensor], *, hidden: bool = False) -> list[ForwardOutput]:
        """Each prompt on its own (a causal forward into a single-row cache), then the caches stacked."""
        outs, caches = [], []
        for ids in prompts:
            self._single.cache = TreeKVCache()
            outs.append(self._single.prefill(ids, hidden=hidden))
            caches.append(self._single.cache)
        self.cache = BatchKVCache.stack(caches)
        self._single.cache = TreeKVCache()
        return outs

    def forward(self, trees: list[TokenTree], *, hidden: bool = False) -> ForwardOutput:
        """One forward over every row's tree: logits [B, N, V] (rows past a tree's own size are padding)."""
        tokens, depths, anc = pad_trees(trees)
        lengths = torch.tensor(self.cache.lengths)
        total = int(lengths.max()) + tokens.shape[1]
        kwargs = {}
        if self.route:
            dtype = getattr(self.model, "dtype", torch.float32)
            kwargs["specdec_tree"] = TreeAttention.build_batch(self.backend, lengths.to(self.device), anc.to(self.device), total, dtype)
        else:
            visible = ragged_tree_mask(lengths, anc, total).to(self.device)
            mask = torch.zeros(visible.shape, dtype=getattr(self.model, "dtype", torch.float32), device=self.device)
            kwargs["attention_mask"] = mask.masked_fill_(~visible, torch.finfo(mask.dtype).min)[:, None]
        with self._single._kernels():
            out = self.model(
                input_ids=tokens.to(self.device), position_ids=(lengths[:, None] + depths).to(self.device),
                cache=self.cache, use_cache=True, output_hidden_states=hidden, **kwargs,
            )
        return ForwardOutput(_upcast(out.logits), out.hidden_states[-1] if hidden else None)

    def commit(self, paths: list[Tensor]) -> None:
        self.cache.commit_rows(paths)

    def keep(self, rows: list[int]) -> None:
        self.cache.keep_rows(rows)


@dataclass
class _Row:
    """One sequence of the batch."""

    index: int  # its place in the caller's list
    ids: Tensor  # committed tokens
    prompt_len: int
    drafter: Drafter
    stop: object
    new: list[int]
    pending: list[int]
    hidden: Tensor | None
    hidden_start: int
    stats: object


@torch.inference_mode()
def decode_batch(
    model, prompts: list[Tensor], drafters: list[Drafter], verifier, *, max_new_tokens: int, eos_ids: set[int],
    stops: list | None = None, generator: torch.Generator | None = None, stats: list | None = None, attn: str = "torch",
    fast: FastLinears | None = None, route: bool | None = None, cost: Callable[[int], float] | None = None, max_nodes: int = 64,
) -> Iterator[tuple[int, object]]:
    """The batched core loop: yields ``(row index, StepEvent)`` as each sequence emits tokens, until all have finished.

    Each row drafts, is verified and commits on its own; one target forward per step serves all rows that are
    still running. Greedy output of every row equals that prompt's output alone (the model computes the same
    function of the same tokens at the same positions; the kernels may sum in another order, as in any tree
    forward).
    """
    from specdec.engine import StepEvent, _emit, _step_result

    stops = stops or [None] * len(prompts)
    rows = []
    with BatchRunner(model, attn=attn, fast=fast, route=route) as runner:
        hidden_needed = any(d.needs_hidden_states for d in drafters)
        t0 = time.perf_counter()
        outs = runner.prefill(prompts, hidden=hidden_needed)
        for i, (ids, d, out) in enumerate(zip(prompts, drafters, outs)):
            d.reset(ids)
            first = verifier.accept(TokenTree.root_only(int(ids[-1])), out.logits[-1:], generator, ids[:-1]).bonus
            rows.append(_Row(i, ids.clone(), ids.numel(), d, stops[i], [], [first], out.hidden_states, 0, stats[i] if stats else None))
        prefill_s = time.perf_counter() - t0
        for r in rows:
            if r.stats is not None:
                r.stats.prefill_time_s += prefill_s / len(rows)
        while True:
            # 1. Emit; finished rows leave the batch.
            live = []
            for pos, r in enumerate(rows):
                emitted, reason = _emit(r.pending, r.new, eos_ids, r.stop, max_new_tokens)
                r.ids = torch.cat([r.ids, torch.tensor(emitted, dtype=torch.long)])
                if r.stats is not None:
                    r.stats.new_tokens = len(r.new)
                yield r.index, StepEvent(emitted, reason)
                if not reason:
                    live.append(pos)
            if not live:
                return
            if len(live) < len(rows):
                runner.keep(live)
                rows = [rows[p] for p in live]
            # 2. Draft per row (or all rows at once), size the trees together (one padded forward).
            states = [DraftState(r.ids, r.prompt_len, r.hidden, r.hidden_start) for r in rows]
            trees = _propose(rows, states)
            if cost is not None:
                trees = trim_batch(trees, cost, max_nodes)
            # 3. One forward for every row; accept and commit per row.
            lengths = runner.lengths
            out = runner.forward(trees, hidden=hidden_needed)
            accepted = [verifier.accept(t, out.logits[b, : len(t)], generator, r.ids[:-1]) for b, (t, r) in enumerate(zip(trees, rows))]
            runner.commit([a.path for a in accepted])
            for b, (r, t, a) in enumerate(zip(rows, trees, accepted)):
                r.pending = a.new_tokens(t)
                row_out = ForwardOutput(out.logits[b, : len(t)], out.hidden_states[b, : len(t)] if hidden_needed else None)
                r.hidden = row_out.hidden_states[a.path.to(row_out.hidden_states.device)] if hidden_needed else None
                r.hidden_start = lengths[b]
                r.drafter.observe(_step_result(t, a, r.pending, row_out))
                if r.stats is not None:
                    r.stats.target_forwards += 1
                    r.stats.drafted_tokens += t.num_drafts
                    r.stats.tokens_per_step.append(len(r.pending))


def _propose(rows: list[_Row], states: list[DraftState]) -> list[TokenTree]:
    """Every row's tree: one call for all rows where the drafter class batches its own work."""
    kind = type(rows[0].drafter)
    batch = getattr(kind, "propose_batch", None)
    if batch is not None and all(type(r.drafter) is kind for r in rows):
        trees = batch([r.drafter for r in rows], states)
    else:
        trees = [r.drafter.propose(s) for r, s in zip(rows, states)]
    for t, s, r in zip(trees, states, rows):
        if int(t.tokens[0]) != s.root:
            raise RuntimeError(f"drafter {r.drafter.name!r} proposed a tree whose root is not the last committed token")
    return trees
