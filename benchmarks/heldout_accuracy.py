"""Held-out top-1 per depth of a saved Clover / Clover-2 drafter on a training run's held-out conversations.

    python benchmarks/heldout_accuracy.py specdec/data/clover-smollm2-135m --recipe clover2-smollm2-cpu \
        data=data/distill-smollm2-sharegpt features_dir=runs/features-store-512 heldout=200 max_len=512

The recipe and overrides name the data and the feature store exactly as the training run did (the store is
reused when it holds those conversations, extracted otherwise), so an older drafter and a newly trained one are
scored on the same positions by the same code as training's own held-out table
(:func:`specdec.training.clover.clover_heldout_accuracy`). Prints cumulative top-1 .. top-5 per depth.
"""

import argparse
import json

import torch

from specdec.drafters.clover import CloverHeads, decoder_parts
from specdec.models import load_model
from specdec.training.clover import CloverModule, clover_heldout_accuracy
from specdec.training.common import target_features
from specdec.training.config import load_recipe
from specdec.training.data import load_conversations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("drafter", help="a Clover drafter directory (config.json + model.safetensors)")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("overrides", nargs="*", help="key=value settings, as given to specdec train")
    args = ap.parse_args()
    cfg = load_recipe(args.recipe, args.overrides)
    if cfg.heldout < 1:
        raise SystemExit("heldout must be at least 1: the held-out conversations are what this scores")
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
    held_convs = load_conversations(cfg.data, limit=cfg.heldout)
    # the training run's store holds the held-out conversations first; asking for them alone reuses it
    held, _ = target_features(model, tokenizer, held_convs, cfg, min_len=3)
    config, state = CloverHeads.from_pretrained(args.drafter)
    layer, rotary = decoder_parts(model) if config.augment else (None, None)
    heads = CloverHeads(config, layer, rotary, model.get_input_embeddings(), model.get_output_embeddings().weight,
                        state["draft_vocab"], draft_counts=state.get("draft_counts")).load_state(state, args.drafter).eval()
    module = CloverModule(heads, config.vocab_size, cfg.loss_decay, False, 0.0)
    with torch.inference_mode():
        table = clover_heldout_accuracy(module, held)
    cumulative = [[round(sum(row[: i + 1]), 4) for i in range(len(row))] for row in table]
    print(json.dumps({"drafter": args.drafter, "heldout": len(held), "top1": [row[0] for row in cumulative],
                      "cumulative_top5": cumulative}, indent=1))


if __name__ == "__main__":
    main()
