"""``specdec bench``: acceptance and speed-up reports, side by side with HF ``generate`` and specdec's plain decoding.

For every prompt, in one process and interleaved (the order rotates from
prompt to prompt): HF ``generate`` (``hf-greedy``, what a user has today),
HF prompt lookup (``hf-prompt-lookup``, ``prompt_lookup_num_tokens=10``),
specdec's own plain decoding (``none``: the same fast forward as every
drafter, no drafts; added when not asked for) and every drafter asked for.
Same prompt, same ``max_new_tokens``, same thread count, same dtype (HF runs
the very model object specdec runs); one warm-up of each method first. With
``repeats`` > 1, each method's time on a prompt is the median of its repeats.

Definitions (per method, overall and per category):

* ``mean_accepted_length`` (τ) = new_tokens / target_forwards, where
  target_forwards counts decode forwards after the prefill (for HF runs,
  counted by a forward hook on the model);
* ``speedup_vs_hf_greedy`` = Σ wall time of hf-greedy / Σ wall time of the
  method, over the same prompts; ``speedup_vs_none`` likewise against
  specdec's plain decoding, so the gain of the engine and the gain of
  speculation show separately;
* ``identical_to_greedy`` = prompts whose new tokens equal hf-greedy's exactly;
  ``identical_to_plain`` = prompts equal to specdec's plain decoding (the
  definition of lossless: the same engine with and without drafts);
* ``mismatches`` (overall only, greedy runs): for each prompt that differs
  from hf-greedy, ``{"question_id", "turn", "position", "margin"}``: the first
  differing position and HF's own top-1 minus top-2 logit there (a near-tie
  is a small margin: the fast kernels sum in another order than HF's).

``limit`` is per category. Ctrl-C stops early and writes the partial report.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from specdec.engine import generate, histogram, prepare_input_ids
from specdec.kernels import LinearPlan

__all__ = ["load_questions", "run_bench", "BASELINES", "PLAIN"]

BASELINES = ("hf-greedy", "hf-prompt-lookup")
PLAIN = "none"
NAMED_SETS = {"spec-bench": "spec_bench.jsonl", "mt-bench": "mt_bench.jsonl", "longctx": "longctx.jsonl"}


JFLEG_PROMPT = "Correct the grammar and spelling of this sentence. Reply with the corrected sentence only.\n\n{}"


def jfleg_questions(root: str | Path | None = None, split: str = "test") -> str:
    """question.jsonl text for the JFLEG grammar-correction set, built from a local JFLEG checkout.

    JFLEG is CC BY-NC-SA 4.0, and the project's data notes mark it internal-only, so specdec does not ship
    it: ``--prompts jfleg`` reads ``$SPECDEC_JFLEG`` (a directory holding ``test.src``), else
    ``../shared/data/jfleg`` beside the working directory. Sentences are lightly detokenised (no space
    before punctuation) and wrapped in one fixed instruction.
    """
    import os
    import re

    candidates = [root] if root else [os.environ.get("SPECDEC_JFLEG"), "../shared/data/jfleg", "shared/data/jfleg"]
    for c in candidates:
        if c and (Path(c) / f"{split}.src").is_file():
            lines = (Path(c) / f"{split}.src").read_text().splitlines()
            break
    else:
        raise FileNotFoundError("the JFLEG set is not shipped (CC BY-NC-SA); point $SPECDEC_JFLEG at a directory holding "
                                f"{split}.src (the JFLEG corpus, github.com/keisks/jfleg)")
    out = []
    for i, line in enumerate(lines):
        text = re.sub(r" ([.,!?;:'])", r"\1", line.strip()).replace(" n't", "n't")
        if text:
            out.append(json.dumps({"question_id": i, "category": "grammar", "turns": [JFLEG_PROMPT.format(text)]}))
    return "\n".join(out)


def load_questions(name_or_path: str, *, limit: int | None = None, categories: list[str] | None = None) -> list[dict]:
    """Read question.jsonl (``question_id``, ``category``, ``turns``) by shipped name, ``jfleg``, or path.

    ``limit`` keeps the first K questions of each category.
    """
    if name_or_path == "jfleg":
        text, source = jfleg_questions(), "jfleg"
    elif name_or_path in NAMED_SETS:
        text = resources.files("specdec.data").joinpath(NAMED_SETS[name_or_path]).read_text()
        source = name_or_path
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist; give a question.jsonl path or one of {', '.join(NAMED_SETS)}")
        text, source = path.read_text(), str(path)
    questions = []
    for n, line in enumerate(text.split("\n"), 1):  # JSON lines end at "\n" only (not at U+2028)
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} line {n} is not JSON: {err}") from err
        if not isinstance(q.get("turns"), list) or not q["turns"] or "category" not in q:
            raise ValueError(f"{source} line {n} needs 'category' and a non-empty 'turns' list (question.jsonl format)")
        questions.append(q)
    if categories:
        known = {q["category"] for q in questions}
        unknown = set(categories) - known
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}; {source} has {sorted(known)}")
        questions = [q for q in questions if q["category"] in categories]
    if limit is not None:
        seen: dict[str, int] = {}
        kept = []
        for q in questions:
            seen[q["category"]] = seen.get(q["category"], 0) + 1
            if seen[q["category"]] <= limit:
                kept.append(q)
        questions = kept
    if not questions:
        raise ValueError(f"no questions selected from {source}")
    return questions


@dataclass
class _Run:
    """One method on one prompt."""

    drafter: str
    category: str
    new_tokens: int
    target_forwards: int
    wall_time_s: float
    token_ids: list[int]
    tokens_per_step: list[int] = field(default_factory=list)
    profile: dict = field(default_factory=dict)
    first_token_s: float = 0.0  # time to the first token (prefill included)
    prompt_tokens: int = 0


class _FirstToken:
    """A streamer for HF ``generate`` that notes when the first new token arrives (``put`` is called with the
    prompt first, then with each step's tokens)."""

    def __init__(self) -> None:
        self.calls, self.t0, self.at = 0, time.perf_counter(), 0.0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter() - self.t0

    def end(self) -> None:
        pass


class _ForwardCounter:
    """Counts the model's forward calls (for HF runs' target_forwards)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1


def _hf(model, ids, max_new_tokens, temperature, lookup, seed, counter) -> _Run:
    kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        torch.manual_seed(seed)
    if lookup:
        kwargs["prompt_lookup_num_tokens"] = 10
    counter.calls = 0
    first = _FirstToken()
    t0 = first.t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), streamer=first, **kwargs)
    wall = time.perf_counter() - t0
    new = out[0, ids.numel():].tolist()
    forwards = max(counter.calls - 1, 1)
    return _Run("hf-prompt-lookup" if lookup else "hf-greedy", "", len(new), forwards, wall, new,
                first_token_s=first.at or wall, prompt_tokens=ids.numel())


LLAMA_CPP = ("llama.cpp", "llama.cpp-prompt-lookup")  # the peer columns of --llama-cpp


class _LlamaCpp:
    """llama.cpp (llama-cpp-python) on the same GGUF: plain greedy, and its own prompt-lookup drafting
    (``LlamaPromptLookupDecoding``, 10 tokens, as HF's). Prompts go in as the same token ids; each run starts from
    an empty KV cache (no prefix kept from the previous prompt). Greedy only."""

    def __init__(self, gguf: str | Path, threads: int, n_ctx: int) -> None:
        try:
            import llama_cpp
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        except ImportError as err:
            raise ValueError("--llama-cpp needs llama-cpp-python (pip install llama-cpp-python); it is not installed") from err
        kw = dict(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.eos = None
        self.llms = {"llama.cpp": llama_cpp.Llama(**kw),  # drafting verifies against every position's logits:
                     "llama.cpp-prompt-lookup": llama_cpp.Llama(**kw, logits_all=True,
                                                                draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))}

    def run(self, method: str, ids, max_new_tokens: int) -> _Run:
        llm = self.llms[method]
        eos = llm.token_eos()
        calls = [0]
        evaluate = type(llm).eval

        def counted(tokens):
            calls[0] += 1
            return evaluate(llm, tokens)

        llm.eval = counted  # counts forwards (the prefill is one)
        try:
            llm.reset()
            new: list[int] = []
            first = None
            t0 = time.perf_counter()
            for tok in llm.generate(ids.tolist(), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
                if first is None:
                    first = time.perf_counter() - t0
                new.append(int(tok))
                if tok == eos or len(new) >= max_new_tokens:
                    break
            wall = time.perf_counter() - t0
        finally:
            del llm.eval
        return _Run(method, "", len(new), max(calls[0] - 1, 1), wall, new, first_token_s=first or wall,
                    prompt_tokens=ids.numel())


def _ours(model, tokenizer, ids, spec, max_new_tokens, temperature, seed, options) -> _Run:
    r = generate(model, tokenizer, ids, drafter=spec, max_new_tokens=max_new_tokens, temperature=temperature,
                 seed=seed if temperature > 0 else None, **options)
    s = r.stats
    return _Run(spec, "", s.new_tokens, s.target_forwards, s.wall_time_s, r.token_ids, list(s.tokens_per_step), s.profile.as_dict(),
                s.first_token_s, s.prompt_tokens)


def _metrics(runs: list[_Run], base: dict[str, dict[tuple, _Run]], keys: list[tuple]) -> dict:
    """Totals and ratios of one method over some prompts; ``base`` holds the baselines' runs by prompt key."""
    new = sum(r.new_tokens for r in runs)
    fwd = sum(r.target_forwards for r in runs)
    wall = sum(r.wall_time_s for r in runs)
    hf, plain = base["hf-greedy"], base.get(PLAIN, {})
    ttft = sum(r.first_token_s for r in runs)
    decode = sum(_decode_s(r) for r in runs)
    ttfts = sorted(r.first_token_s for r in runs)
    return {
        "prompts": len(runs),
        "new_tokens": new,
        "target_forwards": fwd,
        "mean_accepted_length": round(new / fwd, 4) if fwd else 0.0,
        "tokens_per_s": round(new / wall, 3) if wall else 0.0,
        "speedup_vs_hf_greedy": round(sum(hf[k].wall_time_s for k in keys) / wall, 4) if wall else 0.0,
        "speedup_vs_none": round(sum(plain[k].wall_time_s for k in keys) / wall, 4) if wall and plain else None,
        "identical_to_greedy": sum(1 for r, k in zip(runs, keys) if r.token_ids == hf[k].token_ids),
        "identical_to_plain": sum(1 for r, k in zip(runs, keys) if r.token_ids == plain[k].token_ids) if plain else None,
        "tokens_per_step_histogram": histogram([n for r in runs for n in r.tokens_per_step]),
        "wall_time_s": round(wall, 6),  # a tiny model's run takes ~10 ms: 4 decimals would be 1% of it
        # prefill and decoding apart: time to first token, and the tokens after it over the time after it
        "ttft_s_median": round(ttfts[len(ttfts) // 2], 4) if ttfts else 0.0,
        "prefill_tokens_per_s": round(sum(r.prompt_tokens for r in runs) / ttft, 1) if ttft else 0.0,
        "decode_tokens_per_s": round(sum(max(r.new_tokens - 1, 0) for r in runs) / decode, 3) if decode else 0.0,
        "decode_speedup_vs_hf_greedy": round(sum(_decode_s(hf[k]) for k in keys) / decode, 4) if decode else 0.0,
        "decode_speedup_vs_none": round(sum(_decode_s(plain[k]) for k in keys) / decode, 4) if decode and plain else None,
    }


def _decode_s(r: _Run) -> float:
    """A run's decoding time: its wall time after the first token."""
    return max(r.wall_time_s - r.first_token_s, 0.0)


def _profile(runs: list[_Run]) -> dict:
    total: dict[str, float] = {}
    for r in runs:
        for k, v in r.profile.items():
            total[k] = total.get(k, 0.0) + v
    s = sum(total.values()) or 1.0
    return {k: {"seconds": round(v, 4), "fraction": round(v / s, 4)} for k, v in total.items()}


@torch.inference_mode()
def _mismatches(model, runs: list[_Run], hf: dict[tuple, _Run], keys: list[tuple], prompts: dict[tuple, torch.Tensor]) -> list[dict]:
    """First difference from HF greedy per differing prompt, with HF's own top-1 / top-2 logit margin there."""
    out = []
    for r, k in zip(runs, keys):
        ref = hf[k].token_ids
        if r.token_ids == ref:
            continue
        pos = next((i for i, (a, b) in enumerate(zip(r.token_ids, ref)) if a != b), min(len(r.token_ids), len(ref)))
        context = torch.cat([prompts[k], torch.tensor(ref[:pos], dtype=torch.long)])
        logits = model(context[None].to(model.device)).logits[0, -1].float()
        top = torch.topk(logits, 2).values
        out.append({"question_id": k[0], "turn": k[1], "pass": k[2], "position": pos, "margin": round(float(top[0] - top[1]), 6)})
    return out


def run_bench(
    model, tokenizer, drafters: list[str], questions: list[dict], *, out_dir: str | Path, model_name: str,
    max_new_tokens: int = 128, temperature: float = 0.0, repeats: int = 1, profile: bool = False,
    multi_turn: bool = False, progress: bool = True, fast: bool = True, passes: int = 1, reuse_drafter: bool = False,
    size_trees: bool = True, node_budget: int = 0, llama_cpp: str | Path | None = None,
) -> dict:
    """Run the benchmark and write ``report.json``, ``report.md`` and plots into ``out_dir``; return the report.

    ``llama_cpp``: a GGUF file (the one the model was loaded from) to add llama.cpp's plain greedy and its
    prompt-lookup drafting as peer columns (``llama.cpp``, ``llama.cpp-prompt-lookup``; llama-cpp-python must be
    installed; greedy only). They run at the GGUF's own precision with activations quantized to 8 bits, so
    their outputs are not expected to equal HF greedy; the report gives how often the prompt-lookup column's
    output equals llama.cpp's own greedy (``identical_to_own_greedy``).

    ``passes`` runs the prompt set that many times (a repeated workload); with
    ``reuse_drafter`` each drafter spec is built once and kept across all
    prompts and passes, so drafters that learn from earlier outputs (``suffix``)
    get faster on the later passes. Each entry then has ``by_pass`` metrics.
    ``size_trees=False`` drafts every tree at the size its spec gives instead of the size that pays on this
    machine's measured cost; ``node_budget=N`` cuts every drafter's
    tree to its N best nodes by its own scores (τ at one budget; the timings then say nothing about speed).
    """
    from specdec.drafters import build_drafter

    for spec in drafters:
        build_drafter(spec)  # bad specs fail before any model work
    if repeats < 1 or passes < 1:
        raise ValueError("repeats and passes must be >= 1")
    if llama_cpp is not None and temperature > 0:
        raise ValueError("--llama-cpp compares greedy decoding only; use --temperature 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    options = {"fast": fast, "size_trees": size_trees, "node_budget": node_budget}
    cost = _cost_profile(model, fast)
    items = [((qid, turn, p), cat, ids) for p in range(passes) for (qid, turn), cat, ids in _prompts(tokenizer, questions, multi_turn, model, max_new_tokens)]
    ours = list(drafters) if PLAIN in drafters else [PLAIN] + list(drafters)
    kept = {spec: build_drafter(spec) for spec in ours} if reuse_drafter else {}
    longest = max((ids.numel() for _, _, ids in items), default=0)
    peer = _LlamaCpp(llama_cpp, torch.get_num_threads(), n_ctx=longest + max_new_tokens + 16) if llama_cpp is not None else None
    methods = list(BASELINES) + (list(LLAMA_CPP) if peer else []) + ours
    options["peer"] = peer
    counter = _ForwardCounter(model)
    runs: dict[str, list[_Run]] = {m: [] for m in methods}
    keys: list[tuple] = []
    partial = False
    try:
        _warm_up(model, tokenizer, methods, items[0][2], temperature, counter, options)
        bar = _progress(len(items), progress)
        for i, (key, category, ids) in enumerate(items):
            order = methods[i % len(methods):] + methods[: i % len(methods)]  # rotate to spread drift
            for method in order:
                reps = [_one(model, tokenizer, method, ids, max_new_tokens, temperature, 1000 * i + r, counter, options, kept.get(method))
                        for r in range(repeats)]
                best = reps[0]
                best.wall_time_s = statistics.median(r.wall_time_s for r in reps)
                best.category = category
                runs[method].append(best)
            keys.append(key)
            if bar is not None:
                first = drafters[0] if drafters else PLAIN
                base = {b: dict(zip(keys, runs[b])) for b in ("hf-greedy", PLAIN)}
                m = _metrics(runs[first], base, keys)
                bar.set_postfix_str(f"{first}: tau {m['mean_accepted_length']:.2f}, {m['speedup_vs_hf_greedy']:.2f}x HF, "
                                    f"{m['speedup_vs_none']:.2f}x none")
                bar.update(1)
        if bar is not None:
            bar.close()
    except KeyboardInterrupt:
        partial = True
        n = len(keys)
        for m in methods:
            runs[m] = runs[m][:n]
        print(f"\ninterrupted: writing a partial report over the {n} prompts finished", flush=True)
    finally:
        counter.handle.remove()
    prompts = {k: ids for k, _, ids in items}
    report = _report(model, model_name, methods, runs, keys, prompts, max_new_tokens, temperature, profile, partial, fast, cost)
    report.update(passes=passes, reuse_drafter=reuse_drafter, size_trees=size_trees, node_budget=node_budget)
    _write(report, out)
    return report


def _cost_profile(model, fast: bool) -> dict | None:
    """The cost profile the engine sizes trees with (measured now if this machine has none cached)."""
    if not isinstance(model, torch.nn.Module):
        return None
    from specdec.profile import get_profile
    from specdec.tree_attention.hf import resolve_backend

    return get_profile(model, fast=fast, attn=resolve_backend("auto", model.device)).as_dict()


def _one(model, tokenizer, method, ids, max_new_tokens, temperature, seed, counter, options, drafter=None) -> _Run:
    """One run of ``method``; ``drafter``, when given, is the kept instance to draft with (``--reuse-drafter``)."""
    if method in BASELINES:
        return _hf(model, ids, max_new_tokens, temperature, method == "hf-prompt-lookup", seed, counter)
    options = dict(options)
    peer = options.pop("peer", None)
    if method in LLAMA_CPP:
        return peer.run(method, ids, max_new_tokens)
    run = _ours(model, tokenizer, ids, drafter if drafter is not None else method, max_new_tokens, temperature, seed, options)
    run.drafter = method
    return run


def _warm_up(model, tokenizer, methods, ids, temperature, counter, options) -> None:
    for method in methods:
        _one(model, tokenizer, method, ids, 8, temperature, 0, counter, options)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="bench", unit="prompt")


def _prompts(tokenizer, questions, multi_turn, model, max_new_tokens) -> list[tuple]:
    """[(key, category, [T] ids)]; later turns carry the earlier turns' HF-greedy answers as history."""
    items = []
    for q in questions:
        history: list[dict] = []
        turns = q["turns"] if multi_turn else q["turns"][:1]
        for t, turn in enumerate(turns):
            history.append({"role": "user", "content": turn})
            use_chat = getattr(tokenizer, "chat_template", None) is not None
            ids = prepare_input_ids(tokenizer, list(history) if use_chat else turn)
            items.append(((q.get("question_id"), t), q["category"], ids))
            if t + 1 < len(turns):
                with torch.inference_mode():
                    ans = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), do_sample=False, max_new_tokens=max_new_tokens)
                history.append({"role": "assistant", "content": tokenizer.decode(ans[0, ids.numel():], skip_special_tokens=True)})
    return items


def _report(model, model_name, methods, runs, keys, prompts, max_new_tokens, temperature, profile, partial, fast, cost) -> dict:
    import specdec

    base = {b: dict(zip(keys, runs[b])) for b in ("hf-greedy", PLAIN)}
    entries = []
    for m in methods:
        rs = runs[m]
        cats: dict[str, list[int]] = {}
        for i, r in enumerate(rs):
            cats.setdefault(r.category, []).append(i)
        overall = _metrics(rs, base, keys[: len(rs)])
        if temperature == 0:
            overall["mismatches"] = _mismatches(model, rs, base["hf-greedy"], keys[: len(rs)], prompts)
        if m == "llama.cpp-prompt-lookup":
            overall["identical_to_own_greedy"] = sum(r.token_ids == g.token_ids for r, g in zip(rs, runs["llama.cpp"]))
        entry = {
            "drafter": m,
            "overall": overall,
            "by_category": {c: _metrics([rs[i] for i in idx], base, [keys[i] for i in idx]) for c, idx in cats.items()},
        }
        passes = sorted({k[2] for k in keys[: len(rs)]})
        if len(passes) > 1:
            entry["by_pass"] = {str(p + 1): _metrics([r for r, k in zip(rs, keys) if k[2] == p], base, [k for k in keys[: len(rs)] if k[2] == p])
                                for p in passes}
        if profile and m not in BASELINES and m not in LLAMA_CPP:
            entry["profile"] = _profile(rs)
            for c, idx in cats.items():  # the draft's share of decoding per category too
                entry["by_category"][c]["draft_share"] = _profile([rs[i] for i in idx]).get("draft", {}).get("fraction", 0.0)
        entries.append(entry)
    return {
        "model": model_name,
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "max_new_tokens": max_new_tokens,
        "temperature": float(temperature),
        "specdec_version": specdec.__version__,
        "fast": fast,
        "cost_profile": cost,
        "partial": partial,
        "runs": entries,
    }


def _write(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plots = _plots(report, out)
    (out / "report.md").write_text(_markdown(report, plots))


def _trees(report: dict) -> str:
    if report.get("node_budget"):
        return f"cut to the {report['node_budget']} best nodes by each drafter's scores (τ at one budget; timings not a speed claim)"
    return "sized to the measured cost" if report.get("size_trees", True) else "at their spec size"


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def _markdown(report: dict, plots: list[str]) -> str:
    lines = [
        f"# specdec bench: {report['model']}",
        "",
        f"device {report['device']}, {report['dtype']}, {report['threads']} threads, max_new_tokens {report['max_new_tokens']}, "
        f"temperature {report['temperature']}, fast kernels {'on' if report['fast'] else 'off'}, "
        f"trees {_trees(report)}, specdec {report['specdec_version']}"
        + (" — **partial (interrupted)**" if report["partial"] else ""),
        "",
        "τ = new tokens per target forward; speed-up = Σ baseline wall time / Σ wall time over the same prompts "
        "(baselines: HF `generate` greedy, and specdec's own plain decoding `none`); identical = prompts whose output "
        "equals HF greedy / specdec's plain decoding token for token; near-ties = prompts that differ from HF greedy, "
        "with the largest HF top-1 − top-2 logit margin at a first difference.",
        "",
        "## Overall",
        "",
        "| drafter | prompts | τ | tokens/s | vs HF greedy | vs none | identical HF | identical plain | differ from HF (max margin) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report["runs"]:
        m = e["overall"]
        mism = m.get("mismatches")
        differ = "–" if mism is None else (f"{len(mism)} ({max(x['margin'] for x in mism):.3g})" if mism else "0")
        lines.append(f"| {e['drafter']} | {m['prompts']} | {m['mean_accepted_length']:.2f} | {m['tokens_per_s']:.1f} | "
                     f"{m['speedup_vs_hf_greedy']:.2f}× | {_fmt(m['speedup_vs_none'], '.2f', '×')} | "
                     f"{m['identical_to_greedy']}/{m['prompts']} | {_fmt(m['identical_to_plain'], 'd')}/{m['prompts']} | {differ} |")
    for e in report["runs"]:
        if "identical_to_own_greedy" in e["overall"]:
            m = e["overall"]
            lines += ["", f"`{e['drafter']}` equals llama.cpp's own plain greedy on {m['identical_to_own_greedy']}/{m['prompts']} "
                      "prompts. The llama.cpp columns run the GGUF's own precision with 8-bit activations (the others run the "
                      "dequantized fp32 model), so their differences from HF greedy are not near-ties of one model."]
    if all("ttft_s_median" in e["overall"] for e in report["runs"]):
        lines += ["", "## Prefill and decoding apart", "",
                  "Time to first token (median over prompts; the prefill and what precedes it) and prompt tokens per second "
                  "of it; decoding = the tokens after the first over the time after it, with its speed-ups on the same "
                  "baselines.", "",
                  "| drafter | TTFT p50 | prefill tokens/s | decode tokens/s | decode vs HF greedy | decode vs none |",
                  "|---|---|---|---|---|---|"]
        for e in report["runs"]:
            m = e["overall"]
            lines.append(f"| {e['drafter']} | {m['ttft_s_median'] * 1e3:.0f} ms | {m['prefill_tokens_per_s']:.0f} | "
                         f"{m['decode_tokens_per_s']:.1f} | {m['decode_speedup_vs_hf_greedy']:.2f}× | "
                         f"{_fmt(m['decode_speedup_vs_none'], '.2f', '×')} |")
    passed = [e for e in report["runs"] if "by_pass" in e]
    if passed:
        ps = sorted(passed[0]["by_pass"], key=int)
        lines += ["", f"## By pass (the prompt set {len(ps)} times{', one drafter kept throughout' if report.get('reuse_drafter') else ''}: "
                  "τ / speed-up vs HF greedy / speed-up vs none)", "", "| drafter | " + " | ".join(f"pass {p}" for p in ps) + " |",
                  "|---|" + "---|" * len(ps)]
        for e in passed:
            cells = [f"{m['mean_accepted_length']:.2f} / {m['speedup_vs_hf_greedy']:.2f}× / {_fmt(m['speedup_vs_none'], '.2f', '×')}"
                     for m in (e["by_pass"][p] for p in ps)]
            lines.append(f"| {e['drafter']} | " + " | ".join(cells) + " |")
    cats = sorted({c for e in report["runs"] for c in e["by_category"]})

    def by_category(title: str, cell) -> None:
        nonlocal lines
        lines += ["", f"## {title}", "", "| drafter | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
        for e in report["runs"]:
            lines.append(f"| {e['drafter']} | " + " | ".join(cell(e["by_category"][c]) if c in e["by_category"] else "–" for c in cats) + " |")

    by_category("By category (τ / speed-up vs HF greedy / speed-up vs none)",
                lambda m: f"{m['mean_accepted_length']:.2f} / {m['speedup_vs_hf_greedy']:.2f}× / {_fmt(m['speedup_vs_none'], '.2f', '×')}")
    by_category("Decoding by category (decode tokens/s / decode speed-up vs none / draft share of decode time)",
                lambda m: f"{m['decode_tokens_per_s']:.1f} / {_fmt(m['decode_speedup_vs_none'], '.2f', '×')}"
                          + (f" / {m['draft_share'] * 100:.0f}%" if "draft_share" in m else ""))
    profiled = [e for e in report["runs"] if "profile" in e]
    if profiled:
        lines += ["", "## Where the decode time goes (share of decode-step time)", "", "| drafter | draft | forward | accept | commit | other |", "|---|---|---|---|---|---|"]
        for e in profiled:
            p = e["profile"]
            lines.append(f"| {e['drafter']} | " + " | ".join(f"{p.get(k, {}).get('fraction', 0) * 100:.1f}%" for k in ("draft", "forward", "accept", "commit", "other")) + " |")
    cost = report.get("cost_profile")
    if cost:
        ns = sorted(cost["v"], key=int)
        from specdec.profile import _piecewise

        plan = LinearPlan(cost["linear_plan"])  # a row count between two measured buckets uses the next one up
        lines += ["", f"## Cost profile used (plain step {cost['step_ms']:.1f} ms)", "",
                  "| n nodes | " + " | ".join(ns) + " |", "|---|" + "---|" * len(ns),
                  "| v(n) | " + " | ".join(f"{cost['v'][n]:.2f}" for n in ns) + " |",
                  "| linear kernel | " + " | ".join(plan.for_rows(int(n)) for n in ns) + " |"]
        for length, curve in sorted((cost.get("curves") or {}).items(), key=lambda kv: int(kv[0])):  # specdec profile --prefixes
            v = {int(k): x for k, x in curve["v"].items()}
            lines.append(f"| v(n) after {length} tokens ({curve['step_ms']:.1f} ms a step) | "
                         + " | ".join(f"{_piecewise(sorted(v.items()), int(n)):.2f}" for n in ns) + " |")
        if cost.get("curves"):
            lines += ["", "Each step's tree was sized with the curve for its own prefix length (linear between the measured "
                      "lengths; the first row is the curve after 128 tokens)."]
    for name in plots:
        lines += ["", f"![{name}]({name})"]
    return "\n".join(lines) + "\n"


def _plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [e for e in report["runs"] if e["drafter"] != "hf-greedy"]
    cats = sorted({c for e in report["runs"] for c in e["by_category"]})
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cats) + 2), 4))
    width = 0.8 / max(1, len(runs))
    for j, e in enumerate(runs):
        vals = [e["by_category"].get(c, {}).get("speedup_vs_hf_greedy", 0) for c in cats]
        ax.bar([i + j * width for i in range(len(cats))], vals, width, label=e["drafter"])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats, rotation=30, ha="right")
    ax.set_ylabel("speed-up vs HF greedy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=110)
    plt.close(fig)

    ours = [e for e in report["runs"] if e["overall"]["tokens_per_step_histogram"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for e in ours:
        h = e["overall"]["tokens_per_step_histogram"]
        total = sum(h.values())
        xs = sorted(int(k) for k in h)
        ax.plot(xs, [h[str(x)] / total for x in xs], marker="o", label=e["drafter"])
    ax.set_xlabel("tokens emitted per target forward")
    ax.set_ylabel("fraction of steps")
    if ours:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accepted_lengths.png", dpi=110)
    plt.close(fig)
    return ["speedup.png", "accepted_lengths.png"]


# --------------------------------------------------------------------------- throughput at batch > 1
def _hf_batch(model, tokenizer, batch: list, max_new_tokens: int) -> tuple[int, float]:
    """HF batched greedy (left padding); returns (new tokens, wall seconds)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(ids.numel() for ids in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, width - x.numel() :], mask[i, width - x.numel() :] = x, 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad)
    wall = time.perf_counter() - t0
    new = out[:, width:]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()
    count = 0
    for row in new.tolist():  # tokens up to and including the first EOS, as generate() counts them
        n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        count += n
    return count, wall


def run_throughput(model, tokenizer, drafters: list[str], questions: list[dict], *, out_dir: str | Path, model_name: str,
                   batch_sizes: list[int], max_new_tokens: int = 64, fast: bool = True, progress: bool = True) -> dict:
    """Tokens per second at each batch size: HF batched greedy (``hf-greedy``), specdec's plain decoding
    (``none``) and each drafter, over the same prompts in groups of B (the last, short group dropped).

    Every method runs each group once, interleaved, after one warm-up group; tokens/s = Σ new tokens / Σ wall time.
    """
    from specdec.drafters import build_drafter

    for spec in drafters:
        build_drafter(spec)
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("batch sizes must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = [ids for _, _, ids in _prompts(tokenizer, questions, False, model, max_new_tokens)]
    methods = ["hf-greedy"] + ([PLAIN] if PLAIN not in drafters else []) + list(drafters)
    rows = []
    bar = _progress(sum(len(items) // b for b in batch_sizes), progress)
    for b in batch_sizes:
        groups = [items[i : i + b] for i in range(0, len(items) - b + 1, b)]
        if not groups:
            raise ValueError(f"batch size {b} is larger than the {len(items)} prompts selected")
        totals = {m: [0, 0.0] for m in methods}
        for gi, group in enumerate([groups[0]] + groups):  # the first pass over group 0 warms up
            for m in methods[gi % len(methods):] + methods[: gi % len(methods)]:
                if m == "hf-greedy":
                    n, wall = _hf_batch(model, tokenizer, group, max_new_tokens)
                else:
                    t0 = time.perf_counter()
                    res = generate(model, tokenizer, group if b > 1 else group[0], drafter=m, max_new_tokens=max_new_tokens, fast=fast)
                    wall = time.perf_counter() - t0
                    n = sum(r.stats.new_tokens for r in (res if isinstance(res, list) else [res]))
                if gi:
                    totals[m][0] += n
                    totals[m][1] += wall
            if gi and bar is not None:
                bar.update(1)
        base = totals["hf-greedy"][0] / totals["hf-greedy"][1]
        for m in methods:
            tps = totals[m][0] / totals[m][1]
            rows.append({"method": m, "batch_size": b, "groups": len(groups), "new_tokens": totals[m][0],
                         "wall_time_s": round(totals[m][1], 6), "tokens_per_s": round(tps, 3), "vs_hf_greedy": round(tps / base, 4)})
    if bar is not None:
        bar.close()
    import specdec

    report = {"model": model_name, "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
              "threads": torch.get_num_threads(), "max_new_tokens": max_new_tokens, "fast": fast,
              "specdec_version": specdec.__version__, "throughput": rows}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    sizes = sorted({r["batch_size"] for r in rows})
    lines = [f"# specdec throughput: {report['model']}", "",
             f"device {report['device']}, {report['dtype']}, {report['threads']} threads, max_new_tokens {max_new_tokens}; "
             "tokens/s = Σ new tokens / Σ wall time over the same groups of prompts (× HF batched greedy at that batch size).", "",
             "| method | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for m in methods:
        cells = [next(f"{r['tokens_per_s']:.1f} tok/s ({r['vs_hf_greedy']:.2f}×)" for r in rows if r["method"] == m and r["batch_size"] == b) for b in sizes]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return report
