"""What every drafter's training shares: the frozen target's features, the draft vocabulary, Trainer
arguments, checkpoints.

Features: the frozen target runs once over the data (teacher forcing) into a
sharded, memory-mapped store (:mod:`specdec.training.features`): per position
the hidden states of the layers the methods read, its own greedy next token
(the label of self-distillation) and the input id. Every method streams its
items from the store (:func:`target_features`), in a new order every epoch.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from torch import Tensor
from transformers import TrainerCallback

from specdec.training.config import TrainConfig

__all__ = ["collate_features", "label_counts", "draft_vocabulary", "training_args", "target_features", "FeatureItems", "last_complete_checkpoint",
           "run_record", "TimeBudget", "MemoryWatch", "StepClock", "TokenItems", "token_items", "collate_tokens", "training_device"]

log = logging.getLogger(__name__)
_STARTED: dict[str, float] = {}  # output dir -> when its run started (start_run)


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


def label_counts(label_sets: list[Tensor], vocab_size: int) -> Tensor:
    """[V] how often each token is a label (ignored positions, -100, not counted)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for labels in label_sets:
        lab = labels[labels >= 0]
        counts += torch.bincount(lab, minlength=vocab_size)
    return counts


def draft_vocabulary(counts: Tensor, size: int | None) -> Tensor:
    """The ``size`` most frequent labels by ``counts`` (:func:`label_counts`; sorted ids); the full vocabulary
    when size is None."""
    if size is None or size >= counts.numel():
        return torch.arange(counts.numel())
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
        **_checkpointing_argument(TrainingArguments, cfg.gradient_checkpointing and cfg.method == "medusa2"),
        deepspeed=cfg.deepspeed_config(),
        remove_unused_columns=False,
        disable_tqdm=not cfg.progress,
        dataloader_num_workers=0,
        use_cpu=use_cpu,
    )


def _checkpointing_argument(arguments_class, on: bool) -> dict:
    """Activation checkpointing under the name this transformers spells it (``activation_checkpointing`` in
    recent releases, ``gradient_checkpointing`` before: 5.17 knows only the latter)."""
    fields = getattr(arguments_class, "__dataclass_fields__", {})
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": on}


class FeatureItems:
    """Conversations of a feature store as training items, read lazily: item i is ``{"hidden": [T, H] (one
    layer) or [T, L, H] (several), "labels": [T], "ids": [T], "answer": [T]}``, cut at ``max_len``."""

    def __init__(self, store, indices: list[int], layers: list[int], max_len: int, label_source: str = "self") -> None:
        self.store, self.indices, self.layers, self.max_len, self.label_source = store, indices, layers, max_len, label_source

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        item = self.store.item(self.indices[i], self.layers)
        item = {k: v[: self.max_len] for k, v in item.items()}
        if len(self.layers) == 1:
            item["hidden"] = item["hidden"][:, 0]
        if self.label_source == "data":
            item["labels"] = torch.cat([item["ids"][1:], torch.tensor([-100])])
        return item

    def lengths(self) -> list[int]:
        """Every item's token count (as cut at ``max_len``)."""
        return [min(self.store.item_len(j), self.max_len) for j in self.indices]

    def sampler(self, cfg: TrainConfig):
        """A new order every epoch, global batches of similar lengths (little padding)."""
        return _epoch_sampler(self.lengths(), cfg)

    def label_sets(self) -> list[Tensor]:
        """Every item's labels (read without the hidden states), for the draft vocabulary."""
        if self.label_source == "data":
            return [self[i]["labels"] for i in range(len(self))]
        return [torch.from_numpy(self.store.item_labels(j)[: self.max_len]) for j in self.indices]


def _epoch_sampler(lengths: list[int], cfg: TrainConfig):
    """A new order every epoch, global batches of similar lengths (little padding). Grouped by the global
    batch (per-process batch x processes), so N processes split exactly the batches one process would see."""
    from specdec.training.features import EpochSampler

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return EpochSampler(len(lengths), cfg.seed, cfg.shuffle, lengths, cfg.batch_size * world)


