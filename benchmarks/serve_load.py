"""Load benchmark for `specdec serve` (and llama.cpp's OpenAI server on the same model), loopback only.

For each server setting it starts the server on 127.0.0.1, then for each concurrency level runs a bounded
number of streamed greedy chat completions (each client sends its next request as soon as its last one ends)
and reports aggregate tokens/s, p50/p95 time to first token (TTFT) and inter-token latency (ITL: a request's
decode time over its tokens after the first). Every server is stopped by its PID.

    python benchmarks/serve_load.py --out docs/bench/serve-load --clients 1 4 16 --requests 16 --max-tokens 64

Settings (`--modes`): `adaptive` (prompt lookup, trees sized jointly from the measured batch cost),
`off` (drafter none: plain batched decoding), `always` (prompt lookup, trees verified whole), and
`llama.cpp` (`python -m llama_cpp.server` on the default model's own GGUF, when llama-cpp-python is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

MODES = {
    "adaptive": ["--drafter", "prompt-lookup"],
    "off": ["--drafter", "none"],
    "always": ["--drafter", "prompt-lookup", "--no-size-trees"],
}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def prompts(path: Path, n: int) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line)["turns"][0])
    # spread over categories: every k-th question
    step = max(1, len(out) // n)
    return [out[i] for i in range(0, len(out), step)][:n]


def start(mode: str, port: int, max_batch: int, log: Path, threads: int) -> tuple[subprocess.Popen, str]:
    if mode == "llama.cpp":
        from specdec.models import _resolve

        gguf = str(_resolve("default"))
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
               "--n_threads", str(threads), "--n_ctx", "4096", "--model_alias", "default",
               "--interrupt_requests", "False"]  # queue concurrent requests (the default interrupts the running one)
    else:
        cmd = [sys.executable, "-m", "specdec.cli", "serve", "--model", "default", "--port", str(port), "--max-batch", str(max_batch),
               "--log-level", "warning", *MODES[mode]]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, base: str, timeout: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        for path in ("/health", "/v1/models"):
            try:
                if httpx.get(base + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.5)
    raise TimeoutError("the server did not come up")


def one_request(client, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    usage = None
    text = []
    stream = client.chat.completions.create(model="default", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else now
            last = now
            chunks += 1
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    tokens = usage.completion_tokens if usage else chunks
    return {"ttft": (first or time.perf_counter()) - t0, "decode_s": (last - first) if first else 0.0, "tokens": tokens,
            "end": time.perf_counter(), "text": "".join(text)}


def run_load(base: str, questions: list[str], clients: int, requests: int, max_tokens: int, time_limit: float) -> dict:
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
    queue = list(range(requests))
    lock = threading.Lock()
    results: list[dict] = []
    t_start = time.perf_counter()

    def worker() -> None:
        while True:
            with lock:
                if not queue or time.perf_counter() - t_start > time_limit:
                    return
                i = queue.pop(0)
            r = one_request(client, questions[i % len(questions)], max_tokens)
            r["index"] = i
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - t_start
    tokens = sum(r["tokens"] for r in results)
    itl = [r["decode_s"] / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    ttft = sorted(r["ttft"] for r in results)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")

    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "ttft_p50_s": round(pct(ttft, 0.5), 3), "ttft_p95_s": round(pct(ttft, 0.95), 3),
            "itl_p50_ms": round(1e3 * pct(sorted(itl), 0.5), 2), "itl_p95_ms": round(1e3 * pct(sorted(itl), 0.95), 2),
            "texts": {r["index"]: r["text"] for r in results}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for report.json and report.md")
    ap.add_argument("--modes", nargs="+", default=["adaptive", "off", "always", "llama.cpp"], choices=[*MODES, "llama.cpp"])
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=300, help="seconds per load level; no new request starts after it")
    ap.add_argument("--prompts", default=str(Path(__file__).resolve().parent.parent / "specdec" / "data" / "spec_bench.jsonl"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    questions = prompts(Path(args.prompts), max(args.requests, 16))
    report = {"host": _cpu(), "args": vars(args), "results": {}}
    for mode in args.modes:
        if mode == "llama.cpp":
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                print("llama.cpp: llama-cpp-python is not installed (pip install 'llama-cpp-python[server]'); skipped", file=sys.stderr)
                report["results"][mode] = "not installed"
                continue
        port = free_port()
        proc, base = start(mode, port, args.max_batch, out / f"{mode}.log", threads=os.cpu_count() or 2)
        try:
            wait_ready(proc, base)
            run_load(base, questions, 1, 1, 8, 60)  # warm-up (first-call costs)
            rows = []
            for c in args.clients:
                r = run_load(base, questions, c, args.requests, args.max_tokens, args.time_limit)
                print(f"{mode:>9} clients {c:>2}: {r['tokens_per_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50_s']:.2f}s p95 {r['ttft_p95_s']:.2f}s  "
                      f"ITL p50 {r['itl_p50_ms']:.1f}ms p95 {r['itl_p95_ms']:.1f}ms", file=sys.stderr)
                rows.append(r)
            report["results"][mode] = rows
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    _identical(report)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


def _identical(report: dict) -> None:
    """Whether each specdec setting's answers equal the `off` setting's (greedy, so they must)."""
    base = report["results"].get("off")
    if not isinstance(base, list):
        return
    for mode, rows in report["results"].items():
        if not isinstance(rows, list) or mode == "llama.cpp":  # another precision (the GGUF's own): not comparable
            continue
        for r, b in zip(rows, base):
            same = [r["texts"][k] == b["texts"].get(k) for k in r["texts"] if k in b["texts"]]
            r["identical_to_off"] = f"{sum(same)}/{len(same)}"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return "unknown"


def _markdown(report: dict) -> str:
    lines = [f"Host: {report['host']}", "", "| setting | clients | requests | tokens/s | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 | same as off |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, rows in report["results"].items():
        if not isinstance(rows, list):
            lines.append(f"| {mode} | {rows} |")
            continue
        for r in rows:
            lines.append(f"| {mode} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} s | {r['ttft_p95_s']:.2f} s | "
                         f"{r['itl_p50_ms']:.1f} ms | {r['itl_p95_ms']:.1f} ms | {r.get('identical_to_off', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
