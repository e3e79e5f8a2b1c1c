"""The forward the engine runs: a causal LM over a token tree, with its own KV cache.

:class:`TreeRunner` is the one place where specdec calls a model. It owns

* the KV cache (:class:`~specdec.cache.TreeKVCache`: commit is one gather,
  rollback moves a pointer);
* the attention routing: tree nodes see the committed prefix and their
  ancestors, through transformers' attention interface (``specdec_tree``,
  torch SDPA or the Triton kernel) or, for models that cannot be routed,
  through a 4-D mask in the model's own attention;
* the fast kernels (:mod:`specdec.kernels`), switched on only inside its own
  forwards.

It is public so that drafters with a model of their own (a separate draft
model) run their forwards the same way::

    runner = TreeRunner(model)
    out = runner.prefill(prompt_ids[:-1])          # KV of the committed prefix
    out = runner.forward(tree)                     # logits [N, V] for the tree's nodes
    runner.commit(path)                            # keep the accepted nodes' KV
    runner.close()                                 # restore the model's attention setting
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.cache import TreeKVCache
from specdec.kernels import FastLinears
from specdec.tree import TokenTree
from specdec.tree_attention.hf import Routing, TreeAttention, can_route, resolve_backend
from specdec.tree_attention.reference import additive_tree_mask

__all__ = ["ForwardOutput", "TreeRunner"]


@dataclass
class ForwardOutput:
    """What one forward returns.

    Attributes:
        logits: [N, V] float32 (float64 for a float64 model); row i predicts the token after node i.
        hidden_states: [N, H] last-layer hidden states (after the final norm) when asked for, else None.
    """

    logits: Tensor
    hidden_states: Tensor | None = None


def _upcast(logits: Tensor) -> Tensor:
    """Half-precision logits go to float32 for acceptance; float32/64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


class TreeRunner:
    """Runs ``model`` over token trees, keeping the committed prefix's KV cache.

    Args:
        model: a HF causal LM (or any callable taking ``input_ids``,
            ``position_ids``, ``cache`` and ``attention_mask`` like one).
        attn: ``"auto"``, ``"torch"`` or ``"triton"`` (see :func:`resolve_backend`).
        fast: the fast kernels to use inside the forwards (None: the model's own).
        route: send tree attention through transformers' attention interface
            (default: whenever the model supports it, and always for triton).

    Use as a context manager, or call :meth:`close` when done: routing sets
    the model's attention implementation and ``close`` restores it.
    """

    def __init__(self, model, *, attn: str = "auto", fast: FastLinears | None = None, route: bool | None = None) -> None:
        self.model = model
        self.device = torch.device(getattr(model, "device", "cpu"))
        self.backend = resolve_backend(attn, self.device)
        routable = can_route(model)
        if self.backend == "triton" and not routable:
            raise ValueError(f"attn='triton' needs a model that supports transformers' attention interface; "
                             f"{type(model).__name__} does not")
        self.route = routable if route is None else (route and routable)
        if self.backend == "triton":
            self.route = True
        self.fast = fast if fast is not None and fast.active else None
        self.cache = TreeKVCache()
        self._routing = Routing(model) if self.route else None

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Restore the model's attention implementation (idempotent)."""
        if self._routing is not None:
            self._routing.restore()

    def __enter__(self) -> "TreeRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def prefix_len(self) -> int:
        """Number of committed positions in the cache."""
        return self.cache.get_seq_length()

    # ------------------------------------------------------------------ forwards
    def prefill(self, ids: Tensor, *, hidden: bool = False, all_logits: bool = False) -> ForwardOutput:
        """Causal forward over ``ids`` ([T] long) on an empty cache.

        Returns the last position's logits ([1, V], or all [T, V] with
        ``all_logits``) and, with ``hidden``, hidden states for all T positions.
        """
        if self.prefix_len:
            raise RuntimeError("prefill needs an empty cache; use forward(TokenTree) to extend a prefix")
        with self._kernels():
            out = self.model(
                input_ids=ids[None].to(self.device), cache=self.cache, use_cache=True,
                output_hidden_states=hidden, logits_to_keep=0 if all_logits else 1,
            )
        return ForwardOutput(_upcast(out.logits[0]), out.hidden_states[-1][0] if hidden else None)

    def forward(self, tree: TokenTree, *, hidden: bool = False) -> ForwardOutput:
        """One forward over the tree's N nodes after the committed prefix; their KV is appended to the cache.

        Nodes sit at positions ``prefix_len + depth`` and see the prefix and their
        ancestors. Follow with :meth:`commit` (keep some nodes) or
        :meth:`rollback` (keep none).
        """
        prefix_len = self.prefix_len
        kwargs = {}
        if len(tree) > 1:  # a lone root is a plain causal step: no mask needed
            mask = tree.ancestor_mask.to(self.device)
            if self.route:
                kwargs["specdec_tree"] = TreeAttention.build(self.backend, prefix_len, mask, self._dtype)
            else:
                kwargs["attention_mask"] = additive_tree_mask(prefix_len, mask, self._dtype)
        ids = tree.tokens[None].to(self.device)
        if tree.input_embeds is not None:  # auxiliary nodes take the drafter's embeddings instead of a token's
            embeds = self.model.get_input_embeddings()(ids)
            aux = torch.nonzero(tree.auxiliary).flatten()
            embeds[0, aux.to(self.device)] = tree.input_embeds[aux].to(self.device, embeds.dtype)
            kwargs["inputs_embeds"] = embeds
        else:
            kwargs["input_ids"] = ids
        with self._kernels():
            out = self.model(
                position_ids=tree.position_ids(prefix_len)[None].to(self.device),
                cache=self.cache, use_cache=True, output_hidden_states=hidden, **kwargs,
            )
        return ForwardOutput(_upcast(out.logits[0]), out.hidden_states[-1][0] if hidden else None)

    def commit(self, prefix_len: int, path: Tensor) -> None:
        """Keep the KV of tree nodes ``path`` ([A] long, root first, relative to ``prefix_len``) right after the prefix."""
        self.cache.commit(prefix_len, path)

    def rollback(self, length: int) -> None:
        """Forget every cache entry past ``length`` (a pointer move)."""
        self.cache.truncate(length)

    # ------------------------------------------------------------------ helpers
    @property
    def _dtype(self) -> torch.dtype:
        return getattr(self.model, "dtype", torch.float32)

    def _kernels(self):
        return self.fast.scope() if self.fast is not None else nullcontext()
