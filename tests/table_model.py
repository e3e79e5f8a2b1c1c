"""A stand-in target whose logits are a pure function of the visible context.

It runs through the real engine: each forward writes its token ids into the
real ``TreeKVCache`` (as 1-dim "keys"), so the engine's commit and rollback
decide what later forwards see. Each node's context is read off the attention
mask (prefix + ancestors + itself), and its logits come from ``logits_fn``
(memoised), e.g. a tiny real model run causally on that context. This makes a
sampled generation ~1 ms, so statistical tests can afford tens of thousands.
"""

from functools import lru_cache
from types import SimpleNamespace

import torch


class TableModel:
    """With ``hidden_size`` it also has input embeddings and returns hidden states (a fixed function of each
    node's visible context), so drafters that read hidden states or feed embeddings (Clover, PPD) can run on it;
    a fed embedding that is no token's reads as token 0 in the context (it is only ever an auxiliary node)."""

    def __init__(self, logits_fn, vocab_size: int, context: int = 512, hidden_size: int = 0):
        self.logits_fn = lru_cache(maxsize=None)(logits_fn)
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=context, hidden_size=hidden_size or None)
        self.generation_config = SimpleNamespace(eos_token_id=None)
        self.device, self.dtype = torch.device("cpu"), torch.float64
        g = torch.Generator().manual_seed(123)
        width = hidden_size or 1
        self._embed = SimpleNamespace(weight=torch.randn(vocab_size, width, generator=g, dtype=torch.float64))
        self._input = torch.nn.Embedding(vocab_size, width).to(torch.float64) if hidden_size else None
        if self._input is not None:
            self._input.weight.data = torch.randn(vocab_size, width, generator=g, dtype=torch.float64)

    def get_output_embeddings(self):
        return self._embed

    def get_input_embeddings(self):
        return self._input

    def _hidden(self, context: tuple) -> torch.Tensor:
        w = self._input.weight
        return w[context[-1]] + (0.5 * w[context[-2]] if len(context) > 1 else 0.0)

    def __call__(self, input_ids=None, cache=None, attention_mask=None, output_hidden_states=False, inputs_embeds=None, **kwargs):
        if input_ids is None:  # embeddings fed: a token's own embedding reads as that token, any other as 0
            rows = inputs_embeds[0]
            match = (rows[:, None, :] == self._input.weight[None]).all(-1)
            input_ids = torch.where(match.any(-1), match.to(torch.int8).argmax(-1), 0)[None]
        tokens = input_ids[0]
        n = tokens.numel()
        keys, _ = cache.update(tokens.to(torch.float64).view(1, 1, n, 1), tokens.to(torch.float64).view(1, 1, n, 1), 0)
        seen = keys[0, 0, :, 0].long()  # [P + N]
        total = seen.numel()
        if attention_mask is None:  # causal
            visible = torch.arange(total)[None, :] <= torch.arange(total - n, total)[:, None]
        else:
            visible = attention_mask[0, 0] == 0
        contexts = [tuple(seen[visible[i]].tolist()) for i in range(n)]
        rows = [self.logits_fn(c) for c in contexts]
        hidden = None
        if output_hidden_states and self._input is not None:
            hidden = (torch.stack([self._hidden(c) for c in contexts])[None],)
        return SimpleNamespace(logits=torch.stack(rows)[None], hidden_states=hidden)


def model_logits_fn(model):
    """logits_fn backed by a real (tiny) causal LM: the last-position logits of a causal run."""

    def fn(context: tuple) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor([context])).logits[0, -1].to(torch.float64)

    return fn
