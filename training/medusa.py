"""Fitting Medusa heads: Medusa-1 (frozen target) and Medusa-2 (joint, with a LoRA on the target).

Head k (0-based) at position t is trained on the label at position t + k + 1:
with self-distillation labels (the target's own greedy next token at each
position, teacher-forced), that is the target's guess of the token k + 1
places past the one it predicts itself, exactly what the drafter asks of
head k at inference. Loss: Σ_k λ^k · CE_k. Labels outside the draft
vocabulary are ignored by the loss and count as misses in the accuracies.

Medusa-1 runs the frozen target once over the data and reuses its hidden
states across epochs (cached in ``output_dir/features.pt``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.drafters.medusa import MedusaConfig, MedusaHeads, tree_from_accuracies
from specdec.training.common import collate_features, draft_vocabulary, fit, label_counts, run_record, start_run, target_features
from specdec.training.config import TrainConfig
from specdec.training.data import tokenize_conversation
from specdec.training.losses import DepthAccuracy, DraftVocab, Teacher, depth_loss

__all__ = ["MedusaLoss", "Medusa1Module", "Medusa2Module", "train_medusa", "heldout_accuracy"]

log = logging.getLogger(__name__)


class MedusaLoss(nn.Module):
    """Weighted per-head loss (:func:`~specdec.training.losses.depth_loss`) and per-head top-1 / top-5 accuracies."""

    def __init__(self, vocab_size: int, draft_vocab: Tensor, decay: float) -> None:
        super().__init__()
        self.vocab = DraftVocab(vocab_size, draft_vocab)
        self.decay = decay

    def targets(self, labels: Tensor, shift: int) -> tuple[Tensor, Tensor]:
        """Labels ``shift`` places ahead: ([B, T - shift] bool real label, [B, T - shift] draft index or -100)."""
        target = labels[:, shift:]
        return target >= 0, self.vocab(target)

    def forward(self, logits: Tensor, labels: Tensor, num_items: Tensor | int | None = None,
                target_logits: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """
        Args:
            logits: [K, B, T, V'] head logits.
            labels: [B, T] next-token labels per position (-100: padding).
            num_items: if given, each head's loss is rescaled to a sum divided by this count (the Trainer's
                label count over the whole global batch, so that one process and N processes compute the
                same loss); otherwise each head's loss is a mean over its valid positions.
            target_logits: [B, T, V'] the target's own logits over the draft vocabulary; when given,
                head k's loss is KL(target distribution at position t + k + 1 || head k at t)
                instead of cross-entropy on the labels.
        """
        num_heads, _, seq, _ = logits.shape
        loss = logits.new_zeros(())
        acc = DepthAccuracy(num_heads)
        for k in range(num_heads):
            shift = k + 1
            if seq <= shift:
                break
            valid, mapped = self.targets(labels, shift)  # [B, T - k - 1] each
            lg = logits[k, :, : seq - shift]
            teacher = None if target_logits is None else Teacher.from_logits(target_logits[:, shift:])
            per = depth_loss(lg, mapped, valid, teacher)
            if num_items is not None:
                per = per * valid.sum().clamp(min=1) / num_items
            loss = loss + self.decay**k * per
            acc.add(k, lg, mapped, valid)
        return loss, acc.metrics()


class Medusa1Module(nn.Module):
    """Trainable heads over cached hidden states of a frozen target."""

    accepts_loss_kwargs = True  # the Trainer passes num_items_in_batch

    def __init__(self, heads: MedusaHeads, loss: MedusaLoss, target_rows: Tensor | None = None) -> None:
        super().__init__()
        self.heads, self.loss_fn = heads, loss
        # [V', H] the target's lm_head rows of the draft vocabulary: with them the loss is KL to the target
        self.register_buffer("target_rows", target_rows, persistent=False)

    def forward(self, hidden: Tensor, labels: Tensor, num_items_in_batch=None) -> dict:
        target = None
        if self.target_rows is not None:
            with torch.no_grad():
                target = hidden @ self.target_rows.T.to(hidden.dtype)
        loss, metrics = self.loss_fn(self.heads(hidden), labels, num_items_in_batch, target)
        return {"loss": loss, "metrics": metrics}


class Medusa2Module(nn.Module):
    """Joint training: a peft LoRA target (self-distillation KL to its adapter-free self) plus the heads."""

    def __init__(self, peft_model, heads: MedusaHeads, loss: MedusaLoss, config: TrainConfig) -> None:
        super().__init__()
        self.target, self.heads, self.loss_fn, self.cfg = peft_model, heads, loss, config
        self.register_buffer("steps", torch.zeros((), dtype=torch.long), persistent=False)

    def head_weight(self) -> float:
        """Head-loss warm-up: 0 → 1 linearly over ``head_warmup_steps`` forward passes."""
        w = self.cfg.medusa.head_warmup_steps
        return 1.0 if w <= 0 else min(1.0, float(self.steps) / w)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> dict:
        with torch.no_grad(), self.target.disable_adapter():
            ref = self.target(input_ids=input_ids, attention_mask=attention_mask).logits
        out = self.target(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        mask = attention_mask.bool()
        kl = F.kl_div(F.log_softmax(out.logits.float(), -1), F.log_softmax(ref.float(), -1), log_target=True, reduction="none").sum(-1)
        target_loss = (kl * mask).sum() / mask.sum().clamp(min=1)
        if self.cfg.label_source == "self":
            labels = torch.where(mask, ref.argmax(-1), torch.full_like(labels, -100))
        head_loss, metrics = self.loss_fn(self.heads(out.hidden_states[-1]), labels)
        if self.training:
            self.steps += 1
        loss = self.cfg.medusa.target_loss_weight * target_loss + self.head_weight() * head_loss
        metrics.update(target_kl=target_loss.detach(), head_loss=head_loss.detach())
        return {"loss": loss, "metrics": metrics}

    def param_groups(self, lr: float) -> list[dict]:
        lora = [p for p in self.target.parameters() if p.requires_grad]
        return [{"params": lora, "lr": lr}, {"params": list(self.heads.parameters()), "lr": lr * self.cfg.medusa.head_lr_multiplier}]


# ---------------------------------------------------------------------- data
def _collate_tokens(pad_id: int):
    def collate(batch: list[dict]) -> dict:
        seq = max(b["input_ids"].numel() for b in batch)
        ids = torch.full((len(batch), seq), pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), seq, dtype=torch.long)
        labels = torch.full((len(batch), seq), -100, dtype=torch.long)
        for i, b in enumerate(batch):
            t = b["input_ids"].numel()
            ids[i, :t], mask[i, :t] = b["input_ids"], 1
            labels[i, : t - 1] = b["input_ids"][1:]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


@torch.inference_mode()
def heldout_accuracy(heads: MedusaHeads, loss: MedusaLoss, items: list[dict]) -> list[list[float]]:
    """acc[k][i]: share of held-out positions where head k's i-th choice is the label (OOV = miss)."""
    acc = DepthAccuracy(heads.config.num_heads)
    for item in items:
        logits = heads(item["hidden"][None])  # [K, 1, T, V']
        labels = item["labels"][None]
        for k in range(heads.config.num_heads):
            if labels.shape[1] > k + 1:
                valid, mapped = loss.targets(labels, k + 1)
                acc.add(k, logits[k, :, : mapped.shape[1]], mapped, valid)
    return acc.table()


# ---------------------------------------------------------------------- the run
def train_medusa(cfg: TrainConfig) -> Path:
    """Train Medusa heads as ``cfg`` says; returns the directory of the final drafter."""
    from specdec.training.features import EpochSampler

    out, model, tokenizer, heldout_convs, train_convs = start_run(cfg)
    lm_head = model.get_output_embeddings().weight.detach()
    vocab = lm_head.shape[0]
    min_len = cfg.depth + 2
    held_feats, train_feats = target_features(model, tokenizer, heldout_convs + train_convs, cfg, min_len=min_len)
    if cfg.method == "medusa1":  # the frozen target's features, extracted once and streamed every epoch
        label_sets = train_feats.label_sets()
    else:  # the target changes while training: count the data's own tokens for the draft vocabulary
        seqs = [tokenize_conversation(tokenizer, c, cfg.max_len) for c in train_convs]
        label_sets = seqs
    draft_vocab = draft_vocabulary(label_counts(label_sets, vocab), cfg.draft_vocab_size)
    mcfg = MedusaConfig(hidden_size=lm_head.shape[1], vocab_size=vocab, num_heads=cfg.depth, num_layers=cfg.medusa.layers,
                        own_projection=cfg.medusa.own_projection, draft_vocab_size=None if cfg.draft_vocab_size is None else draft_vocab.numel(),
                        target_model=str(cfg.model), medusa_version=1 if cfg.method == "medusa1" else 2)
    heads = MedusaHeads(mcfg, lm_head_weight=lm_head, draft_vocab=draft_vocab)
    loss = MedusaLoss(vocab, draft_vocab, cfg.loss_decay)

    if cfg.method == "medusa1":
        module = Medusa1Module(heads, loss, lm_head[draft_vocab].float().clone() if cfg.loss_type == "kl" else None)
        dataset = train_feats
        collate = collate_features
    else:
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=cfg.medusa.lora_r, lora_alpha=cfg.medusa.lora_alpha, target_modules=cfg.medusa.lora_targets, lora_dropout=0.0))
        if cfg.gradient_checkpointing:
            peft_model.enable_input_require_grads()
        module = Medusa2Module(peft_model, heads, loss, cfg)
        dataset = [{"input_ids": s} for s in seqs if s.numel() > cfg.depth + 1]
        collate = _collate_tokens(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)

    sampler = dataset.sampler(cfg) if cfg.method == "medusa1" else EpochSampler(len(dataset), cfg.seed, cfg.shuffle)
    trainer = fit(module, dataset, collate, cfg, out, sampler=sampler)

    final = out / "final"
    if trainer.is_world_process_zero():
        heads.eval()
        if held_feats:
            acc = heldout_accuracy(heads, loss, held_feats)
            heads.config.extra["heldout_accuracy"] = [[round(a, 4) for a in row] for row in acc]
            heads.config.tree = [list(p) for p in tree_from_accuracies(acc, cfg.medusa.tree_size)]
        heads.config.extra.update(run_record(cfg, trainer, len(dataset)))
        heads.save_pretrained(final)
        if cfg.method == "medusa2":
            merged = module.target.merge_and_unload()
            merged.save_pretrained(final / "target")
            tokenizer.save_pretrained(final / "target")
    return final
