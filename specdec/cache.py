"""A KV cache whose rollback moves a pointer and whose commit is one gather.

Each layer keeps preallocated key/value buffers ``[B, H, capacity, D]`` and a
length. A verification forward appends the N tree nodes after the committed
prefix (``update`` writes them in place and returns a *view* of the first
``length`` entries, so no step copies the whole cache). After acceptance,
``commit(prefix_len, keep)`` gathers the accepted nodes' entries into
positions ``prefix_len .. prefix_len + len(keep) - 1`` and sets the length:
the rejected entries stay in the buffer, masked by the length, and are
overwritten by the next step. Capacity doubles when full (amortised O(1)).

The class plugs into transformers as an ordinary ``Cache`` (the model calls
``update(key, value, layer_idx)``), so the model runs unmodified.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["TreeKVCache", "is_chain"]

_MIN_CAPACITY = 256
_SPARE_BYTES = 512 << 20  # buffers of released caches kept for the next ones (see TreeKVCache.release)
_spare: list[tuple[Tensor, Tensor]] = []
_spare_lock = threading.Lock()


def _take_spare(like_k: Tensor, like_v: Tensor, needed: int) -> tuple[Tensor, Tensor] | None:
    """A released key/value buffer pair of ``like_k``/``like_v``'s batch, heads, head dims, dtype and device with room
    for ``needed`` entries (the most recently released first), or None."""
    b, h, _, dk = like_k.shape
    with _spare_lock:
        for i in range(len(_spare) - 1, -1, -1):
            k, v = _spare[i]
            if (k.shape[0], k.shape[1], k.shape[3], v.shape[3]) == (b, h, dk, like_v.shape[-1]) and k.shape[2] >= needed \
                    and k.dtype == like_k.dtype and k.device == like_k.device:
                return _spare.pop(i)
    return None


def is_chain(path: Tensor) -> bool:
    """Whether the accepted nodes ``path`` are 0, 1, ..., A - 1 (a chain from the root): their entries already sit
    in place, and committing them moves only a length."""
    return bool(torch.equal(path, torch.arange(path.numel())))


class _TreeLayer(DynamicLayer):
    """One layer's preallocated keys/values; ``keys``/``values`` are views of the live part."""

    is_croppable = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.length = 0
        self._k = key_states.new_empty(0)
        self._v = value_states.new_empty(0)
        self._reserve(key_states, value_states, key_states.shape[-2])
        self.is_initialized = True

    def _reserve(self, key_states: Tensor, value_states: Tensor, needed: int) -> None:
        allocated = self._k.dim() == 4
        capacity = self._k.shape[-2] if allocated else 0
        if needed <= capacity and allocated:
            return
        new_cap = max(2 * capacity, needed + _MIN_CAPACITY)  # room to grow (not touched until written)
        b, h, _, dk = key_states.shape
        # empty, not zeros: a single sequence's forwards read entries below its length only (``keys``/``values``
        # are views up to it; a batch stacks those views into buffers of its own, which it keeps finite), and
        # zero-filling touched every page of the new capacity at once (first touches cost ~2 ms per MB on this
        # project's AMD host: 160 ms when a draft cache of 1K entries grew once)
        spare = _take_spare(key_states, value_states, new_cap)
        if spare is not None:  # a released cache's buffers: no fresh pages to fault in
            k, v = spare
        else:
            k = key_states.new_empty(b, h, new_cap, dk)
            v = value_states.new_empty(b, h, new_cap, value_states.shape[-1])
        if self.length:
            k[:, :, : self.length] = self._k[:, :, : self.length]
            v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v = k, v

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._reserve(key_states, value_states, self.length + n)
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._refresh_views()
        return self.keys, self.values

    def _refresh_views(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """transformers 5's meaning: a negative count removes that many entries from the end; a positive one is refused."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove (as transformers' caches do), got {tokens_to_remove}; "
                             "use truncate(length) to keep the first entries")
        if self.is_initialized:
            self.truncate(self.length + tokens_to_remove)

    def truncate(self, length: int) -> None:
        """Rollback: forget everything past ``length`` (moves the pointer, copies nothing)."""
        if self.is_initialized:
            self.length = max(0, min(self.length, length))
            self._refresh_views()

    def commit(self, prefix_len: int, keep: Tensor) -> None:
        """Keep entries ``prefix_len + keep`` (in that order) right after the prefix; drop the rest."""
        if not self.is_initialized:
            return
        idx = keep + prefix_len
        self._k[:, :, prefix_len : prefix_len + keep.numel()] = self._k.index_select(2, idx)
        self._v[:, :, prefix_len : prefix_len + keep.numel()] = self._v.index_select(2, idx)
        self.truncate(prefix_len + keep.numel())


class TreeKVCache(Cache):
    """transformers ``Cache`` with in-place tree commit and pointer rollback."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=_TreeLayer)

    def commit(self, prefix_len: int, keep: Tensor) -> None:
        """Commit the accepted tree nodes after a verification forward.

        Args:
            prefix_len: number of entries committed before the forward.
            keep: [A] long, indices (0-based, relative to ``prefix_len``) of the
                tree nodes to keep, in path order (root first).

        A path that is already contiguous from the root (``keep == arange(A)``,
        e.g. a chain fully accepted) needs no copy: only the length moves.
        """
        keep = keep.cpu()  # a few indices: deciding on the host costs no device synchronisation later
        contiguous = is_chain(keep)
        for layer in self.layers:
            if contiguous:
                layer.truncate(prefix_len + keep.numel())
            else:
                layer.commit(prefix_len, keep.to(layer.device) if layer.is_initialized else keep)

    def truncate(self, length: int) -> None:
        """Rollback every layer to ``length`` entries."""
        for layer in self.layers:
            layer.truncate(length)

    def release(self) -> None:
        """The cache is done with: its buffers go to a small pool (up to 512 MB, the newest kept) from which the next
        single-sequence caches of the same shape take theirs. Freshly allocated memory is first touched page by
        page, which on this project's hosts cost 0.2-3 ms per MB depending on the process's memory history: a
        drafter's 1K-entry cache (~50 MB for the default model) took 10-100 ms to fill at each new prompt. Only
        the cache's owner may call this, when no view of it is used any more; the cache is empty afterwards."""
        freed = []
        for layer in self.layers:
            if layer.is_initialized and layer._k.dim() == 4:
                freed.append((layer._k, layer._v))
                layer._k, layer._v = layer._k.new_empty(0), layer._v.new_empty(0)
                layer.length, layer.is_initialized = 0, False
                layer.keys = layer.values = None
        with _spare_lock:
            _spare.extend(freed)
            total = sum(k.nbytes + v.nbytes for k, v in _spare)
            while _spare and total > _SPARE_BYTES:
                k, v = _spare.pop(0)
                total -= k.nbytes + v.nbytes

    def append_from(self, other: "TreeKVCache", ranges: list[tuple[int, int]]) -> None:
        """Append the entries ``start .. stop - 1`` of ``other`` for each ``(start, stop)`` in ``ranges``, in that
        order, to every layer (a copy per range and layer into the preallocated buffers: a gather of whole chunks)."""
        total = sum(stop - start for start, stop in ranges)
        if not total:
            return
        for i, src in enumerate(other.layers):
            if i >= len(self.layers) or not self.layers[i].is_initialized:
                self.update(src.keys[:, :, :0], src.values[:, :, :0], i)  # an empty layer of the right shape
            layer = self.layers[i]
            end = layer.length
            layer._reserve(src.keys[:, :, :0], src.values[:, :, :0], end + total)
            for start, stop in ranges:
                layer._k[:, :, end : end + stop - start] = src.keys[:, :, start:stop]
                layer._v[:, :, end : end + stop - start] = src.values[:, :, start:stop]
                end += stop - start
            layer.length = end
            layer._refresh_views()
