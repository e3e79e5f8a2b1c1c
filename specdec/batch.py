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
batching it saves little on a CPU) into single-row caches that then join the
batch. While rows decode, a joining prompt is prefilled in chunks, each packed
into the rows' decode forward (:meth:`BatchRunner.forward_fused`).

Drafting stays per sequence (each row keeps its own session of a drafter,
``Drafter.open``); a drafter class that can work on all rows at once implements
``propose_batch(drafters, states)`` (Medusa's heads do: one call for every row).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from specdec.cache import _MIN_CAPACITY, TreeKVCache, _TreeLayer, is_chain
from specdec.drafters.base import DraftState, Drafter
from specdec.kernels import ROW_BUCKETS, FastLinears
from specdec.runner import ForwardOutput, TreeRunner, _upcast, hidden_layers, tapped_forward
from specdec.sizing import cap, trim_batch
from specdec.tree import TokenTree
from specdec.tree_attention.hf import TreeAttention
from specdec.tree_attention.reference import ragged_tree_mask

__all__ = ["BatchEngine", "BatchKVCache", "BatchRunner", "Request", "decode_batch", "pad_trees"]


class _BatchLayer(_TreeLayer):
    """One layer of a batch: buffers [R, H, capacity, D] with room for R rows, of which the first ``len(lengths)``
    are live (``_k`` is a view of them), and a committed length per live row.

    Rows leave (:meth:`keep_rows`) and join (:meth:`add_rows`) between steps without reallocating: a leaving
    row's slot is refilled by moving only the live entries of the rows that change place, and a joining row is
    written into a free slot. Entries past a row's own length are stale but finite (zeroed as the longest row grows), which
    the mask hides.
    """

    def setup(self, keys: list[Tensor], values: list[Tensor], rows: int = 0) -> None:
        """Stack single-row layers ([1, H, L_b, D] each), with room for ``rows`` rows (at least as many as given)."""
        self.lengths = []
        self.length = 0
        self._finite = 0  # entries 0 .. _finite - 1 of every live row hold finite values (see _clear_to)
        self._kb = keys[0].new_empty(max(rows, len(keys)), keys[0].shape[1], _MIN_CAPACITY, keys[0].shape[-1])
        self._vb = values[0].new_empty(max(rows, len(keys)), values[0].shape[1], _MIN_CAPACITY, values[0].shape[-1])
        self._k, self._v = self._kb[:0], self._vb[:0]
        self.device, self.is_initialized = keys[0].device, True
        self.add_rows(keys, values)

    def _reserve(self, key_states: Tensor, value_states: Tensor, needed: int, rows: int | None = None) -> None:
        """Room for ``needed`` positions and ``rows`` rows. Growing allocates without touching the new memory and
        copies only the live rows' finite entries: the buffers are [R, H, capacity, D] for every row the batch may
        hold, and zero-filling all of them up front cost seconds on a long prompt's join (2,000 tokens, 16 rows,
        a 30-layer model: 3 GB first touched at once, measured 1.5-8 s on this project's AMD host)."""
        rows = len(self.lengths) if rows is None else rows
        cap, room = self._kb.shape[-2], self._kb.shape[0]
        if needed > cap or rows > room:
            cap, room = (max(2 * cap, needed + _MIN_CAPACITY) if needed > cap else cap), max(room, rows)
            kb = self._kb.new_empty(room, self._kb.shape[1], cap, self._kb.shape[-1])
            vb = self._vb.new_empty(room, self._vb.shape[1], cap, self._vb.shape[-1])
            live = len(self.lengths)
            kb[:live, :, : self._finite] = self._kb[:live, :, : self._finite]
            vb[:live, :, : self._finite] = self._vb[:live, :, : self._finite]
            self._kb, self._vb = kb, vb
        self._k, self._v = self._kb[: len(self.lengths)], self._vb[: len(self.lengths)]

    def _clear_to(self, end: int) -> None:
        """Make entries up to ``end`` of every live row finite (zero the ones never written). A row reads every
        entry up to the longest row's end, masked past its own length, and an uninitialised NaN would survive an
        additive -inf mask; zeroing as the batch's longest row grows touches memory only as it is used."""
        if end > self._finite:
            live = len(self.lengths)
            end = min(self._kb.shape[-2], max(end, self._finite + _CLEAR_AHEAD))  # a block at a time, not a call per step
            self._kb[:live, :, self._finite : end].zero_()
            self._vb[:live, :, self._finite : end].zero_()
            self._finite = end

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Write row b's n new entries right after its own prefix; return keys/values up to the longest row's end."""
        n = key_states.shape[-2]
        self.length = max(self.lengths)
        self._reserve(key_states, value_states, self.length + n)
        self._clear_to(self.length + n)
        if len(self.lengths) > 2:  # one scatter per tensor instead of a copy per row (16 rows: 5 us against 43 us)
            idx = _write_index(self.lengths, key_states.shape, key_states.device)
            self._k.scatter_(2, idx, key_states)
            self._v.scatter_(2, idx if value_states.shape == key_states.shape else
                             _write_index(self.lengths, value_states.shape, value_states.device), value_states)
        else:
            for b, start in enumerate(self.lengths):
                self._k[b, :, start : start + n] = key_states[b]
                self._v[b, :, start : start + n] = value_states[b]
        self.keys, self.values = self._k[:, :, : self.length + n], self._v[:, :, : self.length + n]
        return self.keys, self.values

    def commit_rows(self, paths: list[Tensor], chains: list[bool]) -> None:
        """Row b keeps its tree nodes ``paths[b]`` (relative to its prefix, in path order) and drops the rest
        (``chains[b]``: the path is a chain from the root, which needs no copy; decided once for all layers)."""
        for b, (start, path) in enumerate(zip(self.lengths, paths)):
            if not chains[b]:
                idx = path.to(self._k.device) + start
                self._k[b, :, start : start + path.numel()] = self._k[b].index_select(1, idx)
                self._v[b, :, start : start + path.numel()] = self._v[b].index_select(1, idx)
        self.lengths = [start + path.numel() for start, path in zip(self.lengths, paths)]
        self.length = max(self.lengths)
        self._refresh_views()

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only ``rows``, in that order (a finished row leaves the batch): only the rows that change place move,
        and only their live entries."""
        moved = [(p, r) for p, r in enumerate(rows) if p != r]
        if moved:
            dst = torch.tensor([p for p, _ in moved], device=self._kb.device)
            src = torch.tensor([r for _, r in moved], device=self._kb.device)
            live = max(self.lengths[r] for _, r in moved)
            self._kb[:, :, :live].index_copy_(0, dst, self._kb[:, :, :live].index_select(0, src))
            self._vb[:, :, :live].index_copy_(0, dst, self._vb[:, :, :live].index_select(0, src))
        self.lengths = [self.lengths[r] for r in rows]
        self.length = max(self.lengths, default=0)
        self._k, self._v = self._kb[: len(rows)], self._vb[: len(rows)]
        self._refresh_views()

    def add_rows(self, keys: list[Tensor], values: list[Tensor]) -> None:
        """New rows join after the live ones, from single-row layers ([1, H, L, D] each)."""
        new = [int(k.shape[-2]) for k in keys]
        first = len(self.lengths)
        self._reserve(keys[0], values[0], max([self.length, *new]), first + len(keys))
        self._clear_to(max([self.length, *new]))  # the rows already live
        for i, (k, v) in enumerate(zip(keys, values)):
            n = k.shape[-2]
            self._kb[first + i, :, :n] = k[0]
            self._vb[first + i, :, :n] = v[0]
            self._kb[first + i, :, n : self._finite].zero_()  # a slot's old or never-written entries
            self._vb[first + i, :, n : self._finite].zero_()
        self.lengths = self.lengths + new
        self.length = max(self.lengths)
        self._k, self._v = self._kb[: len(self.lengths)], self._vb[: len(self.lengths)]
        self._refresh_views()

    def get_seq_length(self) -> int:
        return max(self.lengths) if self.is_initialized and self.lengths else 0


class BatchKVCache(Cache):
    """A transformers ``Cache`` for a batch with a committed length per row (see the module docstring)."""

    def __init__(self, layers: list[_BatchLayer]) -> None:
        super().__init__(layers=layers)

    @classmethod
    def stack(cls, caches: list[TreeKVCache], rows: int = 0) -> "BatchKVCache":
        """The batch of single-row caches, with room for ``rows`` rows in all (more join through :meth:`add_rows`)."""
        layers = []
        for i in range(len(caches[0].layers)):
            layer = _BatchLayer()
            layer.setup([c.layers[i].keys for c in caches], [c.layers[i].values for c in caches], rows)
            layers.append(layer)
        return cls(layers)

    @property
    def lengths(self) -> list[int]:
        return list(self.layers[0].lengths)

    def commit_rows(self, paths: list[Tensor]) -> None:
        paths = [p.cpu() for p in paths]
        chains = [is_chain(p) for p in paths]  # once for every layer
        for layer in self.layers:
            layer.commit_rows(paths, chains)

    def keep_rows(self, rows: list[int]) -> None:
        for layer in self.layers:
            layer.keep_rows(rows)

    def add_rows(self, caches: list[TreeKVCache]) -> None:
        for i, layer in enumerate(self.layers):
            layer.add_rows([c.layers[i].keys for c in caches], [c.layers[i].values for c in caches])


class _FusedCache(Cache):
    """The cache of one fused forward (:meth:`BatchRunner.forward_fused`): the model sees one packed sequence of
    B·N tree nodes then C chunk tokens; each layer's new keys/values split the same way, the rows' into the batch
    cache (as [B, H, N, D]) and the chunk's into its own cache. The attention layer then finds the chunk's keys in
    :attr:`chunk_kv` (the layer's ``update`` runs just before its attention)."""

    def __init__(self, batch: BatchKVCache, chunk: TreeKVCache, rows: int, nodes: int, tree: "TreeAttention | None",
                 chunk_tree: "TreeAttention | None") -> None:
        super().__init__(layers=batch.layers)
        self.batch, self.chunk, self.rows, self.nodes = batch, chunk, rows, nodes
        self.chunk_kv: tuple[Tensor, Tensor] | None = None
        self.attention = TreeAttention(tree.backend if tree is not None else "torch", torch.empty(0, 0, dtype=torch.bool),
                                       fused=(rows * nodes, tree, chunk_tree, self))

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        m = self.rows * self.nodes
        rows_k = key_states[0, :, :m].unflatten(1, (self.rows, self.nodes)).transpose(0, 1)
        rows_v = value_states[0, :, :m].unflatten(1, (self.rows, self.nodes)).transpose(0, 1)
        self.chunk_kv = self.chunk.update(key_states[:, :, m:], value_states[:, :, m:], layer_idx, *args, **kwargs)
        return self.batch.update(rows_k, rows_v, layer_idx, *args, **kwargs)


_WRITE_INDEX: tuple = (None, None)  # (key, index): every layer of one forward writes at the same positions


def _write_index(lengths: list[int], shape: torch.Size, device) -> Tensor:
    """The scatter index that puts row b's n new entries ([B, H, n, D]) at positions lengths[b] .. lengths[b] + n - 1
    (built once per forward and shape, shared by its layers; one tuple read and written whole, so threads running
    other batches at once never mix a key with another's index)."""
    global _WRITE_INDEX
    key = (tuple(lengths), tuple(shape), str(device))
    cached_key, cached = _WRITE_INDEX
    if cached_key == key:
        return cached
    b, h, n, d = shape
    pos = torch.tensor(lengths, device=device)[:, None] + torch.arange(n, device=device)
    index = pos[:, None, :, None].expand(b, h, n, d)
    _WRITE_INDEX = (key, index)
    return index


_CLEAR_AHEAD = 128  # KV entries zeroed ahead of the longest row at a time
_MIN_FUSED = 8  # the smallest prompt chunk worth fusing into a decode forward


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

    def prefill(self, prompts: list[Tensor], *, hidden: bool = False, rows: int = 0) -> list[ForwardOutput]:
        """A new batch: each prompt prefilled on its own (a causal forward into a single-row cache) and added as a
        row, with room for ``rows`` rows in all."""
        self.cache = None
        return self.join(prompts, hidden=hidden, rows=rows)

    def join(self, prompts: list[Tensor], *, hidden: bool = False, rows: int = 0) -> list[ForwardOutput]:
        """New rows: each prompt prefilled on its own, then appended after the live rows."""
        outs = []
        for ids in prompts:
            cache = TreeKVCache()
            outs.append(self.extend(cache, ids, hidden=hidden))
            self.attach(cache, rows)
        return outs

    def extend(self, cache: TreeKVCache, ids: Tensor, *, hidden=False) -> ForwardOutput:
        """Append a chunk of a prompt to ``cache`` (a single-row cache outside the batch; see TreeRunner.extend)."""
        self._single.cache = cache
        try:
            return self._single.extend(ids, hidden=hidden)
        finally:
            self._single.cache = TreeKVCache()

    def attach(self, cache: TreeKVCache, rows: int = 0) -> None:
        """A prefilled single-row cache joins the batch as its last row (room for ``rows`` rows when it is the first)."""
        if self.cache is None:
            self.cache = BatchKVCache.stack([cache], rows)
        else:
            self.cache.add_rows([cache])

    def forward(self, trees: list[TokenTree], *, hidden: bool = False) -> ForwardOutput:
        """One forward over every row's tree: logits [B, N, V] (rows past a tree's own size are padding)."""
        lean = self._lean(len(trees) * max(len(t) for t in trees))
        if lean is not None:
            tokens, depths, anc = pad_trees(trees)
            logits, h = lean.forward(self.cache, tokens, depths, anc, embeds=self._aux_embeds(trees, tokens),
                                     taps=hidden_layers(hidden))
            return ForwardOutput(logits, h)
        kwargs, positions = self._tree_inputs(trees)
        with self._single._kernels():
            out, h = tapped_forward(self.model, hidden_layers(hidden), position_ids=positions.to(self.device), cache=self.cache,
                                    use_cache=True, **kwargs)
        return ForwardOutput(_upcast(out.logits), h)

    def _lean(self, rows: int):
        """The lean native forward (:mod:`specdec.lean`) when it serves ``rows`` rows of this model, else None."""
        fast = self._single.fast
        lean = getattr(fast, "lean", None) if fast is not None else None
        return lean if lean is not None and lean.serves(rows) else None

    def fused_room(self, trees: list[TokenTree]) -> int | None:
        """Chunk tokens that fit in a forward beside these trees while every row stays on the fast kernels'
        row-count table (past it, ``F.linear`` would compute the rows, not the measured kernel a plain step
        uses); None: no limit (no fast kernels)."""
        fast = self._single.fast
        if fast is None or not fast.routed:
            return None
        return max(ROW_BUCKETS) - len(trees) * max(len(t) for t in trees)

    def can_fuse(self) -> bool:
        """Whether a prompt's chunk can ride in the batch's decode forward (:meth:`forward_fused`): the attention
        must be routed (the split happens inside it). Not where the decode forward is the lean native one
        (:mod:`specdec.lean`): a fused forward runs HF's modeling code, which rounds differently, and a row's nodes
        must be computed by one code whatever joins beside them."""
        return self.route and self.cache is not None and self._lean(1) is None

    def forward_fused(self, trees: list[TokenTree], cache: TreeKVCache, ids: Tensor, *, hidden=False) -> tuple[ForwardOutput, ForwardOutput]:
        """One forward over every row's tree *and* a chunk of a joining prompt (``ids``, [C] long, appended to its
        own single-row ``cache`` after what it holds): the chunk's tokens are packed after the batch's B·N nodes
        into one sequence, so every linear layer streams its weights once for both (SARATHI's piggybacking,
        DeepSpeed-FastGen's SplitFuse); inside each attention layer the queries split again, the rows' against
        the batch cache with their tree masks, the chunk's causally against its own cache, each exactly as its
        own forward would compute it. Returns the batch's output (as :meth:`forward`) and the chunk's (its last
        position's logits [1, V]; with ``hidden``, the hidden states of its C positions)."""
        kwargs, positions = self._tree_inputs(trees)
        b, n = positions.shape
        done, c = cache.get_seq_length(), ids.numel()
        chain = torch.ones(c, c, dtype=torch.bool).tril_()
        dtype = getattr(self.model, "dtype", torch.float32)
        chunk_tree = TreeAttention.build(self.backend, done, chain.to(self.device), dtype) if done else None
        fused = _FusedCache(self.cache, cache, b, n, kwargs.pop("specdec_tree", None), chunk_tree)
        kwargs["specdec_tree"] = fused.attention
        ids = ids.to(self.device)
        if "inputs_embeds" in kwargs:
            chunk = self.model.get_input_embeddings()(ids[None])
            kwargs["inputs_embeds"] = torch.cat([kwargs["inputs_embeds"].flatten(0, 1)[None], chunk], dim=1)
        else:
            kwargs["input_ids"] = torch.cat([kwargs["input_ids"].flatten(), ids])[None]
        positions = torch.cat([positions.flatten(), torch.arange(done, done + c)])[None].to(self.device)
        keep = torch.cat([torch.arange(b * n), torch.tensor([b * n + c - 1])]).to(self.device)
        with self._single._kernels():
            out, h = tapped_forward(self.model, hidden_layers(hidden), position_ids=positions, cache=fused, use_cache=True,
                                    logits_to_keep=keep, **kwargs)
        logits = _upcast(out.logits[0])
        rows = ForwardOutput(logits[: b * n].unflatten(0, (b, n)), h[0, : b * n].unflatten(0, (b, n)) if h is not None else None)
        return rows, ForwardOutput(logits[b * n :], h[0, b * n :] if h is not None else None)

    def _tree_inputs(self, trees: list[TokenTree]) -> tuple[dict, Tensor]:
        """The keyword arguments of a batch forward over ``trees`` (tokens or embeddings, the tree visibility) and the
        position ids [B, N]."""
        tokens, depths, anc = pad_trees(trees)
        lengths = torch.tensor(self.cache.lengths)
        total = int(lengths.max()) + tokens.shape[1]
        kwargs = {}
        if len(trees) == 1 and len(trees[0]) == 1:
            pass  # one row, one node: a plain causal step that sees the whole cache (no mask, as HF's own step)
        elif self.route:
            dtype = getattr(self.model, "dtype", torch.float32)
            kwargs["specdec_tree"] = TreeAttention.build_batch(self.backend, lengths.to(self.device), anc.to(self.device), total, dtype)
        else:
            visible = ragged_tree_mask(lengths, anc, total).to(self.device)
            mask = torch.zeros(visible.shape, dtype=getattr(self.model, "dtype", torch.float32), device=self.device)
            kwargs["attention_mask"] = mask.masked_fill_(~visible, torch.finfo(mask.dtype).min)[:, None]
        embeds = self._aux_embeds(trees, tokens)
        if embeds is not None:
            kwargs["inputs_embeds"] = embeds
        else:
            kwargs["input_ids"] = tokens.to(self.device)
        return kwargs, lengths[:, None] + depths

    def _aux_embeds(self, trees: list[TokenTree], tokens: Tensor) -> Tensor | None:
        """The input embeddings [B, N, H] when some tree has auxiliary nodes (PPD: they take the drafter's embeddings
        instead of a token's), else None."""
        if all(t.input_embeds is None for t in trees):
            return None
        with torch.no_grad():
            embeds = self.model.get_input_embeddings()(tokens.to(self.device))
        for b, t in enumerate(trees):
            if t.input_embeds is not None:
                aux = torch.nonzero(t.auxiliary).flatten().to(self.device)
                embeds[b, aux] = t.input_embeds[aux.cpu()].to(self.device, embeds.dtype)
        return embeds

    def commit(self, paths: list[Tensor]) -> None:
        self.cache.commit_rows(paths)

    def keep(self, rows: list[int]) -> None:
        self.cache.keep_rows(rows)


@dataclass
class Request:
    """One sequence for :class:`BatchEngine`: its prompt and its own settings.

    ``key`` comes back with each of its events. ``cancelled`` may be set from any thread (a client that went
    away): the row leaves the batch at the next step with finish reason ``"cancelled"``.
    """

    ids: Tensor  # [T] prompt ids
    drafter: Drafter  # this sequence's own drafter (bound; reset at join)
    verifier: object
    max_new_tokens: int
    generator: torch.Generator | None = None
    stop: object = None  # engine._StopStrings or None
    stats: object = None  # a GenerationStats to fill, or None
    key: object = None
    cancelled: bool = False


@dataclass
class _Prefill:
    """A request whose prompt is being prefilled (in chunks while other rows decode) into its own cache."""

    req: Request
    cache: TreeKVCache
    done: int = 0  # prompt tokens in the cache
    hidden: list = field(default_factory=list)  # hidden states of each chunk
    last: ForwardOutput | None = None


@dataclass
class _Row:
    """One sequence of the batch."""

    req: Request
    ids: Tensor  # committed tokens
    new: list[int]
    pending: list[int]
    hidden: Tensor | None
    hidden_start: int
    layers: tuple[int, ...] | None  # the target layers its drafter reads

    @property
    def drafter(self) -> Drafter:
        return self.req.drafter


class BatchEngine:
    """The open batch: requests join at any step (:meth:`add`, from any thread), each row drafts, is verified and
    commits on its own, and one target forward per step serves every running row.

    :meth:`step` runs one iteration (waiting requests join while there is room, every row emits what it
    accepted and finished rows leave, then one draft-verify-commit step) and returns the ``(key, StepEvent)``
    pairs it produced; a row's first event carries the token of its prefill. Rows may use different drafters
    (the forward taps the union of the target layers they read), verifiers, generators, limits and stop
    strings. Greedy output of every row equals that prompt alone.

    **Chunked prefill** (SARATHI's idea): while rows are decoding, a joining prompt is prefilled a chunk per step
    (into its own cache, which joins the batch when the prompt is done), so the running rows are never stalled
    for a whole long prompt; with no row decoding, prompts are prefilled whole (the fastest first token). With
    ``fuse_prefill`` (the default, where the attention is routed) the chunk rides in the step's decode forward,
    one chunk per step; otherwise each chunk is a forward of its own.

    Args:
        eos_ids: token ids that end a sequence.
        max_rows: > 0: at most that many rows in flight (prefilling ones included); the others wait, in order.
        cost: v(n), the measured cost of a forward over n rows (None: trees as proposed).
        max_nodes: the most nodes one row's tree may hold.
        prefill_chunk: prompt tokens prefilled per step while rows decode: 0 whole prompts at once (a join
            stalls the batch for its prefill), N > 0 that many, None sized from ``cost`` (a chunk costs about
            as much as the batch's decode forward, so the running rows' step time at most doubles).
        batch_cost: v(B, n), the measured cost of a forward over B rows of n nodes
            (:class:`~specdec.profile.BatchCostProfile`): every step sizes all rows' trees jointly with it, so
            trees grow while few rows run and shrink to nothing where verifying costs more than it returns
            (None: ``cost(B·n)``). Where every row's drafter is ``stateless`` (prompt lookup) and 4 drafted
            steps in a row at this batch size kept no draft, the batch stops drafting too (its cost is not
            in the forward's profile) and drafts again every 16th step to see whether trees pay again. With
            more than one row, the batch also checks what trees really return: once 8 steps with trees have
            yielded fewer tokens per second than plain steps at this batch size (B over a plain step's measured
            time), it verifies roots only, letting trees through on probe steps (16 steps apart, the gap doubling
            up to 64 while probes keep losing, back to 16 once trees pay); a profile measured on a quieter machine, or drafts accepted less often than they were scored, cannot slow it down for long.
            Drafters whose own forwards cost a share of the step (``Drafter.skippable``: EAGLE, Clover, Medusa)
            are checked the same way at every batch size, one row included, with their drafting counted: while
            their drafted steps lose to plain ones the batch does not ask them (roots only, probe steps as
            above), and keeps the skipped steps' hidden states for their next propose.
        fuse_prefill: pack a prefilling prompt's chunk into the step's decode forward (False: a forward of its own;
            the outputs are the same either way).
    """

    def __init__(self, model, *, eos_ids: set[int], max_rows: int = 0, attn: str = "torch", fast: FastLinears | None = None,
                 route: bool | None = None, cost: Callable[[int], float] | None = None, max_nodes: int = 64,
                 prefill_chunk: int | None = 0, batch_cost: Callable[[int, int], float] | None = None,
                 fuse_prefill: bool = True) -> None:
        if prefill_chunk is not None and prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0: whole prompts) or None (sized from the cost), got {prefill_chunk}")
        self.runner = BatchRunner(model, attn=attn, fast=fast, route=route)
        self.eos_ids, self.max_rows, self.cost, self.max_nodes = eos_ids, max_rows, cost, max_nodes
        self.prefill_chunk, self.batch_cost, self.fuse_prefill = prefill_chunk, batch_cost, fuse_prefill
        self._chunk: tuple[_Prefill, int] | None = None  # the prompt chunk that rides in this step's decode forward
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: list[_Prefill] = []
        self.rows: list[_Row] = []
        self._last_forward = (1, 1)  # rows and nodes of the last decode forward (what a chunk is sized against)
        self._steps = 0
        self._plain_streak: dict[int, int] = {}  # batch size -> consecutive drafted steps whose trees were all cut to the root
        self._paid: dict[int, _Paid] = {}  # batch size (> 1) -> what its plain and its tree steps have really yielded
        self.clock: Callable[[], float] = time.perf_counter  # the step timer (a test may replace it)

    def add(self, request: Request) -> None:
        """Queue a request; it joins at the next step with room (thread-safe)."""
        self.waiting.append(request)

    @property
    def idle(self) -> bool:
        return not self.rows and not self.waiting and not self.prefilling

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "BatchEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.inference_mode()
    def admit(self) -> list[tuple[object, object]]:
        """Let waiting requests join (prefilling them, in chunks while other rows decode) and emit what every row
        has pending (a joined row's first token); finished and cancelled rows leave. Returns the events."""
        return self._admit(fuse=False)

    def _admit(self, fuse: bool) -> list[tuple[object, object]]:
        """:meth:`admit`; with ``fuse``, the chunk a prefilling prompt takes in this step is left for the decode
        forward that follows (:attr:`_chunk`) instead of running a forward of its own."""
        from specdec.engine import StepEvent

        events: list[tuple[object, object]] = []
        self._chunk = None
        while self.waiting and (self.max_rows <= 0 or len(self.rows) + len(self.prefilling) < self.max_rows):
            req = self.waiting.popleft()
            if req.cancelled:
                events.append((req.key, StepEvent([], "cancelled")))
                continue
            self.prefilling.append(_Prefill(req, TreeKVCache()))
        budget = self.chunk_tokens() if self.rows else None
        fuse = fuse and budget is not None and self.fuse_prefill and self.runner.can_fuse()
        still = []
        for pf in self.prefilling:
            if pf.req.cancelled:
                events.append((pf.req.key, StepEvent([], "cancelled")))
                continue
            left = pf.req.ids.numel() - pf.done
            if budget is None or budget > 0:
                n = left if budget is None else min(left, budget)
                if fuse and self._chunk is None:
                    self._chunk = (pf, n)  # rides in this step's decode forward; joins after it when it ends the prompt
                    budget -= n
                    still.append(pf)
                    continue
                if not fuse:
                    self._prefill(pf, n)
                    budget = None if budget is None else budget - n
            if pf.done == pf.req.ids.numel():
                self.rows.append(self._join(pf))
            else:
                still.append(pf)
        self.prefilling = still
        self._emit_all(events)
        return events

    @torch.inference_mode()
    def step(self) -> list[tuple[object, object]]:
        """One iteration: :meth:`admit`, then one draft-verify-commit step over every running row, whose accepted
        tokens are emitted at once. Returns the ``(key, StepEvent)`` pairs of both."""
        events = self._admit(fuse=True)
        if self.rows:
            self._decode()
            self._emit_all(events)
        return events

    def _emit_all(self, events: list) -> None:
        """Emit every row's pending tokens; finished and cancelled rows leave the batch (the last rows move into
        their places)."""
        from specdec.engine import StepEvent

        live = []
        for pos, r in enumerate(self.rows):
            if r.req.cancelled:
                events.append((r.req.key, StepEvent([], "cancelled")))
                r.drafter.close(list(r.new))
                continue
            if not r.pending:
                live.append(pos)
                continue
            event = self._emit(r)
            events.append((r.req.key, event))
            if event.finish_reason:
                r.drafter.close(list(r.new))
            else:
                live.append(pos)
        if len(live) < len(self.rows):
            order = _fill_holes(live, len(self.rows))
            if order:
                self.runner.keep(order)
            else:
                self.runner.cache = None  # the batch is empty: the next request starts a fresh cache
            self.rows = [self.rows[p] for p in order]

    def chunk_tokens(self) -> int | None:
        """Prompt tokens to prefill in this step while rows decode (None: no limit)."""
        if self.prefill_chunk is None:  # sized from the cost: a chunk costs about one decode forward of the batch
            if self.cost is None:
                return 256
            rows, nodes = self._last_forward
            step, n = (self.batch_cost(rows, nodes) if self.batch_cost is not None else self.cost(rows * nodes)), 32
            while n < 4096 and self.cost(2 * n) <= step:
                n *= 2
            return n
        return self.prefill_chunk or None

    def _prefill(self, pf: _Prefill, n: int) -> None:
        t0 = time.perf_counter()
        pf.last = self.runner.extend(pf.cache, pf.req.ids[pf.done : pf.done + n], hidden=pf.req.drafter.hidden_request())
        if pf.last.hidden_states is not None:
            pf.hidden.append(pf.last.hidden_states)
        pf.done += n
        if pf.req.stats is not None:
            pf.req.stats.prefill_time_s += time.perf_counter() - t0

    def _join(self, pf: _Prefill) -> _Row:
        """A prefilled request becomes a row of the batch; its first token (from the prompt's last logits) is pending."""
        req = pf.req
        self.runner.attach(pf.cache, self.max_rows)
        req.drafter.reset(req.ids)
        req.drafter.prompt_cache(pf.cache)
        first = req.verifier.accept(TokenTree.root_only(int(req.ids[-1])), pf.last.logits[-1:], req.generator, req.ids[:-1]).bonus
        hidden = torch.cat(pf.hidden) if len(pf.hidden) > 1 else (pf.hidden[0] if pf.hidden else None)
        return _Row(req, req.ids.clone(), [], [first], hidden, 0, hidden_layers(req.drafter.hidden_request()))

    def _kv_reader(self, row: int):
        """``DraftState.target_kv`` for batch row ``row``: views of its committed keys/values in every layer."""
        layers = self.runner.cache.layers

        def read(start: int, stop: int) -> tuple[list[Tensor], list[Tensor]]:
            if not 0 <= start <= stop <= layers[0].lengths[row]:
                raise IndexError(f"positions {start}..{stop - 1} are not committed (row {row} holds {layers[0].lengths[row]})")
            return ([layer._kb[row : row + 1, :, start:stop] for layer in layers],
                    [layer._vb[row : row + 1, :, start:stop] for layer in layers])

        return read

    def _emit(self, r: _Row):
        """Emit a row's pending tokens, cut at EOS / stop / its length limit."""
        from specdec.engine import StepEvent, _emit

        emitted, reason = _emit(r.pending, r.new, self.eos_ids, r.req.stop, r.req.max_new_tokens)
        r.pending = []
        r.ids = torch.cat([r.ids, torch.tensor(emitted, dtype=torch.long)])
        if r.req.stats is not None:
            r.req.stats.new_tokens = len(r.new)
        return StepEvent(emitted, reason)

    def _decode(self) -> None:
        """Draft per row (or all rows at once), size the trees together, one forward, accept and commit per row.
        Each phase's wall time goes to every row's ``stats.profile`` (a row waits for the whole batch's step)."""
        from specdec.engine import _Clock, _step_result

        rows = self.rows
        started = self.clock()
        clock = _Clock(*[r.req.stats.profile for r in rows if r.req.stats is not None])
        states = [DraftState(r.ids, r.req.ids.numel(), r.hidden, r.hidden_start, self._kv_reader(b)) for b, r in enumerate(rows)]
        if hasattr(self.cost, "prefix"):  # a context-aware cost (specdec.profile.ContextCost): this step's prefix length
            self.cost.prefix = max(r.ids.numel() for r in rows)
        self._steps += 1
        b = size = len(rows)  # size: the rows of this step (``b`` is reused as a row index below, rows may grow)
        gate = self.cost is not None and all(type(r.drafter).stateless for r in rows)
        # Drafters whose own forwards cost something (trained heads, EAGLE) are also judged by what their steps
        # really return, drafting included, at any batch size: the cost profile prices tree nodes, not drafting.
        costly = not gate
        skippable = all(_can_skip(r.drafter) for r in rows)
        paid = (self._paid.setdefault(b, _Paid()) if self.cost is not None and (b > 1 or (costly and skippable))
                else None)
        unpaid = paid is not None and paid.skips(self._steps)
        proposed = None
        cheap = False  # trees from a fusion's stateless members alone, while its costly members are skipped
        if gate and self._plain_streak.get(b, 0) >= _GATE_AFTER and self._steps % _GATE_PROBE:
            # Under this load no tree has paid for a while: skip drafting too (stateless drafters lose nothing),
            # and look again every _GATE_PROBE steps.
            trees = [TokenTree.root_only(s.root) for s in states]
        elif unpaid and costly and skippable:
            # Drafted steps have yielded fewer tokens per second than plain ones: skip drafting (these drafters
            # catch up on the positions they missed at their next propose), and draft again on probe steps (_Paid.skips).
            # A fusion's stateless members (prompt lookup) still draft: they cost next to nothing.
            trees = [r.drafter.propose_stateless(s) or TokenTree.root_only(s.root) for r, s in zip(rows, states)]
            cheap = any(len(t) > 1 for t in trees)
            if cheap:
                trees = trim_batch(trees, self.cost, self.max_nodes, self.batch_cost)
        else:
            proposed = _propose(rows, states)
            trees = trim_batch(proposed, self.cost, self.max_nodes, self.batch_cost) if self.cost is not None else proposed
            if gate and any(len(t) > 1 for t in proposed):  # steps with nothing proposed say nothing about the cost
                self._plain_streak[b] = self._plain_streak.get(b, 0) + 1 if all(len(t) == 1 for t in trees) else 0
        if unpaid and proposed is not None:
            # Trees kept by the cost model have yielded fewer tokens per second than plain steps at this batch size
            # (a profile measured on a quieter machine, drafts accepted less often than scored): verify roots only,
            # and let trees through on probe steps (_Paid.skips) to see whether that has changed.
            trees = [TokenTree.root_only(s.root) for s in states]
        skipped = proposed is None and not gate  # drafters that did not see this step (their hidden states accumulate)
        # a step that verified trees; for costly drafters also one whose drafts the cost model cut to the root (its
        # drafting was paid for): what _Paid weighs against plain steps
        drafted = proposed is not None and not unpaid and any(len(t) > 1 for t in (proposed if costly else trees))
        trees = [cap(t, self.max_nodes) for t in trees]  # a hard cap, also for trees that carry no scores
        clock.lap("draft")
        joining, n = self._chunk if self._chunk is not None else (None, 0)  # the prompt prefilled in this step
        self._chunk = None
        fused = joining is not None
        if fused:
            room = self.runner.fused_room(trees)
            if room is not None and n > room:  # past the kernels' row table the rows would change kernel: shrink it,
                if room >= _MIN_FUSED:  # or run it as a forward of its own when little room is left
                    n = room
                else:
                    self._prefill(joining, n)
                    fused = False
        chunk_layers = hidden_layers(joining.req.drafter.hidden_request()) if fused else None
        union = _layer_union([r.layers for r in rows] + [chunk_layers])
        lengths = self.runner.lengths
        self._last_forward = (len(trees), max(len(t) for t in trees))
        if not fused:
            out = self.runner.forward(trees, hidden=union or False)
        else:  # a joining prompt's chunk rides in this forward (see BatchRunner.forward_fused)
            t0 = time.perf_counter()
            out, chunk_out = self.runner.forward_fused(trees, joining.cache, joining.req.ids[joining.done : joining.done + n],
                                                       hidden=union or False)
            if joining.req.stats is not None:  # the prompt waited for the whole forward
                joining.req.stats.prefill_time_s += time.perf_counter() - t0
        clock.lap("forward")
        accepted = [r.req.verifier.accept(t, out.logits[b, : len(t)], r.req.generator, r.ids[:-1])
                    for b, (t, r) in enumerate(zip(trees, rows))]
        clock.lap("accept")
        self.runner.commit([a.path for a in accepted])
        clock.lap("commit")
        for b, (r, t, a) in enumerate(zip(rows, trees, accepted)):
            r.pending = a.new_tokens(t)
            h = _row_layers(out.hidden_states[b, : len(t)], union, r.layers) if r.layers else None
            kept = h[a.path.to(h.device)] if h is not None else None
            if skipped:  # the drafter did not propose: it reads this step's positions with the next ones
                r.hidden = torch.cat([r.hidden, kept]) if r.hidden is not None and kept is not None else kept
            else:
                r.hidden, r.hidden_start = kept, lengths[b]
                r.drafter.observe(_step_result(t, a, r.pending, ForwardOutput(out.logits[b, : len(t)], h)))
            if r.req.stats is not None:
                r.req.stats.target_forwards += 1
                r.req.stats.drafted_tokens += t.num_drafts
                r.req.stats.tokens_per_step.append(len(r.pending))
        if fused:
            h = _row_layers(chunk_out.hidden_states, union, chunk_layers) if chunk_layers else None
            joining.last = ForwardOutput(chunk_out.logits, h)
            if h is not None:
                joining.hidden.append(h)
            joining.done += n
        if joining is not None and joining.done == joining.req.ids.numel():  # the prompt is in: it joins, first token pending
            self.prefilling.remove(joining)
            self.rows.append(self._join(joining))
        clock.lap("other")
        if paid is not None and joining is None and not cheap:  # a step carrying a prompt's chunk, or the stateless
            # members' trees alone, says nothing clean about what the skipped drafting yields against plain steps
            paid.record(drafted, sum(len(r.pending) for r in rows[:size]), size, self.clock() - started)


