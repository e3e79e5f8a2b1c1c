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
    def __init__(self, logits_fn, vocab_size: int, context: int = 512):
        self.logits_fn = lru_cache(maxsize=None)(logits_fn)
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=context)
        self.generation_config = SimpleNamespace(eos_token_id=None)
        self.device, self.dtype = torch.device("cpu"), torch.float64
        self._embed = SimpleNamespace(weight=torch.empty(vocab_size, 1))

    def get_output_embeddings(self):
        return self._embed

    def __call__(self, input_ids, cache, attention_mask=None, output_hidden_states=False, **kwargs):
        tokens = input_ids[0]
        n = tokens.numel()
        keys, _ = cache.update(tokens.to(torch.float64).view(1, 1, n, 1), tokens.to(torch.float64).view(1, 1, n, 1), 0)
        seen = keys[0, 0, :, 0].long()  # [P + N]
        total = seen.numel()
        if attention_mask is None:  # causal
            visible = torch.arange(total)[None, :] <= torch.arange(total - n, total)[:, None]
        else:
            visible = attention_mask[0, 0] == 0
        rows = [self.logits_fn(tuple(seen[visible[i]].tolist())) for i in range(n)]
        return SimpleNamespace(logits=torch.stack(rows)[None], hidden_states=None)


def model_logits_fn(model):
    """logits_fn backed by a real (tiny) causal LM: the last-position logits of a causal run."""

    def fn(context: tuple) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor([context])).logits[0, -1].to(torch.float64)

    return fn
