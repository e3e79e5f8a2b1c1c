"""The measured cost of a forward over n tree nodes, per model, dtype, device and thread count.

``v(n)`` is the wall time of one target forward over n new tree nodes,
divided by the time of a plain single-token step, on this machine, through
the engine's own forward (fast kernels on or off). Every drafter's tree size
comes from it (:mod:`specdec.sizing`): a tree of n nodes is worth drafting
only where its expected accepted tokens per unit of ``v(n)`` beat a plain
step.

A profile also carries the linear-kernel plan measured with it
(:mod:`specdec.kernels`). Both are cached as JSON under
``$SPECDEC_CACHE/profiles/``, keyed by the model's architecture (its config,
not its weights: speed does not depend on the values), dtype, device, thread
count, fast on/off and the torch / transformers / specdec versions. Generation
loads the cached profile or measures one (a few seconds).

The prefix used when measuring is ``PREFIX`` tokens: attention over the
prefix is a small part of a step at the lengths this library targets; the
curve is re-measured only when the key changes. On long inputs it is not: a
plain step reads the whole KV cache, so it is dearer and extra tree nodes are
relatively cheaper. ``specdec profile --prefixes 1024 4096 8192`` (or
:func:`add_prefix_curves`) measures the curve again after prefixes of those
lengths and keeps them in the same cached profile (``curves``); generation
then sizes each step's tree with the curve for its own prefix length
(:class:`ContextCost`: linear between the measured lengths). Long prefixes
take a while to measure (the prefill of each), so they are measured only when
asked for, never on a generation's first use.
"""

from __future__ import annotations

import hashlib
import logging
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from specdec.kernels import FastLinears, LinearPlan, fast_linears, measure_plan
from specdec.quant import quant_summary
from specdec.tree import TokenTree

log = logging.getLogger("specdec")
__all__ = ["BatchCostProfile", "CostProfile", "ContextCost", "add_prefix_curves", "NODE_COUNTS", "get_batch_profile", "measure_batch_profile", "measure_profile", "load_profile",
           "profile_key", "fast_linears_for"]

# Dense where CPU trees live: measured on the 2-core Xeon, v(2) = 1.02 but v(3) = 1.15 (the products leave the
# memory-bound regime at 3-4 rows), which an interpolation between 2 and 4 misses by a third of the step.
NODE_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
PREFIX = 128
FORMAT = 5  # 3: NODE_COUNTS with 3, 6, 12, 24, 48; 4: the rows-avx512 kernel among the candidates; 5: measured through
# the batched runner generation uses (older profiles re-measure)


