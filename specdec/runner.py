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

import inspect
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.cache import TreeKVCache
from specdec.kernels import ROW_BUCKETS, FastLinears
from specdec.tree import TokenTree
from specdec.tree_attention.hf import Routing, TreeAttention, can_route, resolve_backend
from specdec.tree_attention.reference import additive_tree_mask

__all__ = ["ForwardOutput", "TreeRunner"]


@dataclass
class ForwardOutput:
    """What one forward returns.

    Attributes:
        logits: [N, V] float32 (float64 for a float64 model); row i predicts the token after node i.
        hidden_states: [N, L·H] the hidden states of the layers asked for, side by side in the order asked
            (the default, layer -1: [N, H], the last layer after the final norm), else None.
    """

    logits: Tensor
    hidden_states: Tensor | None = None


Hidden = "bool | tuple[int, ...]"


class LayerTap:
    """Captures the target's hidden states at some of HF's ``hidden_states`` indices during a forward, without
    asking the model for every layer (``output_hidden_states`` keeps all L + 1 of them alive).

    Index 0 is the embeddings' output, i in 1 .. L - 1 the output of decoder layer i - 1, and L (or -1) the last
    layer's output after the final norm, as in ``output_hidden_states``. Models without the usual
    ``model.layers`` / ``model.norm`` layout fall back to ``output_hidden_states``.
    """

    def __init__(self, model, layers: tuple[int, ...]) -> None:
        dec = getattr(model, "model", None)
        self.hookable = all(hasattr(dec, a) for a in ("layers", "norm", "embed_tokens"))
        n = len(dec.layers) if self.hookable else getattr(model.config, "num_hidden_layers", 0)
        for i in layers:
            if not -(n + 1) <= i <= n:
                raise ValueError(f"hidden-state layer {i} does not exist: the target has hidden states 0 .. {n} (or -1 .. -{n + 1})")
        self.order = [i % (n + 1) for i in layers]
        self.modules = {}
        if self.hookable:
            self.modules = {i: dec.embed_tokens if i == 0 else dec.norm if i == n else dec.layers[i - 1] for i in set(self.order)}
        self.captured: dict[int, Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "LayerTap":
        self.captured = {}
        for i, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(lambda m, a, out, i=i: self.captured.__setitem__(i, out[0] if isinstance(out, tuple) else out)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def result(self, out) -> Tensor:
        """[B, T, L·H] from the captured outputs (or from ``out.hidden_states`` when the model is not hookable)."""
        source = self.captured if self.hookable else dict(enumerate(out.hidden_states))
        return torch.cat([source[i] for i in self.order], dim=-1)


def hidden_layers(hidden) -> tuple[int, ...] | None:
    """``hidden`` as layer indices: True is the last layer (-1); False or None is none."""
    if hidden is True:
        return (-1,)
    return tuple(hidden) if hidden else None


_CACHE_ARG: dict[type, str] = {}


def cache_argument(model) -> str:
    """The name under which ``model``'s forward takes its KV cache: ``cache`` in recent transformers 5.x,
    ``past_key_values`` before the rename (5.17 still had only the old name). Older forwards take any keyword
    through ``**kwargs`` and silently drop one they do not know, so passing the wrong name would run every step
    without its past: ask the signature (once per class) instead of trusting one version's spelling."""
    cls = type(model)
    name = _CACHE_ARG.get(cls)
    if name is None:
        try:
            params = inspect.signature(getattr(cls, "forward", None) or cls.__call__).parameters
        except (TypeError, ValueError):  # a callable without a signature: the current spelling
            params = {}
        name = "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"
        _CACHE_ARG[cls] = name
    return name


def tapped_forward(model, layers: tuple[int, ...] | None, **kwargs):
    """``model(**kwargs)``, and the hidden states of ``layers`` ([B, T, L·H]) or None. A ``cache`` keyword
    reaches the model under the name its forward takes (:func:`cache_argument`)."""
    if "cache" in kwargs:
        kwargs[cache_argument(model)] = kwargs.pop("cache")
    if layers is None:
        return model(**kwargs), None
    tap = LayerTap(model, layers)
    with tap:
        out = model(output_hidden_states=not tap.hookable, **kwargs)
    return out, tap.result(out)


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
        lean: run :meth:`forward` through the lean native decode forward (:mod:`specdec.lean`) wherever it
            serves the model and the tree's size (prefills keep the model's own forward). For a drafter's own
            model (a draft model, RAPID's short context): its forwards are what drafting costs, and their
            rounding against HF's forward does not matter (the target verifies every draft). The target's own
            runner keeps the model's forward, so its prompt's KV is what HF computes.

    Use as a context manager, or call :meth:`close` when done: routing sets
    the model's attention implementation and ``close`` restores it.
    """

    def __init__(self, model, *, attn: str = "auto", fast: FastLinears | None = None, route: bool | None = None,
                 lean: bool = False) -> None:
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
        self.lean = lean
        self.position_shift = 0  # a node's position minus its cache slot (a cache holding part of the sequence)

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
    def prefill(self, ids: Tensor, *, hidden: Hidden = False, all_logits: bool = False) -> ForwardOutput:
        """Causal forward over ``ids`` ([T] long) on an empty cache.

        Returns the last position's logits ([1, V], or all [T, V] with
        ``all_logits``) and, with ``hidden`` (True: the last layer; or a tuple of
        ``hidden_states`` indices), hidden states for all T positions.
        """
        if self.prefix_len:
            raise RuntimeError("prefill needs an empty cache; use forward(TokenTree) to extend a prefix")
        with self._kernels():
            out, h = tapped_forward(self.model, hidden_layers(hidden), input_ids=ids[None].to(self.device), cache=self.cache,
                                    use_cache=True, logits_to_keep=0 if all_logits else 1)
        return ForwardOutput(_upcast(out.logits[0]), h[0] if h is not None else None)

    def forward(self, tree: TokenTree, *, hidden: Hidden = False, last_logits_only: bool = False) -> ForwardOutput:
        """One forward over the tree's N nodes after the committed prefix; their KV is appended to the cache.

        Nodes sit at positions ``prefix_len + position_shift + depth`` and see the prefix and their
        ancestors (``position_shift`` is 0 unless the cache holds a part of the sequence: RAPID's drafts
        over the target's retrieved KV). Follow with :meth:`commit` (keep some nodes) or
        :meth:`rollback` (keep none).
        """
        prefix_len = self.prefix_len
        lean = self._lean(tree)
        if lean is not None:
            logits, h = lean.forward_single(self.cache, tree.tokens, tree.ancestor_mask, tree.depths, taps=hidden_layers(hidden),
                                            shift=self.position_shift)
            return ForwardOutput(logits[-1:] if last_logits_only else logits, h)
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
            out, h = tapped_forward(self.model, hidden_layers(hidden), position_ids=tree.position_ids(prefix_len + self.position_shift)[None].to(self.device),
                                    cache=self.cache, use_cache=True, **kwargs, **({"logits_to_keep": 1} if last_logits_only else {}))
        return ForwardOutput(_upcast(out.logits[0]), h[0] if h is not None else None)

    def extend(self, ids: Tensor, *, hidden: Hidden = False) -> ForwardOutput:
        """Append ``ids`` ([C] long) to the committed prefix causally (a chunk of a prompt): the first chunk is a
        prefill, later ones a chain tree that is committed whole. Returns the last position's logits ([1, V])
        and, with ``hidden``, the hidden states of the C positions."""
        rows = self._block_rows()
        if rows and ids.numel() > rows:  # in pieces the quantized kernel runs (see _block_rows)
            outs = [self.extend(ids[i : i + rows], hidden=hidden) for i in range(0, ids.numel(), rows)]
            h = torch.cat([o.hidden_states for o in outs]) if outs[0].hidden_states is not None else None
            return ForwardOutput(outs[-1].logits, h)
        if self.prefix_len == 0:
            return self.prefill(ids, hidden=hidden)
        prefix_len = self.prefix_len
        chain = TokenTree(ids, torch.arange(-1, ids.numel() - 1))
        out = self.forward(chain, hidden=hidden, last_logits_only=True)
        self.commit(prefix_len, torch.arange(ids.numel()))
        return out

    def _block_rows(self) -> int:
        """The most rows a prompt chunk may take when the model's linear layers run a GGUF's quantized blocks
        (0: no limit). Past the kernels' row table a forward would multiply the dequantized fp32 weights with
        ``F.linear``: pages of them that the fast path otherwise never reads (:func:`specdec.models.load_model`
        maps them lazily), and measured slower than 64-row pieces through the quantized kernel (default model,
        AMD EPYC Zen 5: prefill ~900 against ~770 tokens/s)."""
        if self.fast is None or not self.fast.routed:
            return 0
        if self.fast.plan.for_rows(max(ROW_BUCKETS)) != "gguf-avx512" and not (self.lean and self.fast.lean is not None):
            return 0
        return max(ROW_BUCKETS)  # (with ``lean``: the pieces after the first run the lean forward)

    def commit(self, prefix_len: int, path: Tensor) -> None:
        """Keep the KV of tree nodes ``path`` ([A] long, root first, relative to ``prefix_len``) right after the prefix."""
        self.cache.commit(prefix_len, path)

    def rollback(self, length: int) -> None:
        """Forget every cache entry past ``length`` (a pointer move)."""
        self.cache.truncate(length)

    def append_kv(self, keys: list[Tensor], values: list[Tensor]) -> None:
        """Append ready-made entries to every layer of the cache (``keys[l]``/``values[l]`` [1, H, n, D]): a
        drafter that reads the target's own KV at some positions instead of computing it (their rotary
        positions are the ones they were computed at)."""
        for i, (k, v) in enumerate(zip(keys, values)):
            self.cache.update(k, v, i)

    # ------------------------------------------------------------------ helpers
    def _lean(self, tree: TokenTree):
        """The lean forward for this tree when asked for and it applies (a prefilled cache, no auxiliary nodes, a
        size the plan runs on own kernels), else None."""
        if not self.lean or self.fast is None or tree.input_embeds is not None or not self.prefix_len:
            return None
        lean = self.fast.lean
        return lean if lean is not None and lean.serves(len(tree)) else None

    @property
    def _dtype(self) -> torch.dtype:
        return getattr(self.model, "dtype", torch.float32)

    def _kernels(self):
        return self.fast.scope() if self.fast is not None else nullcontext()