class _Paid:
    """What speculation has really returned at one batch size: the running mean time of a plain step (every tree
    a root) and the running tokens per second of steps that verified trees (drafting included). Trees pay while
    the second is at least B over the first: what a plain step would have given in the same time."""

    def __init__(self) -> None:
        self.plain_s: float | None = None
        self.tree_rate: float | None = None
        self.tree_steps = 0
        self.b = 1
        self.interval = _GATE_PROBE  # steps between probes while trees do not pay (see skips)
        self.next_probe: int | None = None

    def record(self, with_trees: bool, tokens: int, b: int, seconds: float) -> None:
        self.b = b
        if seconds <= 0:
            return
        if with_trees:
            rate = tokens / seconds
            self.tree_rate = rate if self.tree_rate is None else (1 - _EMA) * self.tree_rate + _EMA * rate
            self.tree_steps += 1
        else:
            self.plain_s = seconds if self.plain_s is None else (1 - _EMA) * self.plain_s + _EMA * seconds

    def skips(self, step: int) -> bool:
        """Whether step ``step`` goes without trees: while they do not pay, all but one probe step in
        ``interval``; the interval doubles (up to _PROBE_MAX) after each probe that leaves them still not paying,
        and returns to _GATE_PROBE as soon as they pay."""
        if self.trees_pay():
            self.interval, self.next_probe = _GATE_PROBE, None
            return False
        if self.next_probe is None:  # they just stopped paying
            self.next_probe = step + self.interval
            return True
        if step < self.next_probe:
            return True
        self.interval = min(2 * self.interval, _PROBE_MAX)
        self.next_probe = step + self.interval
        return False

    def trees_pay(self) -> bool:
        if self.tree_steps < _PAID_AFTER or self.tree_rate is None:
            return True  # not enough evidence yet: trust the cost model
        if self.plain_s is None:
            return False  # every step so far verified trees: take one plain step to compare with
        return self.tree_rate >= self.b / self.plain_s


