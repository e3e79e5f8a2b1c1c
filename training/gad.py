"""Fitting GAD's block drafter (method ``gad``) on a frozen target's features.

Each training example is one position t of a conversation (``gad.windows``
drawn per conversation, seeded): the block reads the target's hidden states at
positions t - window + 1 .. t and the root token x_{t+1}, and slot j must
give L[t + j], the target's own greedy token j places after the root (on the
target's own distilled answers that is the token the accepted path would
hold). Loss per slot j, weighted ``loss_decay ** (j - 1)``: cross-entropy on
that token over the draft vocabulary (``loss_type: ce``), or the KL divergence
to the target's distribution there (``loss_type: kl``).

No glancing (GLAT) or block-mask curriculum: with k = 8 slots the block is
short, every slot is already trained in every example (one forward fills all
of them), and glancing would need a second pass per step, doubling a
CPU-bound training run; the closing numbers say whether the plain objective
was enough. The layers start as copies of the target's last layers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from specdec.drafters.gad import GADBlock, GADConfig, decoder_layers
from specdec.training.common import draft_vocabulary, fit, label_counts, run_record, start_run, target_features
from specdec.training.config import TrainConfig
from specdec.training.losses import DepthAccuracy, DraftVocab, Teacher, depth_loss

__all__ = ["GADModule", "train_gad", "gad_heldout_accuracy"]

log = logging.getLogger(__name__)


class _Windows(torch.utils.data.Dataset):
    """(conversation, position) pairs over cached features; items are built on demand (features stay shared)."""

    def __init__(self, feats: list[dict], per_conv: int, block: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.feats, self.pairs = feats, []
        for i, f in enumerate(feats):
            last = f["labels"].numel() - 2  # the root x_{t+1} must exist
            if last < 0:
                continue
            for t in torch.randint(0, last + 1, (per_conv,), generator=g).tolist():
                self.pairs.append((i, t))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return self.pairs[i]


def window_batch(feats: list[dict], pairs: list[tuple[int, int]], window: int, block: int) -> dict:
    """Collate (conversation, t) pairs: context [B, W, H] (left-padded), window [B], root [B], start [B],
    targets [B, k] (-100 past the end), teacher [B, k, H] (the target's hidden state behind each target)."""
    h = feats[pairs[0][0]]["hidden"].shape[-1]
    b = len(pairs)
    context = torch.zeros(b, window, h)
    teacher = torch.zeros(b, block, h)
    targets = torch.full((b, block), -100, dtype=torch.long)
    win, root, start = torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)
    for r, (i, t) in enumerate(pairs):
        f = feats[i]
        lo = max(0, t - window + 1)
        n = t + 1 - lo
        context[r, window - n :] = f["hidden"][lo : t + 1]
        win[r], root[r], start[r] = n, f["ids"][t + 1], t - window + 1
        hi = min(f["labels"].numel(), t + 1 + block)
        targets[r, : hi - t - 1] = f["labels"][t + 1 : hi]
        teacher[r, : hi - t - 1] = f["hidden"][t + 1 : hi]
    return {"context": context, "window": win, "root": root, "start": start, "targets": targets, "teacher": teacher}


class GADModule(nn.Module):
    """The block over windows; ``forward`` gives the loss and per-slot top-1 / top-5 accuracies."""

    def __init__(self, block: GADBlock, vocab_size: int, decay: float, distill: bool) -> None:
        super().__init__()
        self.block, self.decay, self.distill = block, decay, distill
        self.vocab = DraftVocab(vocab_size, block.draft_vocab)

    def forward(self, context, window, root, start, targets, teacher, num_items_in_batch=None) -> dict:
        teacher_hidden = teacher
        logits = self.block(context, window, root, start).float()  # [B, k, V']
        mapped = self.vocab(targets)
        loss, acc = logits.new_zeros(()), DepthAccuracy(logits.shape[1])
        rows = self.block._head.float()
        for j in range(logits.shape[1]):
            ok = targets[:, j] >= 0
            teacher = Teacher.from_logits(teacher_hidden[:, j].float() @ rows.T) if self.distill else None
            loss = loss + self.decay**j * depth_loss(logits[:, j], mapped[:, j], ok, teacher)
            acc.add(j, logits[:, j], mapped[:, j], ok)
        return {"loss": loss, "metrics": acc.metrics()}


@torch.inference_mode()
def gad_heldout_accuracy(module: GADModule, feats: list[dict], per_conv: int = 16, seed: int = 1) -> list[list[float]]:
    """acc[j][r]: share of held-out positions where slot j's r-th choice is the target's own token."""
    cfg = module.block.config
    ds = _Windows(feats, per_conv, cfg.block, seed)
    acc = DepthAccuracy(cfg.block)
    for start in range(0, len(ds), 64):
        batch = window_batch(feats, [ds[i] for i in range(start, min(len(ds), start + 64))], cfg.window, cfg.block)
        logits = module.block(batch["context"], batch["window"], batch["root"], batch["start"])
        t = batch["targets"]
        mapped = module.vocab(t)
        for j in range(cfg.block):
            acc.add(j, logits[:, j], mapped[:, j], t[:, j] >= 0)
    return acc.table()


def train_gad(cfg: TrainConfig) -> Path:
    """Train the GAD block drafter as ``cfg`` says; returns the directory of the final drafter."""
    from specdec.training.features import EpochSampler

    out, model, tokenizer, heldout_convs, train_convs = start_run(cfg)
    held, feats = target_features(model, tokenizer, heldout_convs + train_convs, cfg, min_len=cfg.depth + 2)
    head = model.get_output_embeddings().weight.detach()
    draft_vocab = draft_vocabulary(label_counts(feats.label_sets(), head.shape[0]), cfg.draft_vocab_size)
    layers, rotary = decoder_layers(model, cfg.gad.layers)
    gcfg = GADConfig(hidden_size=head.shape[1], vocab_size=head.shape[0], block=cfg.depth, window=cfg.gad.window,
                     num_layers=cfg.gad.layers, draft_vocab_size=None if cfg.draft_vocab_size is None else draft_vocab.numel(),
                     rms_norm_eps=getattr(model.config, "rms_norm_eps", 1e-5), target_model=str(cfg.model))
    block = GADBlock(gcfg, layers, rotary, model.get_input_embeddings(), head, draft_vocab)
    module = GADModule(block, head.shape[0], cfg.loss_decay, cfg.loss_type == "kl")
    dataset = _Windows(feats, cfg.gad.windows, gcfg.block, cfg.seed).pairs
    trainer = fit(module, dataset, lambda pairs: window_batch(feats, pairs, gcfg.window, gcfg.block), cfg, out,
                  sampler=EpochSampler(len(dataset), cfg.seed, cfg.shuffle))
    final = out / "final"
    if trainer.is_world_process_zero():
        block.eval()
        if len(held):
            gcfg.extra["heldout_accuracy"] = [[round(a, 4) for a in row] for row in gad_heldout_accuracy(module, held)]
        gcfg.extra.update(run_record(cfg, trainer, len(train_convs)))
        block.save_pretrained(final)
    return final
