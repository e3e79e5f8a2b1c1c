"""Self-distillation at scale: the target's own greedy answers to many prompts, in a resumable sharded store.

``specdec data distill`` answers the user turns of a conversation source
(ShareGPT by default: first user turns, deduplicated; with ``turns`` = 2 the
second user turn too, asked after the model's *own* first answer) through
specdec's batched engine with continuous batching (``max_batch`` rows in
flight; a waiting prompt joins as soon as a row finishes).

The output is a directory::

    manifest.json           model fingerprint, settings, counts, token totals, wall time, every run's command
    shard-00000.jsonl.gz    records, ``shard_size`` conversations per shard, gzip members appended as rows finish
    .lock                   held (flock) while a run writes; a second run on the same directory is refused

A record is ``{"id", "turn", "messages", "answer_tokens", "finish"}``: ``id``
is the conversation's index in the source (stable across runs, so held-out
splits by id are stable too), ``messages`` the whole exchange up to this
turn's answer. Reading keeps, per id, the record of the highest turn.

Resumable: finished answers are appended (and fsynced) a few at a time as
compressed gzip members; a SIGKILL loses at most the rows in flight and the
few finished answers not yet flushed, and a rerun drops a member cut by the
kill, then continues with what is missing. Settings that change the answers
(model, answer cap, prompt cap, source) must match the manifest; ``limit``
and ``turns`` may grow between runs.

Why plain batched decoding by default (``drafter="none"``): generation here is
throughput work, and on a 2-core CPU a forward over 64 rows costs ~4 single
steps, so a full batch of plain rows yields more tokens per second than
speculation, whose extra tree nodes compete with other rows for the same
compute (measured on an AMD EPYC Zen 2 host, 128 prompts, 256 new tokens:
``none`` with 64 rows in flight 111 tokens/s, 32 rows 102; prompt lookup, 16
rows 84; HF ``generate`` in the same fast kernels, 32 rows 67). Any drafter
spec can be given; the answers are the same greedy answers either way.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["DistillConfig", "distill", "read_distilled", "iter_records", "model_fingerprint", "select_prompts", "DistillLocked"]

FORMAT = 1
_SHARD = "shard-{:05d}.jsonl.gz"
_FLUSH_EVERY = 8  # finished answers per gzip member


class DistillLocked(FileExistsError):
    """Another process is writing to the same output directory."""


@dataclass
class DistillConfig:
    """What to distil.

    Attributes:
        prompts: ``"sharegpt"`` or a conversations .jsonl.
        limit: read at most this many source conversations (None: all); ids are source indices.
        skip: ignore the first ``skip`` source conversations (kept for evaluation elsewhere).
        turns: user turns answered per conversation (turn k is asked after the model's own answers to 1..k-1).
        max_new_tokens: answer cap per turn.
        max_prompt_tokens: a turn whose chat-templated prompt is longer is not asked (never cut mid-prompt).
        drafter: the engine's drafter spec (the answers are greedy either way).
        max_batch: rows in flight (continuous batching).
        shard_size: conversations per shard file.
    """

    prompts: str = "sharegpt"
    limit: int | None = None
    skip: int = 0
    turns: int = 2
    max_new_tokens: int = 512
    max_prompt_tokens: int = 1536
    drafter: str = "none"
    max_batch: int = 64
    shard_size: int = 1000

    def __post_init__(self) -> None:
        for name in ("turns", "max_new_tokens", "max_prompt_tokens", "max_batch", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.skip < 0 or (self.limit is not None and self.limit < 1):
            raise ValueError("skip must be >= 0 and limit >= 1 (or None)")

    def answer_key(self) -> dict:
        """The settings that change the answers: a rerun must repeat them."""
        return {"prompts": self.prompts, "skip": self.skip, "max_new_tokens": self.max_new_tokens, "max_prompt_tokens": self.max_prompt_tokens}


def model_fingerprint(model, tokenizer) -> str:
    """A hash of what decides the answers: the config, every weight's shape and a sample of its values, the vocabulary.

    The same for the model loaded in float32 or bfloat16: the sampled values are compared rounded to bfloat16,
    so one directory can hold answers generated in either dtype (each run records its own). Distillation may
    run in the dtype that generates fastest on the host; the answers are the same model's either way.
    """
    h = hashlib.sha1(type(model).__name__.encode())
    # Not the library version or the path the weights were loaded from: the same weights loaded by another
    # transformers release (the pin is loose) or from another cache directory give the same answers.
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(torch.cat([flat[:64], flat[-64:]]).to(torch.bfloat16).float().numpy().tobytes())
    from specdec.datastore import tokenizer_fingerprint

    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- prompts
def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def select_prompts(conversations: list[list[dict]], first_id: int = 0) -> dict[int, list[str]]:
    """Per conversation id, its user turns, in order; conversations whose first user turn repeats an earlier
    one's (after lower-casing and collapsing whitespace) are dropped, as are empty first turns."""
    seen: set[str] = set()
    out: dict[int, list[str]] = {}
    for i, conv in enumerate(conversations):
        users = [m["content"] for m in conv if m["role"] == "user"]
        key = _norm(users[0]) if users else ""
        if not key or key in seen:
            continue
        seen.add(key)
        out[first_id + i] = users
    return out


# ---------------------------------------------------------------------------------------------------- store
def _read_members(path: Path) -> tuple[list[dict], int]:
    """The records of a multi-member gzip file and the byte offset where its last complete member ends
    (a member cut by a kill, and everything after it, is not read)."""
    data = path.read_bytes()
    records, pos = [], 0
    while pos < len(data):
        d = zlib.decompressobj(wbits=31)
        try:
            text = d.decompress(data[pos:])
        except zlib.error:
            break
        if not d.eof:
            break  # cut mid-member
        try:
            # split on "\n" only: str.splitlines() also splits at U+2028, U+0085 and other characters that
            # json.dumps(ensure_ascii=False) leaves inside strings (ShareGPT has them)
            batch = [json.loads(line) for line in text.decode("utf-8").split("\n") if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError):
            break
        records += batch
        pos = len(data) - len(d.unused_data)
    return records, pos


def _shards(out: Path) -> list[Path]:
    return sorted(out.glob("shard-*.jsonl.gz"))


def iter_records(out: str | Path) -> Iterator[dict]:
    """Every complete record of a distilled directory, shard by shard."""
    for shard in _shards(Path(out)):
        yield from _read_members(shard)[0]


def read_distilled(out: str | Path, *, partial: bool = False) -> list[dict]:
    """The distilled conversations, one record per id (its highest turn), in id order. ``partial`` also reads a
    directory whose first run is still going (no manifest yet)."""
    out = Path(out)
    if not partial and not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"{out} is not a distilled directory (no manifest.json); make one with `specdec data distill`")
    best: dict[int, dict] = {}
    for r in iter_records(out):
        if r["id"] not in best or r["turn"] > best[r["id"]]["turn"]:
            best[r["id"]] = r
    return [best[i] for i in sorted(best)]


