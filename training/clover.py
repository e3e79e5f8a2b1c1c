"""Fitting Clover heads (method ``clover``) and Clover-2 heads (method ``clover2``) on a frozen target.

Data: the frozen target's features (:mod:`specdec.training.common`): per
conversation the last hidden states h, the input ids x and the target's own
greedy next tokens L (self-distillation labels: L[t] is what the target
predicts after x[..t]). At position t the Augmenting Block reads the pair
(h_t, x_{t+1}); head depth d (0-based) is fed the tokens x_{t+2} .. x_{t+1+d}
through the Regressive Connection (teacher forcing) and is trained to give
L[t+1+d], the target's own next token at that point (on the target's own
distilled answers x_{s+1} = L[s], so teacher forcing walks an accepted path).

Losses, per depth d with weight ``loss_decay ** d``:

* ``clover``: cross-entropy on L[t+1+d] over the draft vocabulary (labels
  outside it are ignored and count as misses);
* ``clover2`` (Clover-2): the KL divergence to the target's own distribution at
  that position (knowledge distillation), plus ``regression_weight`` ×
  SmoothL1 between the head's state o_d and the target's hidden state
  h_{t+1+d}, the feature the target itself predicts that token from.

The Augmenting Block starts as a copy of the target's last decoder layer.
Checkpoints, resume, wandb, DeepSpeed and multi-process runs come with the
shared Trainer glue (:mod:`specdec.training.trainer`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.drafters.clover import CloverConfig, CloverHeads, decoder_parts
from specdec.training.common import collate_features, draft_vocabulary, fit, label_counts, run_record, start_run, target_features
from specdec.training.config import TrainConfig
from specdec.training.losses import DepthAccuracy, DraftVocab, Teacher, depth_loss

__all__ = ["CloverModule", "train_clover", "clover_heldout_accuracy"]

log = logging.getLogger(__name__)


def _padding_causal_mask(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, 1, T, T] additive: causal, and padded keys hidden (a padded query row keeps its own key, so no row is empty)."""
    t = valid.shape[1]
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=valid.device))
    visible = causal[None] & valid[:, None, :]
    visible |= torch.eye(t, dtype=torch.bool, device=valid.device)[None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


class CloverModule(nn.Module):
    """Clover heads over cached features; ``forward`` returns the loss and per-depth top-1 / top-5 accuracies."""

    accepts_loss_kwargs = True

    def __init__(self, heads: CloverHeads, vocab_size: int, decay: float, distill: bool, regression_weight: float) -> None:
        super().__init__()
        self.heads, self.decay, self.distill, self.regression_weight = heads, decay, distill, regression_weight
        self.vocab = DraftVocab(vocab_size, heads.draft_vocab)

    def depth_outputs(self, hidden: Tensor, ids: Tensor, valid: Tensor):
        """Yield (d, o_d [B, T - 1 - d, H]) for every trained depth (teacher forcing)."""
        h = self.heads
        pos = torch.arange(hidden.shape[1] - 1, device=hidden.device)[None].expand(hidden.shape[0], -1)
        z = h.encode(hidden[:, :-1], ids[:, 1:], pos, mask=_padding_causal_mask(valid[:, :-1], h.first.weight.dtype))
        yield 0, h.head_first(z)
        s = z
        for d in range(1, h.config.num_heads):
            if s.shape[1] <= 1:
                break
            s, o = h.head_next(s[:, :-1], ids[:, 1 + d :])
            yield d, o

    def forward(self, hidden: Tensor, labels: Tensor, ids: Tensor, num_items_in_batch=None) -> dict:
        """hidden [B, T, H], labels [B, T] (-100 past each end), ids [B, T]."""
        valid = labels >= 0
        loss = hidden.new_zeros(())
        acc = DepthAccuracy(self.heads.config.num_heads)
        rows = self.heads._head.float()
        for d, o in self.depth_outputs(hidden, ids, valid):
            ok = labels[:, 1 + d :] >= 0  # L[t + 1 + d]
            mapped = self.vocab(labels[:, 1 + d :])
            logits = self.heads.logits(o).float()
            teacher = Teacher.from_logits(hidden[:, 1 + d :].float() @ rows.T) if self.distill else None
            per = depth_loss(logits, mapped, ok, teacher)
            if self.regression_weight:
                reg = F.smooth_l1_loss(o.float(), hidden[:, 1 + d :].float(), reduction="none").mean(-1)
                per = per + self.regression_weight * (reg * ok).sum() / ok.sum().clamp(min=1)
            loss = loss + self.decay**d * per
            acc.add(d, logits, mapped, ok)
        return {"loss": loss, "metrics": acc.metrics()}


@torch.inference_mode()
def clover_heldout_accuracy(module: CloverModule, items: list[dict]) -> list[list[float]]:
    """acc[d][i]: share of held-out positions where depth d's i-th choice is the target's token (teacher forcing)."""
    acc = DepthAccuracy(module.heads.config.num_heads)
    for item in items:
        batch = collate_features([item], with_ids=True)
        valid = batch["labels"] >= 0
        for d, o in module.depth_outputs(batch["hidden"], batch["ids"], valid):
            target = batch["labels"][:, 1 + d :]
            acc.add(d, module.heads.logits(o), module.vocab(target), target >= 0)
    return acc.table()


def train_clover(cfg: TrainConfig) -> Path:
    """Train Clover (or Clover-2) heads as ``cfg`` says; returns the directory of the final drafter."""

    out, model, tokenizer, heldout_convs, train_convs = start_run(cfg)
    held, train_feats = target_features(model, tokenizer, heldout_convs + train_convs, cfg, min_len=3)
    lm_head = model.get_output_embeddings().weight.detach()
    vocab = lm_head.shape[0]
    counts = label_counts(train_feats.label_sets(), vocab)
    draft_vocab = draft_vocabulary(counts, cfg.draft_vocab_size)
    layer, rotary = decoder_parts(model)
    ccfg = CloverConfig(
        hidden_size=lm_head.shape[1], vocab_size=vocab, num_heads=cfg.depth,
        attention_heads=getattr(model.config, "num_attention_heads", 1), augment=cfg.clover.augment,
        draft_vocab_size=None if cfg.draft_vocab_size is None else draft_vocab.numel(),
        version=2 if cfg.method == "clover2" else 1, rms_norm_eps=getattr(model.config, "rms_norm_eps", 1e-5),
        target_model=str(cfg.model),
    )
    heads = CloverHeads(ccfg, layer if cfg.clover.augment else None, rotary, model.get_input_embeddings(), lm_head, draft_vocab,
                        draft_counts=counts[draft_vocab])
    distill = cfg.method == "clover2" or cfg.loss_type == "kl"
    module = CloverModule(heads, vocab, cfg.loss_decay, distill, cfg.clover.regression_weight if cfg.method == "clover2" else 0.0)
    trainer = fit(module, train_feats, lambda batch: collate_features(batch, with_ids=True), cfg, out,
                  sampler=train_feats.sampler(cfg))

    final = out / "final"
    if trainer.is_world_process_zero():
        heads.eval()
        if len(held):
            acc = clover_heldout_accuracy(module, held)
            heads.config.extra["heldout_accuracy"] = [[round(a, 4) for a in row] for row in acc]
        heads.config.extra.update(run_record(cfg, trainer, len(train_feats)))
        heads.save_pretrained(final)
    return final
