"""Build a small draft model for the default target: its first K decoder layers, its final norm and its head.

    python benchmarks/build_draft_model.py --layers 4 --out runs/draft-smollm2-4l

The result is an ordinary HF model directory (same tokenizer, same vocabulary), so it works as
``--drafter draft-model:runs/draft-smollm2-4l``. Nothing is trained: it is the target cut short
(LayerSkip-style early exit without the early-exit training), a cheap, honest baseline for the
separate-draft-model path; docs/aggressive.md reports its acceptance.
"""

import argparse

import torch

from specdec.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers kept from the bottom (default: %(default)s)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, tokenizer = load_model(args.model)
    total = model.config.num_hidden_layers
    if not 1 <= args.layers < total:
        raise SystemExit(f"--layers must be in [1, {total - 1}]")
    model.model.layers = torch.nn.ModuleList(model.model.layers[: args.layers])
    model.config.num_hidden_layers = args.layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[: args.layers]
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"draft model with {args.layers} of {total} layers written to {args.out}")


if __name__ == "__main__":
    main()