class TokenItems:
    """Conversations as token items, for training that runs the frozen target inside every step
    (``features: online``) instead of reading a feature store: item i is ``{"ids": [T], "answer": [T] bool}``,
    cut at ``max_len``."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def lengths(self) -> list[int]:
        return [it["ids"].numel() for it in self.items]

    def sampler(self, cfg: TrainConfig):
        return _epoch_sampler(self.lengths(), cfg)

    def label_sets(self) -> list[Tensor]:
        """Every item's next tokens in the data, for the draft vocabulary (on distilled data these are the
        target's own greedy tokens in the answers; a store counts the target's greedy token at every position)."""
        return [torch.cat([it["ids"][1:], torch.tensor([-100])]) for it in self.items]


def token_items(tokenizer, convs: list, cfg: TrainConfig, min_len: int = 2) -> tuple[TokenItems, TokenItems]:
    """``convs`` chat-templated and cut at ``cfg.max_len`` (the first ``cfg.heldout`` held out): (heldout, train)
    :class:`TokenItems`, the ones shorter than ``min_len`` tokens left out."""
    from tqdm.auto import tqdm

    from specdec.training.data import tokenize_conversation
    from specdec.training.features import answer_mask

    held, train = [], []
    for i, msgs in enumerate(tqdm(convs, desc="tokenizing", unit="conv", disable=not cfg.progress)):
        ids = tokenize_conversation(tokenizer, msgs, cfg.max_len)
        if ids.numel() >= min_len:
            (held if i < cfg.heldout else train).append({"ids": ids, "answer": answer_mask(tokenizer, msgs, ids)})
    return TokenItems(held), TokenItems(train)


def collate_tokens(items: list[dict]) -> dict:
    """Pad token items: ids [B, T] (0 past each end), answer [B, T] bool, real [B, T] bool (inside the item)."""
    t = max(it["ids"].numel() for it in items)
    ids = torch.zeros(len(items), t, dtype=torch.long)
    answer = torch.zeros(len(items), t, dtype=torch.bool)
    real = torch.zeros(len(items), t, dtype=torch.bool)
    for i, it in enumerate(items):
        n = it["ids"].numel()
        ids[i, :n], answer[i, :n], real[i, :n] = it["ids"], it["answer"], True
    return {"ids": ids, "answer": answer, "real": real}


def training_device() -> torch.device:
    """Where the Trainer puts the module (:func:`training_args`: a CUDA device when there is one)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def target_features(model, tokenizer, convs: list, cfg: TrainConfig, layers: list[int] = (-1,), min_len: int = 2):
    """The frozen target's features of ``convs`` (the first ``cfg.heldout`` held out), from the sharded feature
    store in ``cfg.features_dir`` (default ``output_dir/features``), extracted once and shared by every method.

    A store already there serves when it holds these conversations (or more of the same data: its first
    items) with every layer asked for and at least ``cfg.max_len`` tokens each (items are cut to
    ``cfg.max_len``); a store of the same data and spec with fewer conversations grows; a store of anything
    else is an error. A new store holds the layers asked for and ``cfg.store_layers`` (so methods reading other
    layers can share it).

    Returns:
        (heldout, train): :class:`FeatureItems`.
    """
    from specdec.training.features import FeatureSpec, FeatureStore, extract_store, fastest_forward_dtype

    layers = list(layers)
    data = Path(cfg.data)
    stamp = (json.loads((data / "manifest.json").read_text()).get("answer_tokens") if (data / "manifest.json").is_file()
             else data.stat().st_size if data.is_file() else None)
    key = f"{cfg.data}|{stamp}"  # the first n items of a store are the first n conversations: any prefix serves
    if cfg.skip:  # held-out ones, then the training ones after the skipped: a store of its own
        key += f"|skip={cfg.heldout}+{cfg.skip}"
    where = Path(cfg.features_dir) if cfg.features_dir else Path(cfg.output_dir) / "features"

    def usable():
        if not (where / "manifest.json").is_file():
            return False
        m = json.loads((where / "manifest.json").read_text())
        spec = m.get("spec", {})
        return (m.get("data") == key and set(layers) <= set(spec.get("layers", [])) and spec.get("max_len", 0) >= cfg.max_len
                and (cfg.feature_dtype == "auto" or spec.get("forward_dtype", "") == cfg.feature_dtype)
                and m.get("items", 0) >= len(convs) and len(m.get("shards", [])) > 0)

    if int(os.environ.get("RANK", "0") or 0) > 0:  # several processes: rank 0 extracts, the others wait for it
        _wait_for(usable, where)
    store = FeatureStore(where) if usable() else None
    if store is None:
        every = layers + [x for x in cfg.store_layers if x not in layers]
        forward = cfg.feature_dtype
        if forward == "auto":
            forward = fastest_forward_dtype(model)
            log.warning("feature extraction runs the target in %s (feature_dtype=auto, timed on this host)", forward or str(model.dtype))
        store = extract_store(model, tokenizer, convs, where, FeatureSpec(layers=every, max_len=cfg.max_len, topk=0, forward_dtype=forward),
                              data_key=key, progress=cfg.progress)
    keep = [i for i in range(len(convs)) if min(store.item_len(i), cfg.max_len) >= min_len]
    held = [i for i in keep if i < cfg.heldout]
    train = [i for i in keep if i >= cfg.heldout]
    return (FeatureItems(store, held, layers, cfg.max_len, cfg.label_source),
            FeatureItems(store, train, layers, cfg.max_len, cfg.label_source))