@dataclass
class CostProfile:
    """One model's forward cost curve on one machine.

    Attributes:
        step_ms: median wall time of a plain single-token step.
        v: ``{n: cost of a forward over n nodes in plain steps}`` (``v[1] == 1``).
        linear_plan: the linear kernels per row count (``{"1": "torch", "8": "mkl-packed", ...}``).
        linear_invariant: the plan's kernel gives bit-identical rows for any row count up to 64
            (a tree node's logits then equal the plain step's; see :func:`specdec.kernels.measure_plan`).
        key: what the profile was measured for (model, dtype, device, threads, fast, versions).
        measured_s: how long the measurement took.
    """

    step_ms: float
    v: dict[int, float]
    linear_plan: dict[str, str] = field(default_factory=dict)
    linear_invariant: bool = False
    key: dict = field(default_factory=dict)
    measured_s: float = 0.0
    format: int = FORMAT
    curves: dict[int, dict] = field(default_factory=dict)  # {prefix length: {"step_ms": ms, "v": {n: v}}} past PREFIX

    def __post_init__(self) -> None:
        self.v = {int(k): round(float(x), 4) for k, x in self.v.items()}  # the precision the cache file keeps
        self.step_ms = round(float(self.step_ms), 3)
        self.curves = {int(k): {"step_ms": round(float(c["step_ms"]), 3), "v": {int(n): round(float(x), 4) for n, x in c["v"].items()}}
                       for k, c in sorted(self.curves.items())}

    def _bracket(self, prefix: int) -> tuple[tuple[float, dict], tuple[float, dict], float]:
        """The measured curves either side of ``prefix`` ((step_ms, v) each) and the weight of the upper one."""
        pts = [(PREFIX, self.step_ms, self.v)] + [(k, c["step_ms"], c["v"]) for k, c in self.curves.items() if k > PREFIX]
        if prefix <= pts[0][0] or len(pts) == 1:
            return pts[0][1:], pts[0][1:], 0.0
        for lo, hi in zip(pts, pts[1:]):
            if prefix <= hi[0]:
                return lo[1:], hi[1:], (prefix - lo[0]) / (hi[0] - lo[0])
        return pts[-1][1:], pts[-1][1:], 0.0  # past the longest measured prefix: its curve

    def step_ms_at(self, prefix: int) -> float:
        """A plain step's wall time after ``prefix`` committed tokens (the measured lengths, linear between)."""
        (s0, _), (s1, _), w = self._bracket(prefix)
        return s0 + w * (s1 - s0)

    def cost_at(self, n: int, prefix: int) -> float:
        """v(n) after ``prefix`` committed tokens, in plain steps at that prefix: the curves of the measured
        lengths either side, weighted linearly (each curve's own plain step is its unit, so the weighting is done
        in milliseconds and divided by the interpolated step)."""
        if not self.curves or prefix <= PREFIX:
            return self.cost(n)
        (s0, v0), (s1, v1), w = self._bracket(prefix)
        ms = (1 - w) * s0 * _piecewise(sorted(v0.items()), n) + w * s1 * _piecewise(sorted(v1.items()), n)
        return ms / (s0 + w * (s1 - s0))

    def cost(self, n: int) -> float:
        """v(n) for any n >= 1: linear between measured points, linear extrapolation past the last two.

        Drafters and the trim ask for the same few dozen n on every step, so each answer is kept (the memo
        is rebuilt when ``v`` is replaced)."""
        memo = self.__dict__.get("_memo")
        if memo is None or memo[0] is not self.v:
            memo = self.__dict__["_memo"] = (self.v, {})
        value = memo[1].get(n)
        if value is None:
            value = memo[1][n] = self._interpolate(n)
        return value

    def _interpolate(self, n: int) -> float:
        return _piecewise(sorted(self.v.items()), n)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["v"] = {str(k): x for k, x in sorted(self.v.items())}
        d["curves"] = {str(k): {"step_ms": c["step_ms"], "v": {str(n): x for n, x in sorted(c["v"].items())}}
                       for k, c in sorted(self.curves.items())}
        return d

    def table(self) -> str:
        """A small text table of the curve (and one row per longer prefix measured)."""
        head = "| n | " + " | ".join(str(n) for n in sorted(self.v)) + " |"
        sep = "|---|" + "---|" * len(self.v)
        ms = "| ms | " + " | ".join(f"{self.v[n] * self.step_ms:.1f}" for n in sorted(self.v)) + " |"
        vs = "| v(n) | " + " | ".join(f"{self.v[n]:.2f}" for n in sorted(self.v)) + " |"
        rows = [head, sep, ms, vs]
        for k, c in sorted(self.curves.items()):
            rows.append(f"| v(n) after {k} ({c['step_ms']:.1f} ms a step) | "
                        + " | ".join(f"{_piecewise(sorted(c['v'].items()), n):.2f}" for n in sorted(self.v)) + " |")
        if self.curves:
            rows[2:3] = [ms.replace("| ms |", f"| ms after {PREFIX} |")]
            rows[3] = vs.replace("| v(n) |", f"| v(n) after {PREFIX} |")
        return "\n".join(rows)


