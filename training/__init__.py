"""Training subsystem for trainable drafters: data, losses, HF Trainer glue, recipes.

A drafter brings its module and its loss (``specdec.training.medusa``); data
loading (``data``), configuration and recipes (``config``), the Trainer
subclass (``trainer``), peft, DeepSpeed, wandb and checkpoints are shared.
"""

from specdec.training.config import TrainConfig, load_recipe, recipe_names

__all__ = ["TrainConfig", "load_recipe", "recipe_names", "train"]


def train(config: TrainConfig):
    """Run the training ``config`` describes; returns the final drafter directory."""
    if config.method in ("medusa1", "medusa2"):
        from specdec.training.medusa import train_medusa

        return train_medusa(config)
    raise ValueError(f"no trainer for method {config.method!r}")