class _Writer:
    """Appends records to the current shard as gzip members, rolling over every ``shard_size`` conversations."""

    def __init__(self, out: Path, shard_size: int, on_flush=None) -> None:
        self.out, self.shard_size, self.buffer, self.on_flush = out, shard_size, [], on_flush
        shards = _shards(out)
        self.index = len(shards) - 1 if shards else 0
        self.count = 0
        if shards:
            records, end = _read_members(shards[-1])
            with shards[-1].open("r+b") as f:  # drop a member cut by a kill
                f.truncate(end)
            self.count = len({r["id"] for r in records if r["turn"] == 1})

    def add(self, record: dict) -> None:
        self.buffer.append(record)
        if len(self.buffer) >= _FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Write the buffered records as one gzip member per shard they fall in (a shard holds ``shard_size``
        first turns; later turns go to the shard being written)."""
        groups: dict[int, list[dict]] = {}
        for r in self.buffer:
            if r["turn"] == 1:
                if self.count >= self.shard_size:
                    self.index, self.count = self.index + 1, 0
                self.count += 1
            groups.setdefault(self.index, []).append(r)
        for index, group in groups.items():
            blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in group).encode()
            c = zlib.compressobj(9, zlib.DEFLATED, 31)
            with (self.out / _SHARD.format(index)).open("ab") as f:
                f.write(c.compress(blob) + c.flush())
                f.flush()
                os.fsync(f.fileno())
        self.buffer = []
        if groups and self.on_flush is not None:
            self.on_flush()


def lock_dir(out: Path, what: str = "`specdec data distill`"):
    """Hold ``out/.lock`` for this process (released by the kernel when it exits, however it exits); another
    process holding it is an error that names it."""
    f = (out / ".lock").open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise DistillLocked(f"{out} is being written by {who}; wait for that run to finish or stop it, "
                            "or give another output directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"{what} pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()
    return f


def write_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def _manifest(out: Path, fingerprint: str, cfg: DistillConfig) -> dict:
    path = out / "manifest.json"
    if not path.is_file():
        return {"format": FORMAT, "model": fingerprint, "settings": cfg.answer_key(), "runs": []}
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT:
        raise ValueError(f"{out} holds distillation format {m.get('format')}, this specdec writes {FORMAT}; give another --out")
    if m["model"] != fingerprint:
        raise ValueError(f"{out} was distilled from another model (fingerprint {m['model']}, this one {fingerprint}); "
                         "give another --out")
    if m["settings"] != cfg.answer_key():
        raise ValueError(f"{out} was distilled with {m['settings']}, this run asks for {cfg.answer_key()}; "
                         "repeat those settings to continue it, or give another --out")
    return m


def _totals(out: Path) -> dict:
    records = list(iter_records(out))
    return {"conversations": len({r["id"] for r in records}), "answers": len(records),
            "answer_tokens": sum(r["answer_tokens"] for r in records),
            "shards": [p.name for p in _shards(out)]}


# ---------------------------------------------------------------------------------------------------- the run
def _jobs(users: dict[int, list[str]], done: dict[int, dict], turn: int, tokenizer, cfg: DistillConfig) -> list[tuple[int, list[dict], torch.Tensor]]:
    """Turn ``turn`` of every conversation that has it, whose previous turn is answered and which is not done."""
    jobs = []
    for i, turns in users.items():
        if len(turns) < turn or (i in done and done[i]["turn"] >= turn):
            continue
        if turn == 1:
            history = []
        elif i in done and done[i]["turn"] == turn - 1:
            history = done[i]["messages"]  # the model's own earlier answers (cut at the cap or not)
        else:
            continue  # the previous turn was not asked (its prompt was too long)
        messages = history + [{"role": "user", "content": turns[turn - 1]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if ids.numel() <= cfg.max_prompt_tokens:
            jobs.append((i, messages, ids))
    return jobs


def distill(model, tokenizer, out: str | Path, cfg: DistillConfig, *, progress: bool = True, command: str | None = None) -> dict:
    """Answer every selected turn not yet in ``out``; returns the manifest (counts, token totals, wall time).

    The manifest is rewritten about once a minute while the run goes on, so a killed run's time and counts
    are kept (up to that last minute).

    Raises:
        DistillLocked: another run is writing to ``out``.
        ValueError: ``out`` holds answers of another model or other settings.
    """
    from specdec.training.data import load_conversations

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_dir(out)
    try:
        t0 = time.perf_counter()
        manifest = _manifest(out, model_fingerprint(model, tokenizer), cfg)
        users = select_prompts(load_conversations(cfg.prompts, limit=cfg.limit, skip=cfg.skip), first_id=cfg.skip)
        run = {"command": command or " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "written": 0,
               "answer_tokens": 0, "wall_s": 0.0, "settings": asdict(cfg), "dtype": str(getattr(model, "dtype", "")).replace("torch.", "")}
        manifest["runs"].append(run)
        book = _Book(out, manifest, run, t0)
        writer = _Writer(out, cfg.shard_size, on_flush=book.tick)
        try:
            for turn in range(1, cfg.turns + 1):
                writer.flush()  # turn k asks after the answers of turn k - 1: all on disk
                done = {r["id"]: r for r in read_distilled(out, partial=True)}
                _answer(model, tokenizer, _jobs(users, done, turn, tokenizer, cfg), turn, cfg, writer, run, progress)
        finally:  # also on Ctrl-C / SIGTERM: what was answered is kept and counted
            writer.flush()
            book.save(final=True)
        return manifest
    finally:
        lock.close()


class _Book:
    """Keeps the manifest current: the run's wall time and the directory's totals."""

    def __init__(self, out: Path, manifest: dict, run: dict, t0: float) -> None:
        self.out, self.manifest, self.run, self.t0, self.last = out, manifest, run, t0, time.perf_counter()

    def tick(self) -> None:
        if time.perf_counter() - self.last > 60:
            self.save()

    def save(self, final: bool = False) -> None:
        self.run["wall_s"] = round(time.perf_counter() - self.t0, 1)
        self.manifest["wall_time_s"] = round(sum(r.get("wall_s", 0) for r in self.manifest["runs"]), 1)
        if final:
            self.manifest.update(_totals(self.out))
        write_json(self.out / "manifest.json", self.manifest)
        self.last = time.perf_counter()


def _answer(model, tokenizer, jobs: list, turn: int, cfg: DistillConfig, writer: "_Writer", run: dict, progress: bool) -> None:
    """Generate every job's answer (continuous batching) and hand each to ``writer`` as its row finishes."""
    from tqdm.auto import tqdm

    from specdec.engine import _eos_ids, generate_events

    if not jobs:
        return
    eos = _eos_ids(model, tokenizer)
    bar = tqdm(total=len(jobs), desc=f"distill turn {turn}", unit="answer", disable=not progress, smoothing=0.05)
    new: list[list[int]] = [[] for _ in jobs]
    tokens = 0
    for k, event in generate_events(model, tokenizer, [ids for _, _, ids in jobs], cfg.drafter,
                                    max_new_tokens=cfg.max_new_tokens, max_batch=cfg.max_batch):
        new[k].extend(event.new_tokens)
        if event.finish_reason is None:
            continue
        i, messages, _ = jobs[k]
        answer = tokenizer.decode(new[k], skip_special_tokens=True)
        finish = "eos" if new[k] and new[k][-1] in eos else event.finish_reason
        writer.add({"id": i, "turn": turn, "messages": messages + [{"role": "assistant", "content": answer}],
                    "answer_tokens": len(new[k]), "finish": finish})
        run["written"] += 1
        run["answer_tokens"] += len(new[k])
        tokens += len(new[k])
        new[k] = []
        bar.update(1)
        bar.set_postfix(tok_s=f"{tokens / max(bar.format_dict['elapsed'], 1e-9):.0f}")
    bar.close()