_EMA = 0.2  # weight of the newest step in _Paid's running means
_PAID_AFTER = 8  # tree steps at a batch size before their measured yield may overrule the cost model
_GATE_AFTER = 4  # drafted steps in a row with every tree cut to the root before a batch stops drafting
_GATE_PROBE = 16  # while stopped, it drafts again every this many steps to see whether trees pay again
_PROBE_MAX = 64  # _Paid's probe interval doubles up to this while its probes keep losing


def _layer_union(wanted: list[tuple[int, ...] | None]) -> tuple[int, ...]:
    """Every layer some row reads, in first-seen order."""
    union: list[int] = []
    for layers in wanted:
        union += [i for i in (layers or ()) if i not in union]
    return tuple(union)


def _row_layers(h: Tensor, union: tuple[int, ...], layers: tuple[int, ...]) -> Tensor:
    """The columns of ``h`` ([N, len(union)·H]) that hold ``layers``, in their order."""
    if layers == union:
        return h
    size = h.shape[-1] // len(union)
    return torch.cat([h[:, union.index(i) * size : (union.index(i) + 1) * size] for i in layers], dim=-1)


def decode_batch(
    model, prompts: list[Tensor], drafters: list[Drafter], verifier, *, max_new_tokens: int, eos_ids: set[int],
    stops: list | None = None, generator: torch.Generator | None = None, stats: list | None = None, attn: str = "torch",
    fast: FastLinears | None = None, route: bool | None = None, cost: Callable[[int], float] | None = None, max_nodes: int = 64,
    max_rows: int = 0, batch_cost: Callable[[int, int], float] | None = None,
) -> Iterator[tuple[int, object]]:
    """The batched core loop over a list known in advance: yields ``(row index, StepEvent)`` as each sequence
    emits tokens, until all have finished (a :class:`BatchEngine` fed every prompt at once).

    Each row drafts, is verified and commits on its own; one target forward per step serves all rows that are
    still running. Greedy output of every row equals that prompt's output alone (the model computes the same
    function of the same tokens at the same positions; the kernels may sum in another order, as in any tree
    forward).

    ``max_rows`` > 0 is continuous batching: at most that many sequences are in flight; the others wait, in
    order, and each joins (prefilled on its own, between two steps) as soon as a row leaves, so the batch stays
    full until the queue is empty. 0 runs every prompt at once.
    """
    stops = stops or [None] * len(prompts)
    with BatchEngine(model, eos_ids=eos_ids, max_rows=max_rows, attn=attn, fast=fast, route=route, cost=cost,
                     max_nodes=max_nodes, batch_cost=batch_cost) as engine:
        for i, ids in enumerate(prompts):
            engine.add(Request(ids, drafters[i], verifier, max_new_tokens, generator, stops[i], stats[i] if stats else None, key=i))
        while not engine.idle:
            yield from engine.step()


