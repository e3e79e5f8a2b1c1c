"""What a long prompt joining a decoding batch costs the running rows, with its chunks fused into their decode
forwards and with each chunk run as a forward of its own.

    python benchmarks/fused_prefill.py --rows 4 --long 2000 --reps 3

The default model, its measured plan and cost profile (as ``specdec serve`` sets them up), ``--rows`` short
spec-bench prompts decoding with ``--drafter``; after 4 steps a ``--long``-token prompt (the start of a longctx
prompt) joins and is prefilled in chunks sized from the cost. For each setting, alternated ``--reps`` times:
the long prompt's time to first token, the running rows' step time while it is prefilled, and their step time
before it joined. Every output is checked equal across settings. Prints one JSON line per run and a summary.
Run it alone on the machine (no test or training beside it)."""

from __future__ import annotations

import argparse
import json
import statistics
import time


def run_once(loop_, prompts, long_ids, fuse: bool, new_tokens: int) -> dict:
    from specdec.batch import Request
    from specdec.verifiers import GreedyVerifier

    engine = loop_.engine
    engine.fuse_prefill = fuse
    drafter = next(iter(loop_.drafters.values()))
    for i, ids in enumerate(prompts):
        engine.add(Request(ids, drafter.open(), GreedyVerifier(), new_tokens, key=i))
    out = {i: [] for i in range(len(prompts) + 1)}
    before, during = [], []
    joined_at = first_at = None
    steps = 0
    while not engine.idle:
        if steps == 4:
            engine.add(Request(long_ids, drafter.open(), GreedyVerifier(), 16, key=len(prompts)))
            joined_at = time.perf_counter()
        t0 = time.perf_counter()
        prefilling = bool(engine.prefilling) or (steps == 4)
        events = engine.step()
        dt = time.perf_counter() - t0
        steps += 1
        if steps <= 4 and steps > 1:
            before.append(dt)
        elif prefilling and first_at is None:
            during.append(dt)
        for key, event in events:
            out[key] += event.new_tokens
            if key == len(prompts) and event.new_tokens and first_at is None:
                first_at = time.perf_counter()
    return {"fuse": fuse, "ttft_s": first_at - joined_at, "step_before_ms": 1e3 * statistics.median(before),
            "step_during_ms": 1e3 * statistics.median(during), "step_during_max_ms": 1e3 * max(during),
            "steps_during": len(during), "outputs": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--long", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--drafter", default="prompt-lookup")
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args()
    import torch

    from specdec.bench import load_questions
    from specdec.engine import prepare_input_ids
    from specdec.models import load_model
    from specdec.server import EngineLoop, ServerConfig

    torch.set_grad_enabled(False)
    model, tok = load_model("default")
    loop_ = EngineLoop(model, tok, ServerConfig(drafters=(args.drafter,)))
    qs = load_questions("spec-bench", limit=1)[: args.rows]
    prompts = [prepare_input_ids(tok, [{"role": "user", "content": q["turns"][0]}]) for q in qs]
    long_q = max(load_questions("longctx"), key=lambda q: len(q["turns"][0]))
    long_ids = prepare_input_ids(tok, [{"role": "user", "content": long_q["turns"][0]}])[: args.long]
    print(json.dumps({"rows": args.rows, "long_tokens": long_ids.numel(), "drafter": args.drafter,
                      "chunk": loop_.engine.chunk_tokens() if loop_.engine.rows else None}), flush=True)
    runs = []
    run_once(loop_, prompts, long_ids, True, 16)  # warm-up
    for rep in range(args.reps):
        for fuse in ((True, False) if rep % 2 == 0 else (False, True)):
            r = run_once(loop_, prompts, long_ids, fuse, args.new_tokens)
            runs.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "outputs"}), flush=True)
    same = all(r["outputs"] == runs[0]["outputs"] for r in runs)
    summary = {"outputs_identical": same}
    for fuse in (True, False):
        rs = [r for r in runs if r["fuse"] == fuse]
        name = "fused" if fuse else "separate"
        summary[name] = {k: round(statistics.median(r[k] for r in rs), 3) for k in ("ttft_s", "step_before_ms", "step_during_ms", "steps_during")}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
