"""GAD's block drafter: a small non-autoregressive transformer that fills k mask slots in one forward
(Ge et al., 2022, "Lossless Acceleration for Seq2seq Generation with Aggressive Decoding": generalized
aggressive decoding).

Spec ``gad[:PATH][,key=value...]``. Drafting a block costs one small pass
instead of k. The drafter reads what the target already computed: the hidden
states of the last ``window`` committed positions (the prefix, as the target
sees it) and the root token; k learnt mask slots follow. Its layers are
copies of the target's last ``num_layers`` decoder layers (the same
architecture, initialised from the target), so the rows are

    [ W_c h_{t-w+1} .. W_c h_t ,  e(x_{t+1}) ,  m_1 .. m_k ]       positions t-w+1 .. t+1+k

with context rows causal among themselves, the root row seeing them, and the
mask slots seeing everything before them and each other (the block is filled
jointly, not left to right). Slot j is read through a norm and the target's
own output head (restricted to a draft vocabulary) and guesses the token j
places after the root. The block goes out as a chain scored by the slots'
probabilities (with learnt corrections per slot and confidence), so the
engine trims it to what pays.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from specdec.drafters.base import (DraftState, Drafter, StepResult, Target, config_from_options, drafter_path,
                                   read_drafter_config_versioned, read_drafter_weights, register_drafter, write_drafter)
from specdec.drafters.trie import depth_bucket, freq_bucket, frequency_prior
from specdec.sizing import AcceptanceRates, learn
from specdec.tree import TokenTree

__all__ = ["GADConfig", "GADBlock", "GADDrafter", "block_mask"]

FORMAT_VERSION = 1


@dataclass
class GADConfig:
    hidden_size: int
    vocab_size: int
    block: int = 8  # k mask slots
    window: int = 16  # committed positions whose target hidden states the block reads
    num_layers: int = 2  # copies of the target's last layers
    draft_vocab_size: int | None = None
    rms_norm_eps: float = 1e-5
    target_model: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block < 1 or self.window < 1 or self.num_layers < 1:
            raise ValueError("block, window and num_layers must be >= 1")


def block_mask(window: Tensor, n_ctx: int, k: int, dtype: torch.dtype) -> Tensor:
    """[B, 1, L, L] additive mask for rows [n_ctx context rows, root, k slots], L = n_ctx + 1 + k.

    Args:
        window: [B] how many of the context rows are real (left-padded: the first n_ctx - window are padding).
    """
    b = window.shape[0]
    n = n_ctx + 1 + k
    idx = torch.arange(n)
    visible = idx[None, :] <= idx[:, None]  # causal
    visible[n_ctx + 1 :, n_ctx + 1 :] = True  # the slots see each other
    visible = visible[None].expand(b, n, n).clone()
    pad = torch.arange(n_ctx)[None, :] < (n_ctx - window)[:, None]  # padded context rows: hidden as keys
    visible[:, :, :n_ctx] &= ~pad[:, None, :]
    visible |= torch.eye(n, dtype=torch.bool)[None]
    mask = torch.zeros(b, 1, n, n, dtype=dtype)
    return mask.masked_fill_(~visible[:, None], torch.finfo(dtype).min)


class GADBlock(nn.Module):
    """The block drafter's parameters and forward (see the module docstring)."""

    def __init__(self, config: GADConfig, layers: list[nn.Module] | None = None, rotary: nn.Module | None = None,
                 embed: nn.Module | None = None, lm_head_weight: Tensor | None = None, draft_vocab: Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.context = nn.Linear(h, h)  # W_c
        nn.init.eye_(self.context.weight)
        nn.init.zeros_(self.context.bias)
        self.slots = nn.Parameter(torch.randn(config.block, h) * 0.02)
        if layers is None or len(layers) != config.num_layers:
            raise ValueError(f"the GAD block needs {config.num_layers} of the target's decoder layers to build from")
        self.layers = nn.ModuleList(copy.deepcopy(layer) for layer in layers)
        for i, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = i
            for p in layer.parameters():
                p.requires_grad_(True)
        self.norm = nn.RMSNorm(h, eps=config.rms_norm_eps)
        v_out = config.draft_vocab_size or config.vocab_size
        self.register_buffer("draft_vocab", (draft_vocab if draft_vocab is not None else torch.arange(v_out)).to(torch.long).clone())
        self._frozen = (embed, rotary)
        self._head = None
        if lm_head_weight is not None:
            self.attach(embed, lm_head_weight, rotary)

    def attach(self, embed, lm_head_weight: Tensor, rotary) -> None:
        if lm_head_weight.shape != (self.config.vocab_size, self.config.hidden_size):
            raise ValueError(f"the GAD block expects an lm_head of shape ({self.config.vocab_size}, {self.config.hidden_size}), "
                             f"got {tuple(lm_head_weight.shape)}")
        self._frozen = (embed, rotary)
        self._head = lm_head_weight.detach()[self.draft_vocab.to(lm_head_weight.device)]

    def forward(self, context: Tensor, window: Tensor, root: Tensor, start: Tensor) -> Tensor:
        """Slot logits over the draft vocabulary.

        Args:
            context: [B, W, H] target hidden states of the last committed positions, left-padded.
            window: [B] how many of them are real.
            root: [B] the root token ids.
            start: [B] the position of the first context row (real or padded).

        Returns:
            [B, k, V'] logits of the k slots.
        """
        embed, rotary = self._frozen
        b, w, _ = context.shape
        k = self.config.block
        dtype = self.context.weight.dtype
        with torch.no_grad():
            e_root = embed(root).to(dtype)
        x = torch.cat([self.context(context.to(dtype)), e_root[:, None], self.slots.to(dtype)[None].expand(b, -1, -1)], dim=1)
        pos = start[:, None] + torch.arange(w + 1 + k, device=x.device)[None]
        mask = block_mask(window.cpu(), w, k, dtype).to(x.device)
        cos_sin = rotary(x, pos)
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
            if isinstance(x, tuple):
                x = x[0]
        return self.norm(x[:, w + 1 :]) @ self._head.to(dtype).T

    def save_pretrained(self, path: str | Path) -> None:
        write_drafter(path, self.config, self)


def decoder_layers(model, n: int) -> tuple[list[nn.Module], nn.Module]:
    """The target's last ``n`` decoder layers and its rotary embedding."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(decoder, "layers", None)
    if layers is None or not hasattr(decoder, "rotary_emb") or len(layers) < n:
        raise ValueError(f"the GAD block needs a decoder with at least {n} layers and a rotary embedding; {type(model).__name__} has none")
    return list(layers[-n:]), decoder.rotary_emb


@dataclass
class GADDrafterConfig:
    """Spec options: ``gad:PATH,block=6``."""

    block: int = 0  # slots drafted (<= the trained block); 0: all
    decay: float = 0.9

    def __post_init__(self) -> None:
        if self.block < 0 or not 0.0 <= self.decay < 1.0:
            raise ValueError("gad options need block >= 0 and decay in [0, 1)")


@register_drafter("gad")
class GADDrafter(Drafter):
    """Drafts a block of tokens from k mask slots filled in one small forward."""

    name = "gad"
    needs_hidden_states = True

    def __init__(self, config: GADConfig, state: dict, options: GADDrafterConfig | None = None, source: str = "") -> None:
        self.gad_config, self._state, self.source = config, state, source
        self.options = options or GADDrafterConfig()
        self.vocab_size = config.vocab_size
        self.block: GADBlock | None = None
        self.rates = AcceptanceRates(frequency_prior, self.options.decay)

    @classmethod
    def from_spec(cls, args: list[str], kwargs: dict[str, str]) -> "GADDrafter":
        path = drafter_path(args, "gad-smollm2-135m", cls.name, kwargs)
        opts = config_from_options(GADDrafterConfig, kwargs, cls.name)
        raw = read_drafter_config_versioned(path, FORMAT_VERSION, "GAD")
        config = GADConfig(**{k: v for k, v in raw.items() if k in GADConfig.__dataclass_fields__})
        return cls(config, read_drafter_weights(path / "model.safetensors"), opts, str(path))

    @classmethod
    def from_block(cls, block: GADBlock, options: GADDrafterConfig | None = None) -> "GADDrafter":
        return cls(block.config, {k: v.detach().clone() for k, v in block.state_dict().items()}, options)

    def bind(self, target: Target) -> None:
        super().bind(target)
        if target.hidden_size != self.gad_config.hidden_size:
            raise ValueError(f"the GAD block was trained for hidden size {self.gad_config.hidden_size}, the target has "
                             f"{target.hidden_size}; use one trained for this model")
        layers, rotary = decoder_layers(target.model, self.gad_config.num_layers)
        if self.block is None:
            block = GADBlock(self.gad_config, layers, rotary, draft_vocab=self._state.get("draft_vocab"))
            try:
                block.load_state_dict(self._state)
            except RuntimeError as err:
                raise ValueError(f"{self.source or 'the GAD checkpoint'} does not fit this target: {str(err).splitlines()[0]}") from None
            self.block = block.eval()
        self.block.to(device=target.device, dtype=target.dtype)
        self.block.attach(target.input_embeddings, target.output_weight, rotary)

    def reset(self, prompt_ids: Tensor) -> None:
        self._context: Tensor | None = None  # [<= W, H] the last committed positions' hidden states
        self._keys: dict = {}
        self.rates = AcceptanceRates(frequency_prior, self.options.decay)

    @torch.inference_mode()
    def propose(self, state: DraftState) -> TokenTree:
        w = self.gad_config.window
        h = state.hidden_states if self._context is None else torch.cat([self._context, state.hidden_states])
        self._context = h[-w:]
        ctx = self._context
        n = ctx.shape[0]
        start = state.hidden_start + state.hidden_states.shape[0] - n  # the position of the first context row
        logits = self.block(ctx[None], torch.tensor([n]), torch.tensor([state.root], device=ctx.device),
                            torch.tensor([start], device=ctx.device))[0]
        k = self.options.block or self.gad_config.block
        probs = torch.softmax(logits[:k].float(), -1)
        p, idx = probs.max(-1)
        tokens = self.block.draft_vocab[idx].cpu().tolist()
        scores, s, keys = [1.0], 1.0, {}
        for d, (tok, pd) in enumerate(zip(tokens, p.cpu().tolist()), start=1):
            key = (depth_bucket(d), freq_bucket(pd))
            s *= self.rates[key]
            scores.append(s)
            keys[tuple(tokens[:d])] = key
        self._keys = keys
        return TokenTree(torch.tensor([state.root] + tokens), torch.arange(-1, k), scores=torch.tensor(scores))

    def observe(self, result: StepResult) -> None:
        if self._keys:
            learn(self.rates, self._keys, result.tree, result.path)
