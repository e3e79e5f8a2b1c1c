"""One typed configuration for ``specdec train``; the CLI and the YAML recipes parse into it.

A recipe is YAML whose keys are :class:`TrainConfig` fields; ``specdec train
--recipe NAME key=value ...`` loads the shipped recipe ``NAME`` (or a path),
then applies the overrides. Unknown keys and bad values are errors that say
which key and what is allowed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from specdec.config import coerce

__all__ = ["TrainConfig", "load_recipe", "recipe_names", "METHODS", "DRAFTER_OF", "register_method"]

# method -> "module:function" of its trainer (imported only when a run starts); a new drafter adds a line
METHODS: dict[str, str] = {
    "medusa1": "specdec.training.medusa:train_medusa",
    "medusa2": "specdec.training.medusa:train_medusa",
    "clover": "specdec.training.clover:train_clover",
    "clover2": "specdec.training.clover:train_clover",
    "ppd": "specdec.training.ppd:train_ppd",
    "gad": "specdec.training.gad:train_gad",
    "eagle": "specdec.training.eagle:train_eagle",
}


# method -> the drafter spec name its result loads as
DRAFTER_OF: dict[str, str] = {"medusa1": "medusa", "medusa2": "medusa", "clover": "clover", "clover2": "clover", "ppd": "ppd", "gad": "gad",
                              "eagle": "eagle"}


def register_method(name: str, trainer: str, drafter: str | None = None) -> None:
    """Make ``specdec train`` accept ``method=name``, trained by ``trainer`` (``"module:function"``), giving a ``drafter``."""
    METHODS[name] = trainer
    DRAFTER_OF[name] = drafter or name


@dataclass
class TrainConfig:
    """Everything a drafter training run needs.

    Data: ``num_conversations`` training conversations are read after the
    first ``heldout`` ones (which are kept for evaluation), chat-templated and
    cut at ``max_len`` tokens. Labels are the target's own greedy next tokens
    (``label_source="self"``, self-distillation) or the data's tokens
    (``"data"``). Head k's loss weight is ``loss_decay ** k``; ``loss_type="kl"``
    replaces the cross-entropy by the KL divergence to the target's own
    distribution at that position (over the draft vocabulary).

    Medusa-2 (``method="medusa2"``) adds a LoRA on the target (``lora_*``),
    the target's own loss (KL to the adapter-disabled model), a head learning
    rate ``head_lr_multiplier`` × ``lr``, and a head-loss weight that ramps
    linearly from 0 to 1 over ``head_warmup_steps``.

    Clover (``method="clover"``) and Clover-2 (``"clover2"``): ``num_heads`` is
    the draft depth trained, ``augment`` adds the Augmenting Block; Clover-2
    trains with KL to the target's distribution plus ``regression_weight`` ×
    SmoothL1 on hidden states (see :mod:`specdec.training.clover`).

    PPD (``method="ppd"``): ``num_heads`` prompt tokens of ``ppd_virtual``
    virtual tokens each, ``ppd_groups`` insertion points per sequence, loss
    ``kl`` (distillation) or ``ce`` (hard labels) (see :mod:`specdec.training.ppd`).

    EAGLE (``method="eagle"``): the drafter reads the target's ``eagle_layers`` (``hidden_states`` indices;
    empty: EAGLE-3's low/mid/high choice) and is unrolled ``eagle_steps`` steps in training (training-time
    test); features come from the sharded store in ``features_dir`` (see :mod:`specdec.training.eagle`).

    GAD's block drafter (``method="gad"``): ``num_heads`` mask slots,
    ``num_layers`` copies of the target's last layers, reading ``gad_window``
    committed positions; ``gad_windows`` training positions per conversation
    (see :mod:`specdec.training.gad`).
    """

    method: str = "medusa1"
    model: str = "default"
    data: str = "sharegpt"
    output_dir: str = "runs/medusa"
    features_dir: str = ""  # the target's feature store ("" = output_dir/features); methods can share one
    store_layers: list[int] = field(default_factory=list)  # layers a new store also holds, so later methods share it
    num_conversations: int = 600
    heldout: int = 60
    max_len: int = 256
    label_source: str = "self"
    loss_type: str = "ce"  # "ce": cross-entropy on the labels; "kl": KL to the target's own distribution (Medusa-1)
    # heads
    num_heads: int = 4
    num_layers: int = 1
    draft_vocab_size: int | None = 8192
    own_projection: bool = False
    tree_size: int = 16
    # clover
    augment: bool = True  # Clover's Augmenting Block (a copy of the target's last decoder layer)
    regression_weight: float = 1.0  # Clover-2's SmoothL1 on hidden states
    # ppd (num_heads = the number of prompt tokens m)
    ppd_groups: int = 8  # insertion points per training sequence
    ppd_virtual: int = 1  # virtual tokens per prompt token (the ensemble variant when > 1)
    ppd_aggregation: str = "mean"  # "mean" or "learned" (ensemble)
    ppd_init_text: str = "The next words are"
    # gad (num_heads = the block size k, num_layers = the target layers copied)
    gad_window: int = 16  # committed positions the block reads
    gad_windows: int = 24  # training positions drawn per conversation
    # eagle
    eagle_layers: list[int] = field(default_factory=list)
    eagle_steps: int = 4
    # optimisation
    epochs: float = 3.0
    max_steps: int = -1
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_steps: int = 0
    loss_decay: float = 0.8
    shuffle: bool = True
    seed: int = 0
    dtype: str = "float32"
    bf16: bool = False
    gradient_checkpointing: bool = False
    # medusa-2
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    head_lr_multiplier: float = 4.0
    head_warmup_steps: int = 50
    target_loss_weight: float = 1.0
    # bookkeeping
    save_steps: int = 200
    save_total_limit: int = 2
    logging_steps: int = 10
    report_to: list[str] = field(default_factory=lambda: ["none"])
    run_name: str | None = None
    deepspeed: Any = None  # path to a DeepSpeed JSON, or the config itself (dict)
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.ppd_groups < 1 or self.ppd_virtual < 1 or self.ppd_aggregation not in ("mean", "learned"):
            raise ValueError("ppd_groups and ppd_virtual must be >= 1 and ppd_aggregation 'mean' or 'learned'")
        if self.loss_type not in ("ce", "kl"):
            raise ValueError(f"loss_type must be 'ce' or 'kl', got {self.loss_type!r}")
        if self.label_source not in ("self", "data"):
            raise ValueError(f"label_source must be 'self' or 'data', got {self.label_source!r}")
        for name in ("num_conversations", "max_len", "num_heads", "batch_size", "grad_accum", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.heldout < 0 or self.num_layers < 0:
            raise ValueError("heldout and num_layers must be >= 0")
        if self.lr <= 0 or not 0 < self.loss_decay <= 1:
            raise ValueError("lr must be > 0 and loss_decay in (0, 1]")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        for name in ("eagle_layers", "store_layers"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [int(x) for x in getattr(self, name).replace("[", "").replace("]", "").split(",") if x.strip()])
        if self.eagle_steps < 1:
            raise ValueError(f"eagle_steps must be >= 1, got {self.eagle_steps}")
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",")]

    def deepspeed_config(self) -> dict | None:
        if self.deepspeed is None or isinstance(self.deepspeed, dict):
            return self.deepspeed
        return json.loads(Path(self.deepspeed).read_text())


def recipe_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("specdec.recipes").iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Load a shipped recipe by name (or a YAML path), apply ``key=value`` overrides, validate."""
    values: dict = {}
    if name_or_path:
        path = Path(name_or_path)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            text = path.read_text()
        elif name_or_path in recipe_names():
            text = resources.files("specdec.recipes").joinpath(f"{name_or_path}.yaml").read_text()
        else:
            raise FileNotFoundError(f"no recipe {name_or_path!r}: give a YAML path or one of {', '.join(recipe_names())}")
        values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ValueError(f"recipe {name_or_path} must be a YAML mapping of TrainConfig fields")
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides or []]
    for key, raw in items:
        if key not in TrainConfig.__dataclass_fields__:
            raise ValueError(f"unknown setting {key!r}; valid settings: {', '.join(TrainConfig.__dataclass_fields__)}")
        values[key] = coerce(TrainConfig, key, raw, what="setting") if isinstance(raw, str) else raw
    unknown = set(values) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)} in recipe {name_or_path}")
    return TrainConfig(**values)


def _split(item: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    if not eq:
        raise ValueError(f"override {item!r} must look like key=value")
    return key.strip(), value.strip()