def _wait_for(ready, where: Path, grace_s: float = 60.0) -> None:
    """Wait until ``ready()``; give up once nobody holds ``where``'s lock and it is still not ready after
    ``grace_s`` (the extracting process died)."""
    import fcntl
    import time

    idle_since = None
    while not ready():
        lock = where / ".lock"
        held = False
        if lock.is_file():
            with lock.open("a+") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(f, fcntl.LOCK_UN)
                except BlockingIOError:
                    held = True
        idle_since = None if held else (idle_since or time.monotonic())
        if idle_since is not None and time.monotonic() - idle_since > grace_s:
            raise RuntimeError(f"waited for rank 0 to extract the features into {where}, but nobody is extracting; "
                               "run again (rank 0 extracts, the other ranks read)")
        time.sleep(0.5)


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
    _STARTED[str(out)] = time.perf_counter()
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if not load_data:
        return out, model, tokenizer, None, None
    convs = load_conversations(cfg.data, limit=cfg.heldout + cfg.skip + cfg.num_conversations)
    heldout, train = convs[: cfg.heldout], convs[cfg.heldout + cfg.skip :]
    if not train:
        raise ValueError(f"{cfg.data} holds {len(convs)} conversations, all used for held-out evaluation or skipped "
                         f"(heldout={cfg.heldout}, skip={cfg.skip}); lower heldout or skip")
    return out, model, tokenizer, heldout, train


def fit(module, dataset, collate, cfg: TrainConfig, out: Path, sampler=None):
    """Train ``module`` with the shared Trainer glue, resuming from the newest complete checkpoint; returns the trainer.
    ``sampler``: the data order (default: the dataset's own; an ``EpochSampler`` draws a new one every epoch)."""
    from specdec.training.trainer import DrafterTrainer

    budget = TimeBudget(cfg.max_time_s) if cfg.max_time_s > 0 else None
    memory, clock = MemoryWatch(), StepClock()
    trainer = DrafterTrainer(model=module, args=training_args(cfg, out), train_dataset=dataset, data_collator=collate, sampler=sampler,
                             callbacks=[memory, clock] + ([budget] if budget else []))
    last = last_complete_checkpoint(out) if cfg.resume else None
    if last:
        log.warning("resuming from %s", last)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    trainer.fit_seconds = time.perf_counter() - t0
    trainer.stopped_by_time = bool(budget and budget.fired)
    trainer.peak_anon_mb = memory.peak_anon_mb
    trainer.median_step_s = clock.median()
    return trainer


def _rss_parts() -> dict[str, float]:
    """This process's resident memory now, in MB, by kind (Linux ``/proc/self/status``): ``anon`` (its own
    allocations) and ``file`` (pages of mapped files, such as a feature store's: the kernel drops them under
    memory pressure); {} where that file is missing."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            out[name[3:].lower()] = int(value.split()[0]) / 1024
    return out


class MemoryWatch(TrainerCallback):
    """The peak of the process's own (anonymous) resident memory over the training steps. The peak RSS the
    kernel reports also counts the memory-mapped feature store's pages the steps touched, which grows with the
    data read and is not the training's to keep; this one is what the training holds."""

    def __init__(self) -> None:
        self.peak_anon_mb = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        self.peak_anon_mb = max(self.peak_anon_mb, _rss_parts().get("anon", 0.0))
        return control


class StepClock(TrainerCallback):
    """Each optimizer step's wall time; the median is what a step costs once the run has warmed up (the whole
    run's time over its steps also counts the setup and the first steps' compilation and allocation)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.times.append(time.perf_counter() - self._start)
        return control

    def median(self) -> float | None:
        return float(sorted(self.times)[len(self.times) // 2]) if self.times else None


class TimeBudget(TrainerCallback):
    """Stops training (with a checkpoint, so a rerun resumes) once ``seconds`` of it have passed in this process."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start, self.fired = seconds, None, False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is not None and time.perf_counter() - self.start > self.seconds:
            self.fired = True
            control.should_save = True
            control.should_training_stop = True
        return control


def run_record(cfg: TrainConfig, trainer, train_items: int) -> dict:
    """What every shipped drafter records of its training run (``config.extra``): the data, the run's wall
    time (features included) and the training loop's own, the steps, the peak resident memory."""
    import resource

    started = _STARTED.get(str(Path(cfg.output_dir)))
    return {"trained_on": str(cfg.data), "train_conversations": train_items, "recipe_method": cfg.method,
            "train_time_s": round(getattr(trainer, "fit_seconds", 0.0), 1),
            "run_time_s": round(time.perf_counter() - started, 1) if started else None,
            "train_steps": int(trainer.state.global_step), "stopped_by_time": bool(getattr(trainer, "stopped_by_time", False)),
            "median_step_s": round(trainer.median_step_s, 4) if getattr(trainer, "median_step_s", None) else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_anon_mb": round(getattr(trainer, "peak_anon_mb", 0.0), 1)}
