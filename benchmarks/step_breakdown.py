"""Where a plain decoding step's time goes, and the process's resident memory, for the default model.

    python benchmarks/step_breakdown.py --quantized 1     # the GGUF's blocks (gguf-avx512)
    python benchmarks/step_breakdown.py --quantized 0     # the dequantized fp32 weights (rows-avx512 or BLAS)

Prints one JSON line: whether the lean native forward ran (specdec/lean.py), the plain step (decode time / decoded tokens of `specdec.generate(drafter="none")`, median
over prompts), the linear layers alone at one row through the plan's kernel (all of them, as one step runs them),
the other aten ops' self time (torch profiler, per step), and what is left (Python and dispatch); resident memory
after loading and after generating (all, private, mapped file pages). Run it alone on the machine (no test or training beside it)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory in MB: all of it (VmRSS), private memory (RssAnon: what the process holds of its own) or
    mapped file pages (RssFile: shared with the page cache, e.g. the pages of a model file a check read)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantized", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--top", type=int, default=0, help="also print the N aten ops with the most self time per step")
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    import specdec
    from specdec.bench import load_questions
    from specdec.engine import prepare_input_ids
    from specdec.kernels import _linears
    from specdec.models import load_model
    from specdec.profile import fast_linears_for, get_profile
    from specdec.quant import quant_summary

    model, tok = load_model("default", quantized=bool(args.quantized))
    rss_loaded, anon_loaded = rss_mb(), rss_mb("RssAnon")
    prof = get_profile(model, fast=True, progress=False)
    fast = fast_linears_for(model, prof)
    kernel = fast.plan.for_rows(1)
    lean = fast.lean is not None  # the decode forward runs as one native call (specdec/lean.py)
    prompts = [prepare_input_ids(tok, [{"role": "user", "content": q["turns"][0]}])
               for q in load_questions("spec-bench", limit=1)[:6]]
    specdec.generate(model, tok, prompts[0], drafter="none", max_new_tokens=8)  # warm
    steps = []
    for ids in prompts:
        r = specdec.generate(model, tok, ids, drafter="none", max_new_tokens=args.tokens)
        s = r.stats
        steps.append((s.wall_time_s - s.first_token_s) / max(s.new_tokens - 1, 1))
    step = statistics.median(steps)
    # the linear layers alone, one row, through the plan's kernel
    from specdec.kernels import KERNELS

    mods = _linears(model)
    k = KERNELS[kernel]
    states = [k.prepare(m.weight, m.bias) for m in mods]
    xs = {d: torch.randn(1, d) for d in {m.weight.shape[1] for m in mods}}
    times = []
    with torch.inference_mode():
        for _ in range(15):
            t0 = time.perf_counter()
            for m, st in zip(mods, states):
                k.run(xs[m.weight.shape[1]], m.weight, m.bias, st, 1)
            times.append(time.perf_counter() - t0)
    linears = statistics.median(times[3:])
    rss_after, anon_after, file_after = rss_mb(), rss_mb("RssAnon"), rss_mb("RssFile")  # before the profiler's own
    # other aten ops' self time per step (the linear calls of the own kernels are ctypes: not aten ops)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        r = specdec.generate(model, tok, prompts[1], drafter="none", max_new_tokens=args.tokens)
    n_steps = max(r.stats.target_forwards, 1)
    aten = sum(e.self_cpu_time_total for e in p.key_averages() if e.key.startswith("aten::") and e.key not in ("aten::linear", "aten::addmm", "aten::mm")) / 1e6
    linear_aten = sum(e.self_cpu_time_total for e in p.key_averages() if e.key in ("aten::addmm", "aten::mm")) / 1e6
    other = aten / n_steps
    if args.top:
        rows = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.top]
        for e in rows:
            print(f"{e.key:<40} {e.self_cpu_time_total / n_steps:8.1f} us/step {e.count / n_steps:6.1f} calls/step")
    print(json.dumps({
        "quantized": bool(args.quantized), "gguf_blocks": quant_summary(model), "kernel_1_row": kernel, "lean": lean,
        "step_ms": round(step * 1e3, 2), "linears_ms": round(linears * 1e3, 2),
        "other_aten_ms": round(other * 1e3, 2), "blas_linear_ms": round(linear_aten / n_steps * 1e3, 2),
        "python_dispatch_ms": round((step - linears - other) * 1e3, 2),
        "rss_loaded_mb": round(rss_loaded), "rss_after_mb": round(rss_after), "private_loaded_mb": round(anon_loaded),
        "private_after_mb": round(anon_after), "file_pages_after_mb": round(file_after),
        "tokens_per_s_decode": round(1 / step, 1),
    }))


if __name__ == "__main__":
    main()
