"""One typed configuration for ``specdec train``; the CLI and the YAML recipes parse into it.

A recipe is YAML whose keys are :class:`TrainConfig` fields; ``specdec train
--recipe NAME key=value ...`` loads the shipped recipe ``NAME`` (or a path),
then applies the overrides. Unknown keys and bad values are errors that say
which key and what is allowed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from specdec.config import coerce

__all__ = ["TrainConfig", "SECTIONS", "MedusaSettings", "CloverSettings", "PPDSettings", "GADSettings", "EagleSettings", "load_recipe", "recipe_names", "METHODS", "DRAFTER_OF", "register_method"]

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
class MedusaSettings:
    """Section ``medusa:`` (methods ``medusa1`` and ``medusa2``)."""

    layers: int = 1  # residual blocks per head
    own_projection: bool = False  # each head its own output projection instead of the target's head
    tree_size: int = 16  # nodes of the static tree built from the held-out accuracies
    # Medusa-2 only: a LoRA on the target, trained jointly
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    head_lr_multiplier: float = 4.0  # heads' learning rate = this x lr
    head_warmup_steps: int = 50  # the heads' loss weight ramps from 0 to 1 over these steps
    target_loss_weight: float = 1.0  # weight of the target's own loss (KL to the adapter-disabled model)


@dataclass
class CloverSettings:
    """Section ``clover:`` (methods ``clover`` and ``clover2``)."""

    augment: bool = True  # Clover's Augmenting Block (a copy of the target's last decoder layer)
    regression_weight: float = 1.0  # Clover-2's SmoothL1 of each head's state onto the target's hidden state


@dataclass
class PPDSettings:
    """Section ``ppd:``."""

    groups: int = 8  # insertion points per training sequence
    virtual: int = 1  # virtual tokens per prompt token (the ensemble variant when > 1)
    aggregation: str = "mean"  # "mean" or "learned" (ensemble)
    init_text: str = "The next words are"  # the prompt tokens start as these words' embeddings


@dataclass
class GADSettings:
    """Section ``gad:`` (GAD's block drafter)."""

    layers: int = 2  # decoder layers copied from the target's last ones
    window: int = 16  # committed positions the block reads
    windows: int = 24  # training positions drawn per conversation


@dataclass
class EagleSettings:
    """Section ``eagle:``."""

    layers: list[int] = field(default_factory=list)  # target hidden_states indices fused (empty: EAGLE-3's low/mid/high)
    # start from this EAGLE drafter's weights (a directory, or "shipped"), keeping its layers and draft vocabulary: a
    # run continued in a later session, where the optimizer's state and the feature store are not kept
    init: str = ""
    # > 0: the unrolled steps after the first run at this many answer positions per sequence, drawn anew every batch
    # (step 0 runs everywhere: the later steps attend to its entries); 0: at every position
    ttt_positions: int = 0


# section name -> its dataclass; a method's own settings live only in its section
SECTIONS: dict[str, type] = {"medusa": MedusaSettings, "clover": CloverSettings, "ppd": PPDSettings, "gad": GADSettings,
                             "eagle": EagleSettings}

# settings of earlier releases -> where they are now (an old recipe gets an error that names the new key)
MOVED: dict[str, str] = {
    "num_heads": "depth", "num_layers": "medusa.layers or gad.layers", "own_projection": "medusa.own_projection",
    "tree_size": "medusa.tree_size", "augment": "clover.augment", "regression_weight": "clover.regression_weight",
    **{f"ppd_{k}": f"ppd.{k}" for k in ("groups", "virtual", "aggregation", "init_text")},
    "gad_window": "gad.window", "gad_windows": "gad.windows", "eagle_layers": "eagle.layers", "eagle_steps": "depth",
    **{k: f"medusa.{k}" for k in ("lora_r", "lora_alpha", "lora_targets", "head_lr_multiplier", "head_warmup_steps",
                                 "target_loss_weight")},
}


@dataclass
class TrainConfig:
    """Everything a drafter training run needs.

    Settings every method shares sit at the top level; each method's own sit
    in its section (``medusa:``, ``clover:``, ``ppd:``, ``gad:``, ``eagle:``;
    on the command line ``clover.augment=false``).

    Data: ``num_conversations`` training conversations are read after the
    first ``heldout`` ones (which are kept for evaluation) and the ``skip``
    after those (a run that continues an earlier drafter, e.g. ``eagle.init``,
    trains on conversations the earlier run never saw), chat-templated and
    cut at ``max_len`` tokens. Labels are the target's own greedy next tokens
    (``label_source="self"``, self-distillation) or the data's tokens
    (``"data"``).

    ``depth`` is how many tokens past the root the drafter is trained to
    guess, for every method: Medusa's and Clover's heads, PPD's prompt
    tokens, GAD's block size, EAGLE's unrolled steps (training-time test).
    Depth k's loss weight is ``loss_decay ** k``; ``loss_type="kl"`` replaces
    the cross-entropy by the KL divergence to the target's own distribution
    at that position (over the draft vocabulary of ``draft_vocab_size``
    tokens, the target's most frequent ones; None: the whole vocabulary).

    Medusa-2 (``method="medusa2"``) adds a LoRA on the target, the target's
    own loss, a head learning rate multiplier and a head-loss warm-up (section
    ``medusa``). Clover-2 trains with KL plus ``clover.regression_weight`` ×
    SmoothL1 on hidden states (:mod:`specdec.training.clover`). PPD's section
    sets its insertion points and virtual tokens (:mod:`specdec.training.ppd`);
    GAD's, the layers copied and the window read (:mod:`specdec.training.gad`);
    EAGLE's, the fused target layers (:mod:`specdec.training.eagle`).
    """

    method: str = "medusa1"
    model: str = "default"
    data: str = "sharegpt"
    output_dir: str = "runs/medusa"
    # "store": the frozen target runs once over the data into a feature store, which training streams; "online"
    # (method eagle): the target runs inside every training step instead, on the training device, and nothing is
    # stored: the choice where the target's forward is cheap against the disk a store needs (a GPU)
    features: str = "store"
    features_dir: str = ""  # the target's feature store ("" = output_dir/features); methods can share one
    store_layers: list[int] = field(default_factory=list)  # layers a new store also holds, so later methods share it
    feature_dtype: str = ""  # the target's dtype while extracting features ("": dtype; "auto": the faster, timed here)
    num_conversations: int = 600
    heldout: int = 60
    skip: int = 0  # training conversations start this many after the held-out ones
    max_len: int = 256
    label_source: str = "self"
    loss_type: str = "ce"  # "ce": cross-entropy on the labels; "kl": KL to the target's own distribution
    depth: int = 4
    draft_vocab_size: int | None = 8192
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
    # the methods' own settings
    medusa: MedusaSettings = field(default_factory=MedusaSettings)
    clover: CloverSettings = field(default_factory=CloverSettings)
    ppd: PPDSettings = field(default_factory=PPDSettings)
    gad: GADSettings = field(default_factory=GADSettings)
    eagle: EagleSettings = field(default_factory=EagleSettings)
    # bookkeeping
    save_steps: int = 200
    max_time_s: float = 0.0  # > 0: stop after this many seconds of training, with a checkpoint (a rerun resumes)
    save_total_limit: int = 2
    logging_steps: int = 10
    report_to: list[str] = field(default_factory=lambda: ["none"])
    run_name: str | None = None
    deepspeed: Any = None  # path to a DeepSpeed JSON, or the config itself (dict)
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _section(name, value))
            elif not isinstance(value, cls):
                raise ValueError(f"section {name!r} must be a mapping of {', '.join(cls.__dataclass_fields__)}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.ppd.groups < 1 or self.ppd.virtual < 1 or self.ppd.aggregation not in ("mean", "learned"):
            raise ValueError("ppd.groups and ppd.virtual must be >= 1 and ppd.aggregation 'mean' or 'learned'")
        from specdec.training.features import FORWARD_DTYPES

        if self.feature_dtype not in (*FORWARD_DTYPES, "auto"):
            raise ValueError(f"feature_dtype must be one of {(*FORWARD_DTYPES, 'auto')}, got {self.feature_dtype!r}")
        if self.features not in ("store", "online"):
            raise ValueError(f"features must be 'store' or 'online', got {self.features!r}")
        if self.features == "online" and self.method != "eagle":
            raise ValueError(f"features=online is implemented for method eagle only; {self.method} reads a feature store "
                             "(features=store)")
        if self.loss_type not in ("ce", "kl"):
            raise ValueError(f"loss_type must be 'ce' or 'kl', got {self.loss_type!r}")
        if self.label_source not in ("self", "data"):
            raise ValueError(f"label_source must be 'self' or 'data', got {self.label_source!r}")
        for name in ("num_conversations", "max_len", "depth", "batch_size", "grad_accum", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eagle.ttt_positions < 0:
            raise ValueError(f"eagle.ttt_positions must be >= 0 (0: every position), got {self.eagle.ttt_positions}")
        if self.heldout < 0 or self.skip < 0 or self.medusa.layers < 0 or self.gad.layers < 0:
            raise ValueError("heldout, skip, medusa.layers and gad.layers must be >= 0")
        if self.gad.window < 1 or self.gad.windows < 1:
            raise ValueError("gad.window and gad.windows must be >= 1")
        if self.lr <= 0 or not 0 < self.loss_decay <= 1:
            raise ValueError("lr must be > 0 and loss_decay in (0, 1]")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        if isinstance(self.store_layers, str):
            self.store_layers = _ints(self.store_layers)
        if isinstance(self.eagle.layers, str):
            self.eagle.layers = _ints(self.eagle.layers)
        if isinstance(self.medusa.lora_targets, str):
            self.medusa.lora_targets = [t.strip() for t in self.medusa.lora_targets.split(",")]

    def deepspeed_config(self) -> dict | None:
        if self.deepspeed is None or isinstance(self.deepspeed, dict):
            return self.deepspeed
        return json.loads(Path(self.deepspeed).read_text())

    def to_dict(self) -> dict:
        """Every setting, sections as nested mappings (what a run writes to ``train_config.json``)."""
        return asdict(self)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace("[", "").replace("]", "").split(",") if x.strip()]


def _unknown(key: str, valid) -> ValueError:
    hint = f" (it is now {MOVED[key]!r})" if key in MOVED else ""
    return ValueError(f"unknown setting {key!r}{hint}; valid settings: {', '.join(valid)}")


def _section(name: str, values: dict):
    cls = SECTIONS[name]
    out = {}
    for key, raw in values.items():
        if key not in cls.__dataclass_fields__:
            raise ValueError(f"unknown setting {name}.{key}; the {name} section has {', '.join(cls.__dataclass_fields__)}")
        out[key] = coerce(cls, key, raw, what="setting") if isinstance(raw, str) else raw
    return cls(**out)


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
    top = TrainConfig.__dataclass_fields__
    for key in values:
        if key not in top:
            raise _unknown(key, top) if key in MOVED else ValueError(f"unknown settings [{key!r}] in recipe {name_or_path}")
    for key, raw in items:
        section, dot, sub = key.partition(".")
        if dot:  # clover.augment=false
            if section not in SECTIONS:
                raise ValueError(f"unknown section {section!r} in {key!r}; sections: {', '.join(SECTIONS)}")
            base = values.get(section) or {}
            values[section] = {**(base if isinstance(base, dict) else asdict(base)), sub: raw}
            continue
        if key not in top:
            raise _unknown(key, top)
        if key in SECTIONS and isinstance(raw, dict):  # a whole section merges into the recipe's
            values[key] = {**(values.get(key) or {}), **raw}
        else:
            values[key] = coerce(TrainConfig, key, raw, what="setting") if isinstance(raw, str) else raw
    return TrainConfig(**values)


def _split(item: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    if not eq:
        raise ValueError(f"override {item!r} must look like key=value")
    return key.strip(), value.strip()
