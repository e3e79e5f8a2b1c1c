"""Training subsystem for trainable drafters (Medusa, Clover, PPD): data, losses, Trainer glue."""
