"""What every drafter's training shares: the frozen target's features, the draft vocabulary, Trainer
arguments, checkpoints.

Features: the frozen target runs once over the data (teacher forcing); per
conversation its last hidden states [T, H], its own greedy next tokens (the
labels of self-distillation) and the input ids are cached in
``output_dir/<split>-<key>.pt`` and reused every epoch and by every method
(Medusa, Clover, ...).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from specdec.training.config import TrainConfig
from specdec.training.data import tokenize_conversation

__all__ = ["extract_features", "collate_features", "draft_vocabulary", "training_args", "features_cached", "last_complete_checkpoint"]

log = logging.getLogger(__name__)
FEATURES_VERSION = 2  # 2: items carry their input ids


@torch.inference_mode()
def extract_features(model, tokenizer, conversations, cfg: TrainConfig, desc: str = "features") -> list[dict]:
    """Run the frozen target once: per conversation, [T, H] last hidden states, [T] labels and [T] input ids."""
    from tqdm.auto import tqdm

    items = []
    for conv in tqdm(conversations, desc=desc, unit="conv", disable=not cfg.progress):
        ids = tokenize_conversation(tokenizer, conv, cfg.max_len)
        if ids.numel() < cfg.num_heads + 2:
            continue
        out = model(input_ids=ids[None].to(model.device), output_hidden_states=True)
        if cfg.label_source == "self":
            labels = out.logits[0].argmax(-1).cpu()
        else:
            labels = torch.cat([ids[1:], torch.tensor([-100])])
        items.append({"hidden": out.hidden_states[-1][0].float().cpu(), "labels": labels, "ids": ids.cpu()})
    return items


def collate_features(batch: list[dict], with_ids: bool = False) -> dict:
    """Pad feature items into a batch: hidden [B, T, H], labels [B, T] (-100 past each end), ids [B, T] (0 past each end)."""
    seq = max(b["labels"].numel() for b in batch)
    hidden = torch.zeros(len(batch), seq, batch[0]["hidden"].shape[-1])
    labels = torch.full((len(batch), seq), -100, dtype=torch.long)
    ids = torch.zeros(len(batch), seq, dtype=torch.long)
    for i, b in enumerate(batch):
        t = b["labels"].numel()
        hidden[i, :t], labels[i, :t] = b["hidden"], b["labels"]
        if with_ids:
            ids[i, :t] = b["ids"]
    return {"hidden": hidden, "labels": labels, "ids": ids} if with_ids else {"hidden": hidden, "labels": labels}


def draft_vocabulary(label_sets: list[Tensor], vocab_size: int, size: int | None) -> Tensor:
    """The ``size`` most frequent labels (sorted ids); the full vocabulary when size is None."""
    if size is None or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for labels in label_sets:
        lab = labels[labels >= 0]
        counts += torch.bincount(lab, minlength=vocab_size)
    return torch.sort(torch.topk(counts, size).indices).values


def training_args(cfg: TrainConfig, out: Path):
    from transformers import TrainingArguments

    use_cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=cfg.report_to,
        run_name=cfg.run_name,
        seed=cfg.seed,
        bf16=cfg.bf16,
        activation_checkpointing=cfg.gradient_checkpointing and cfg.method == "medusa2",
        deepspeed=cfg.deepspeed_config(),
        remove_unused_columns=False,
        disable_tqdm=not cfg.progress,
        dataloader_num_workers=0,
        use_cpu=use_cpu,
    )


def features_cached(model, tokenizer, convs, cfg: TrainConfig, path: Path, desc: str) -> list[dict]:
    """The target's features for ``convs``, computed once and cached in ``cfg.features_dir`` (default: ``path``).

    The cache key covers the model, the data (for a file, also its size and modification time), the split and
    the settings that shape the features, so several methods can share one directory of features.
    """
    data = Path(cfg.data)
    stamp = [data.stat().st_size, int(data.stat().st_mtime)] if data.is_file() else []
    key = hashlib.sha1(json.dumps([FEATURES_VERSION, cfg.model, cfg.data, stamp, cfg.num_conversations, cfg.heldout, cfg.max_len,
                                   cfg.label_source, desc, len(convs)]).encode()).hexdigest()[:10]
    where = Path(cfg.features_dir) if cfg.features_dir else path
    where.mkdir(parents=True, exist_ok=True)
    file = where / f"{desc}-{key}.pt"
    if file.is_file():
        return torch.load(file)
    items = extract_features(model, tokenizer, convs, cfg, desc=desc)
    tmp = file.with_suffix(f".{os.getpid()}.tmp")  # every process of a multi-process run writes its own, then renames
    torch.save(items, tmp)
    os.replace(tmp, file)
    return items


def last_complete_checkpoint(out: Path) -> str | None:
    """The newest ``checkpoint-N`` whose trainer_state.json (the Trainer writes it last) exists and parses.

    A run killed while writing a checkpoint leaves that folder incomplete; resuming skips it.
    """
    steps = sorted((int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit())
    for _, path in reversed(steps):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("skipping incomplete checkpoint %s", path)
            continue
        return str(path)
    return None


def start_run(cfg: TrainConfig, load_data: bool = True):
    """What every training run starts with: the output directory (with the settings written down), the seed,
    the target frozen, and (with ``load_data``) the conversations split into held-out and training ones.

    Returns:
        (out, model, tokenizer, heldout_convs, train_convs); the last two are None without ``load_data``
    """
    from specdec.models import load_model
    from specdec.training.data import load_conversations

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(cfg.__dict__, indent=2, default=str))
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if not load_data:
        return out, model, tokenizer, None, None
    convs = load_conversations(cfg.data, limit=cfg.heldout + cfg.num_conversations)
    heldout, train = convs[: cfg.heldout], convs[cfg.heldout :]
    if not train:
        raise ValueError(f"{cfg.data} holds {len(convs)} conversations, all used for held-out evaluation; lower heldout")
    return out, model, tokenizer, heldout, train


def fit(module, dataset, collate, cfg: TrainConfig, out: Path, sampler=None):
    """Train ``module`` with the shared Trainer glue, resuming from the newest complete checkpoint; returns the trainer.
    ``sampler``: the data order (default: the dataset's own; an ``EpochSampler`` draws a new one every epoch)."""
    from specdec.training.trainer import DrafterTrainer

    trainer = DrafterTrainer(model=module, args=training_args(cfg, out), train_dataset=dataset, data_collator=collate, sampler=sampler)
    last = last_complete_checkpoint(out) if cfg.resume else None
    if last:
        log.warning("resuming from %s", last)
    trainer.train(resume_from_checkpoint=last)
    return trainer
