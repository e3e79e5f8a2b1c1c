"""Time one EAGLE training step (forward, backward, AdamW) at the default model's shapes on random data.

    python benchmarks/eagle_train_step.py --batch 8 --tokens 600 --steps 4 --positions 0 128 64 [--profile]

Hidden 576, 9 query / 3 key-value heads, MLP 1536, vocabulary 49,152, draft vocabulary 8,192, three fused
layers, bf16 autocast (as `bf16=true` trains), answers on the last two thirds of every sequence. Prints the
median of 3 timed steps (after 2 warm-up steps) for each ``--positions`` value (eagle.ttt_positions; 0: all).
Nothing else should run on the machine meanwhile.
"""

import argparse
import time

import torch
from torch import nn

from specdec.drafters.eagle import EagleConfig, EagleModel
from specdec.training.eagle import EagleModule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=600)
    ap.add_argument("--steps", type=int, default=4, help="unrolled steps (depth)")
    ap.add_argument("--positions", type=int, nargs="+", default=[0])
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's table for the last setting")
    args = ap.parse_args()
    torch.manual_seed(0)
    b, t = args.batch, args.tokens
    cfg = EagleConfig(hidden_size=576, vocab_size=49152, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                      feature_layers=[2, 15, 27], draft_vocab_size=8192)
    vocab = torch.randperm(49152)[:8192].sort().values
    feats, last = torch.randn(b, t, 3 * 576), torch.randn(b, t, 576)
    ids, labels = vocab[torch.randint(0, 8192, (b, t))], vocab[torch.randint(0, 8192, (b, t))]
    answer = torch.zeros(b, t, dtype=torch.bool)
    answer[:, t // 3 :] = True
    for positions in args.positions:
        model = EagleModel(cfg, vocab, torch.randn(8192, 576) * 0.02).attach(nn.Embedding(49152, 576))
        module = EagleModule(model, torch.randn(8192, 576) * 0.02, 49152, args.steps, 0.8, True, positions).train()
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
                out = module(feats, last, ids, labels, answer)
            out["loss"].backward()
            opt.step()
            opt.zero_grad()

        for _ in range(2):
            step()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        print(f"positions {positions}: {sorted(times)[1]:.2f} s a step (batch {b}, {t} tokens, {args.steps} steps)", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