class ContextCost:
    """v(n) at the current prefix length (:meth:`CostProfile.cost_at`): what the engine hands the trim and the
    drafters when a profile holds curves for long prefixes. The engine sets ``prefix`` before each step (in a
    batch, the longest row's)."""

    def __init__(self, profile: CostProfile) -> None:
        self.profile, self.prefix = profile, PREFIX
        self._memo: dict[tuple[int, int], float] = {}

    def __call__(self, n: int) -> float:
        key = (n, self.prefix // 64)  # steps a few tokens apart share one answer
        value = self._memo.get(key)
        if value is None:
            if len(self._memo) > 4096:
                self._memo.clear()
            value = self._memo[key] = self.profile.cost_at(n, self.prefix)
        return value

    @property
    def step_ms(self) -> float:
        return self.profile.step_ms_at(self.prefix)


def _piecewise(pts: list[tuple[int, float]], x: float) -> float:
    """Linear between measured points, flat before the first, linear extrapolation past the last two."""
    if x <= pts[0][0] or len(pts) == 1:
        return pts[0][1] if x <= pts[0][0] else pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    return y1 + (y1 - y0) * (x - x1) / (x1 - x0)


# --------------------------------------------------------------------------- batches: v(B, n)
BATCH_ROWS = (1, 2, 4, 8, 16)
BATCH_NODES = (1, 2, 4, 8, 16)
BATCH_FORMAT = 1


@dataclass
class BatchCostProfile:
    """The cost of one batched forward over B rows of n tree nodes each, in plain single-row steps.

    Measured over rows × nodes (not extrapolated from one row: a forward over 16 rows of 4 nodes is not a
    forward over 64 nodes of one row; the rows' attention and padding differ). ``v[B][n]``, ``v[1][1] == 1``.
    Cached beside the single-row profile (``$SPECDEC_CACHE/profiles``), keyed the same way.
    """

    step_ms: float
    v: dict[int, dict[int, float]]
    key: dict = field(default_factory=dict)
    measured_s: float = 0.0
    format: int = BATCH_FORMAT

    def __post_init__(self) -> None:
        self.v = {int(b): {int(n): round(float(x), 4) for n, x in row.items()} for b, row in self.v.items()}
        self.step_ms = round(float(self.step_ms), 3)

    def cost(self, rows: int, nodes: int) -> float:
        """v(B, n) for any B, n >= 1: piecewise linear in n for each measured B, then in B (extrapolated past
        the last two measured points in either direction)."""
        memo = self.__dict__.setdefault("_memo", {})
        value = memo.get((rows, nodes))
        if value is None:
            per_rows = [(b, _piecewise(sorted(self.v[b].items()), nodes)) for b in sorted(self.v)]
            value = memo[(rows, nodes)] = _piecewise(per_rows, rows)
        return value

    def as_dict(self) -> dict:
        d = asdict(self)
        d["v"] = {str(b): {str(n): x for n, x in sorted(row.items())} for b, row in sorted(self.v.items())}
        return d

    def table(self) -> str:
        nodes = sorted(next(iter(self.v.values())))
        lines = ["| rows \\ nodes | " + " | ".join(str(n) for n in nodes) + " |", "|---|" + "---|" * len(nodes)]
        lines += [f"| {b} | " + " | ".join(f"{self.v[b][n]:.2f}" for n in nodes) + " |" for b in sorted(self.v)]
        return "\n".join(lines)


@torch.inference_mode()
def measure_batch_profile(model, *, fast: bool = True, attn: str = "torch", linears: FastLinears | None = None, repeats: int = 3,
                          rows=BATCH_ROWS, nodes=BATCH_NODES, progress: Callable[[str], None] | None = None) -> BatchCostProfile:
    """Measure v(B, n) through the batched forward (every row after a ``PREFIX``-token prefix, trees shaped
    like drafters' trees), rows × nodes interleaved within each repeat; medians count."""
    from specdec.batch import BatchKVCache, BatchRunner
    from specdec.cache import TreeKVCache

    t_start = time.perf_counter()
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (PREFIX,), generator=g)
    trees = {n: TokenTree(torch.randint(0, vocab, (n,), generator=g), _bushy_parents(n)) for n in nodes}
    grid = [(b, n) for b in rows for n in nodes]
    with BatchRunner(model, attn=attn, fast=linears, route=fast) as runner:
        single = TreeKVCache()
        runner.extend(single, prefix)
        caches = {b: BatchKVCache.stack([single] * b) for b in rows}
        times = _interleaved(grid, repeats, lambda c: runner.forward([trees[c[1]]] * c[0]),
                             lambda c: runner.commit([torch.arange(0)] * c[0]),  # roll every row back to its prefix
                             runner.device, progress, "batched forward cost", prepare=lambda c: setattr(runner, "cache", caches[c[0]]))
    med = {c: statistics.median(ts) for c, ts in times.items()}
    step = med[(rows[0], nodes[0])]
    v: dict[int, dict[int, float]] = {}
    prev: dict[int, float] | None = None
    for b in sorted(rows):  # more nodes or more rows never cost less: a dip is measurement noise
        floor, v[b] = 1.0, {}
        for n in sorted(nodes):
            floor = max(floor, prev[n] if prev else 1.0, med[(b, n)] / step)
            v[b][n] = floor
        prev = v[b]
    return BatchCostProfile(step_ms=step * 1e3, v=v, key=batch_profile_key(model, fast=fast, attn=attn),
                            measured_s=round(time.perf_counter() - t_start, 2))