def _fill_holes(live: list[int], n: int) -> list[int]:
    """The new row order when only the positions ``live`` (of ``n``) stay: rows in place stay there, and the
    last live rows move into the holes (so few rows' entries move).

    >>> _fill_holes([0, 2, 3, 4], 5)   # row 1 left: row 4 takes its place
    [0, 4, 2, 3]
    """
    m = len(live)
    stay = set(p for p in live if p < m)
    movers = [p for p in live if p >= m]
    order = list(range(m))
    for hole, src in zip((p for p in range(m) if p not in stay), movers):
        order[hole] = src
    return order


def _can_skip(drafter: Drafter) -> bool:
    """Whether the engine may leave this drafter out of some steps (see ``Drafter.skippable``)."""
    return type(drafter).stateless or bool(getattr(drafter, "skippable", False))


def _propose(rows: list[_Row], states: list[DraftState]) -> list[TokenTree]:
    """Every row's tree: one call for all rows where the drafter class batches its own work."""
    groups: dict[type, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(type(r.drafter), []).append(i)
    trees: list[TokenTree | None] = [None] * len(rows)
    for kind, idx in groups.items():  # one call per drafter class (Medusa's heads run once for all its rows)
        for i, t in zip(idx, kind.propose_batch([rows[i].drafter for i in idx], [states[i] for i in idx])):
            trees[i] = t
    for t, s, r in zip(trees, states, rows):
        if int(t.tokens[0]) != s.root:
            raise RuntimeError(f"drafter {r.drafter.name!r} proposed a tree whose root is not the last committed token")
    return trees
