"""Training subsystem for trainable drafters: data, losses, HF Trainer glue, recipes.

A drafter brings its module and its loss (``specdec.training.medusa``); data
loading (``data``), configuration and recipes (``config``), the Trainer
subclass (``trainer``), peft, DeepSpeed, wandb and checkpoints are shared.
"""

import importlib

from specdec.training.config import METHODS, TrainConfig, load_recipe, recipe_names, register_method

__all__ = ["TrainConfig", "load_recipe", "recipe_names", "register_method", "train"]


def train(config: TrainConfig):
    """Run the training ``config`` describes (its method's registered trainer); returns the final drafter directory."""
    module, _, function = METHODS[config.method].partition(":")
    return getattr(importlib.import_module(module), function)(config)