def batch_profile_key(model, *, fast: bool, attn: str = "torch") -> dict:
    return {**profile_key(model, fast=fast, attn=attn), "batch": [list(BATCH_ROWS), list(BATCH_NODES)]}


def get_batch_profile(model, *, fast: bool, attn: str = "torch", linears: FastLinears | None = None,
                      progress: bool = True) -> BatchCostProfile:
    """The cached batched-forward profile for this model and setting, or a fresh measurement (saved)."""
    key = batch_profile_key(model, fast=fast, attn=attn)
    path = _key_file(key)
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") == BATCH_FORMAT and raw.get("key") == key:
            return BatchCostProfile(**raw)
    except (OSError, ValueError, TypeError):
        pass
    report = _progress_line() if progress else None
    profile = measure_batch_profile(model, fast=fast, attn=attn, linears=linears, progress=report)
    if report is not None:
        report(f"done in {profile.measured_s:.1f} s (cached for next time)", end=True)
    try:
        _write_atomic(path, profile.as_dict())
    except OSError:
        pass
    return profile


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def profile_key(model, *, fast: bool, attn: str = "torch") -> dict:
    """What a profile depends on: architecture, dtype, device, threads, kernels, versions."""
    import transformers

    import specdec

    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    arch = json.dumps(to_dict() if callable(to_dict) else repr(config), sort_keys=True, default=str)
    device = torch.device(getattr(model, "device", "cpu"))
    return {
        "model": getattr(config, "_name_or_path", "") or type(model).__name__,
        "arch": hashlib.sha1(arch.encode()).hexdigest()[:12],
        "dtype": str(getattr(model, "dtype", torch.float32)).replace("torch.", ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {_cpu_name()}",
        "threads": torch.get_num_threads(),
        "fast": bool(fast),
        "attn": attn,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "specdec": specdec.__version__,
        "python": sys.version.split()[0],
        **({"gguf": blocks} if (blocks := quant_summary(model)) else {}),
        "native": _native_sources(),
    }


@lru_cache(maxsize=1)
def _native_sources() -> str:
    """A digest of specdec's own kernel sources: a changed kernel is a changed cost (read once per process: the key
    is built on every generation)."""
    digest = hashlib.sha1()
    for src in sorted((Path(__file__).with_name("csrc")).glob("*.[ch]")):
        digest.update(src.read_bytes())
    return digest.hexdigest()[:12]


def _profile_dir() -> Path:
    from specdec.models import cache_root

    return cache_root() / "profiles"


def _key_file(key: dict, prefix: str = "") -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return _profile_dir() / f"{prefix}{digest}.json"


def load_profile(key: dict) -> CostProfile | None:
    """The cached profile for ``key``, or None (a damaged file counts as none)."""
    path = _key_file(key)
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT or raw.get("key") != key:
            return None
        return CostProfile(**raw)
    except (OSError, ValueError, TypeError):
        return None


def save_profile(profile: CostProfile) -> Path:
    """Write atomically (a killed process leaves no half-written profile)."""
    return _write_atomic(_key_file(profile.key), profile.as_dict())


def _write_atomic(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_SAID_VARIANT: set[str] = set()


def fast_linears_for(model, profile: CostProfile) -> FastLinears:
    """The fast linear kernels a profile chose, prepared for ``model``. In bf16/fp16 without a row-invariant kernel
    (no AVX-512 or no compiler here), says once that speculative output may differ from plain decoding."""
    plan = LinearPlan({int(k): v for k, v in profile.linear_plan.items()}, invariant=profile.linear_invariant)
    dtype = getattr(model, "dtype", torch.float32)
    if dtype in (torch.bfloat16, torch.float16) and not plan.invariant and str(dtype) not in _SAID_VARIANT:
        from specdec.native import unavailable_reason

        _SAID_VARIANT.add(str(dtype))
        log.warning("no row-invariant linear kernel for %s on this machine (%s): a tree node's logits can round "
                    "differently from a plain step's, so speculative output may differ from plain decoding; "
                    "specdec bench lists the differences (float32 keeps them to near-ties)",
                    str(dtype).replace("torch.", ""), unavailable_reason() or "the measured plan mixes kernels")
    return fast_linears(model, plan)


@torch.inference_mode()
def measure_profile(model, *, fast: bool = True, attn: str = "torch", repeats: int = 5,
                    node_counts=NODE_COUNTS, progress: Callable[[str], None] | None = None,
                    linears: FastLinears | None = None) -> CostProfile:
    """Measure the linear-kernel plan (with ``fast``) and then v(n) through the engine's own forward.

    Node counts are interleaved within each repeat (rotating order) and the
    median of ``repeats`` runs counts, so slow drift of the machine spreads
    over all sizes instead of bending the curve.
    """
    t_start = time.perf_counter()
    if fast and linears is None:
        linears = fast_linears(model, measure_plan(model, repeats=3, progress=progress))
    plan = linears.plan if linears is not None else LinearPlan()
    # through the forward generation runs (the batched runner with one row: the lean native forward where it applies)
    curve = measure_curve(model, PREFIX, attn=attn, linears=linears, repeats=repeats, node_counts=node_counts,
                          progress=progress, route=fast, label="forward cost")
    return CostProfile(
        step_ms=curve["step_ms"], v=curve["v"], linear_plan=plan.as_dict(), linear_invariant=plan.invariant,
        key=profile_key(model, fast=fast, attn=attn), measured_s=round(time.perf_counter() - t_start, 2),
    )


@torch.inference_mode()
def measure_curve(model, prefix_len: int, *, attn: str = "torch", linears: FastLinears | None = None, repeats: int = 3,
                  node_counts=NODE_COUNTS, progress: Callable[[str], None] | None = None, route: bool = True,
                  label: str | None = None) -> dict:
    """{"step_ms", "v"} measured after a random prefix of ``prefix_len`` tokens through the forward generation runs
    (the batched runner with one row: a lone root runs maskless there, a tree with its mask), its prefill first
    and untimed; rounds interleaved and medians taken as in :func:`measure_profile`."""
    from specdec.batch import BatchKVCache, BatchRunner
    from specdec.cache import TreeKVCache

    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(prefix_len)
    trees = {n: TokenTree(torch.randint(0, vocab, (n,), generator=g), _bushy_parents(n)) for n in node_counts}
    with BatchRunner(model, attn=attn, fast=linears, route=route) as runner:
        if progress:
            progress(f"prefill of {prefix_len} tokens")
        single = TreeKVCache()
        runner.extend(single, torch.randint(0, vocab, (prefix_len,), generator=g))
        runner.cache = BatchKVCache.stack([single])
        times = _interleaved(list(node_counts), repeats, lambda n: runner.forward([trees[n]]),
                             lambda n: runner.commit([torch.arange(0)]), runner.device, progress, label or f"after {prefix_len} tokens")
    step, v = _monotone_curve(times)
    return {"step_ms": step * 1e3, "v": v}


def _interleaved(sizes: list, repeats: int, run: Callable, reset: Callable, device, progress, label: str,
                 prepare: Callable | None = None) -> dict:
    """Each size's wall times of ``run(size)`` over ``repeats`` rounds (after a warm-up round), the sizes in a rotating
    order within each round so that slow drift of the machine spreads over all of them; ``prepare(size)`` before the
    clock starts, ``reset(size)`` after every forward."""
    times: dict = {n: [] for n in sizes}
    for r in range(repeats + 1):
        if progress:
            progress(f"{label}, round {r + 1}/{repeats + 1}")
        for n in sizes[r % len(sizes):] + sizes[: r % len(sizes)]:
            if prepare is not None:
                prepare(n)
            t0 = time.perf_counter()
            run(n)
            _sync(device)
            if r:  # round 0 warms up
                times[n].append(time.perf_counter() - t0)
            reset(n)
    return times


def _monotone_curve(times: dict[int, list[float]]) -> tuple[float, dict[int, float]]:
    """(plain step in s, {n: v(n)}) from each node count's timings: medians over the smallest count's, made
    non-decreasing (more nodes never cost less: a dip is measurement noise)."""
    med = {n: statistics.median(ts) for n, ts in times.items()}
    step = med[min(med)]
    v, floor = {}, 1.0
    for n in sorted(med):
        floor = max(floor, med[n] / step)
        v[n] = floor
    return step, v


def add_prefix_curves(model, prefixes, *, fast: bool = True, attn: str = "torch", progress: bool = True) -> CostProfile:
    """Measure v(n) after each of ``prefixes`` (tokens; those <= PREFIX are the base curve) and keep the curves in
    this model's cached profile (measured first if there is none). Returns the profile."""
    profile = get_profile(model, fast=fast, attn=attn, progress=progress)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    report = _progress_line() if progress else None
    linears = fast_linears_for(model, profile) if fast else None
    for length in sorted({int(x) for x in prefixes}):
        if length <= PREFIX:
            continue
        if limit and length + max(NODE_COUNTS) > limit:
            raise ValueError(f"prefix {length} + {max(NODE_COUNTS)} tree nodes exceeds the model's context of {limit} tokens; "
                             f"measure up to {limit - max(NODE_COUNTS)}")
        profile.curves[length] = measure_curve(model, length, attn=attn, linears=linears, progress=report, route=fast)
    profile.__post_init__()
    if report is not None:
        report("done (kept with the cached profile)", end=True)
    try:
        save_profile(profile)
    except OSError:
        pass
    return profile


def _bushy_parents(n: int) -> torch.Tensor:
    """A tree shaped like the ones drafters send: each node's parent is (i - 1) // 2 (a binary heap)."""
    return torch.tensor([-1] + [(i - 1) // 2 for i in range(1, n)], dtype=torch.long)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def get_profile(model, *, fast: bool, attn: str = "torch", progress: bool = True) -> CostProfile:
    """The cached profile for this model and setting, or a fresh measurement (saved for next time)."""
    key = profile_key(model, fast=fast, attn=attn)
    cached = load_profile(key)
    if cached is not None:
        return cached
    report = _progress_line() if progress else None
    profile = measure_profile(model, fast=fast, attn=attn, progress=report)
    if report is not None:
        report(f"done in {profile.measured_s:.1f} s (cached for next time)", end=True)
    try:
        save_profile(profile)
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time
    return profile


def _progress_line() -> Callable[..., None]:
    """One updating line on stderr: 'specdec: measuring this machine's forward cost ... <stage>'."""

    def report(stage: str, end: bool = False) -> None:
        print(f"\rspecdec: measuring this machine's forward cost (once per model and setting): {stage:<40}",
              end="\n" if end else "", file=sys.stderr, flush=True)

    return report
