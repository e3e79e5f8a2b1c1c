"""The shared HF Trainer glue: a drafter brings a module whose forward returns its loss and metrics.

``DrafterTrainer`` adds to HF's Trainer:

* per-head accuracy logging: the module's forward returns ``metrics``
  (e.g. ``head0_top1``), averaged over the logging window and logged with the loss
  (so they reach wandb / tensorboard through ``report_to``);
* parameter groups with their own learning rates (``module.param_groups(lr)``),
  e.g. Medusa-2's larger head learning rate;
* a seeded data order that every process computes alike, so one process and
  N processes (torchrun, accelerate, deepspeed) see the same global batches:
  by default the dataset's own order (``PermutedDataset``: permuted once), or
  ``sampler=EpochSampler(...)`` for a new order every epoch (streamed feature
  stores); losses are normalised by the global batch's label count
  (``num_items_in_batch``), so they compute the same gradient.

Checkpoints, resume, DDP/gloo, DeepSpeed ZeRO and wandb are HF Trainer's own.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer

__all__ = ["DrafterTrainer", "PermutedDataset"]


class PermutedDataset(Dataset):
    """A dataset read in a fixed, seeded order."""

    def __init__(self, items: list, seed: int, shuffle: bool = True) -> None:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else range(len(items))
        self.items = [items[i] for i in order]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class DrafterTrainer(Trainer):
    def __init__(self, *args, sampler=None, **kwargs) -> None:
        self._sampler = sampler
        super().__init__(*args, **kwargs)
        self._metric_sums: dict[str, float] = {}
        self._metric_count = 0

    def _get_train_sampler(self, *args, **kwargs):
        # One order for all processes; with N processes accelerate hands process r every r-th batch of it, so
        # a global batch of N x B holds the same examples as one process's batch of N x B.
        return self._sampler if self._sampler is not None else SequentialSampler(self.train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        module = model.module if hasattr(model, "module") else model
        if getattr(module, "accepts_loss_kwargs", False) and num_items_in_batch is not None:
            out = model(**inputs, num_items_in_batch=num_items_in_batch)
            if self.args.average_tokens_across_devices:  # DDP averages gradients over processes: undo it
                out["loss"] = out["loss"] * self.accelerator.num_processes
        else:
            out = model(**inputs)
        for k, v in out.get("metrics", {}).items():
            self._metric_sums[k] = self._metric_sums.get(k, 0.0) + float(v)
        self._metric_count += 1
        return (out["loss"], out) if return_outputs else out["loss"]

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._metric_count and "loss" in logs:
            logs.update({k: round(v / self._metric_count, 4) for k, v in self._metric_sums.items()})
            self._metric_sums, self._metric_count = {}, 0
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        module = self.model.module if hasattr(self.model, "module") else self.model
        if self.optimizer is None and hasattr(module, "param_groups"):
            groups = module.param_groups(self.args.learning_rate)
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate, weight_decay=self.args.weight_decay)
            return self.optimizer
        return super().create_optimizer(*args, **kwargs)
