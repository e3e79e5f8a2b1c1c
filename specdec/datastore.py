"""A retrieval datastore: a tokenised corpus and its suffix array, memory-mapped (REST, He et al. 2024).

Layout of a datastore directory::

    manifest.json       format, tokenizer fingerprint, vocabulary size, counts, source, build time
    tokens.npy          [N] uint16 (uint32 for vocabularies over 65,535): the documents, each followed by
                        the separator SEP (the dtype's largest value, never a real token)
    suffix_array.npy    [N] int32 (int64 past 2^31 tokens): start positions of all suffixes, in sorted order

The suffix array comes from ``pydivsufsort`` (libdivsufsort's SA-IS-style
construction, O(N), ~1.3 s for 5M tokens here); numpy alone would need an
O(N log N) sort of suffixes, which is impractical for tens of millions of
tokens. Both arrays are memory-mapped at load, so a datastore costs page cache,
not process memory.

Queries (:meth:`Datastore.longest_match`): find the longest suffix of the
context that occurs in the corpus. All suffixes starting with a pattern form
one contiguous range of the suffix array (two binary searches). If the last m
tokens of the context occur, so do the last m - 1; so instead of trying spans
from long to short until one hits (REST's order), the span is found by a binary
search over m: the same answer with log2(max_span) range searches.

A build writes everything into a temporary directory beside the target and
renames it into place at the end: an interrupted build leaves no datastore
that loads. Loading checks the manifest's format and tokenizer fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

__all__ = ["Datastore", "build_datastore", "tokenizer_fingerprint", "FORMAT"]

FORMAT = 1


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids: the vocabulary, special tokens and tokenizer class."""
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([type(tokenizer).__name__, vocab, sorted(map(str, tokenizer.all_special_tokens))], ensure_ascii=False)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _dtype_for(vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab < np.iinfo(np.uint16).max else np.dtype(np.uint32)


@dataclass
class Datastore:
    """A loaded datastore (arrays memory-mapped)."""

    tokens: np.ndarray  # [N] uint16/uint32
    suffix_array: np.ndarray  # [N] int32/int64
    manifest: dict
    path: Path | None = None

    @property
    def sep(self) -> int:
        return int(np.iinfo(self.tokens.dtype).max)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike, tokenizer=None) -> "Datastore":
        """Open a datastore; with ``tokenizer``, check it was built with the same one."""
        path = Path(path)
        manifest_file = path / "manifest.json"
        if not manifest_file.is_file():
            raise FileNotFoundError(f"{path} is not a datastore (no manifest.json); build one with `specdec datastore build`")
        try:
            manifest = json.loads(manifest_file.read_text())
        except ValueError as err:
            raise ValueError(f"could not read {manifest_file}: {err}") from None
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path} has datastore format {manifest.get('format')}; this specdec reads format {FORMAT}: rebuild it")
        if tokenizer is not None and manifest.get("tokenizer") != tokenizer_fingerprint(tokenizer):
            raise ValueError(f"{path} was built with another tokenizer ({manifest.get('tokenizer_name', '?')}); "
                             "build a datastore with this model's tokenizer: specdec datastore build --model ...")
        try:
            tokens = np.load(path / "tokens.npy", mmap_mode="r")
            sa = np.load(path / "suffix_array.npy", mmap_mode="r")
        except (OSError, ValueError) as err:
            raise ValueError(f"could not read the arrays of {path} (damaged?): {err}") from None
        if tokens.shape != sa.shape or tokens.shape[0] != manifest.get("tokens"):
            raise ValueError(f"{path}: tokens.npy, suffix_array.npy and manifest.json disagree on the size; rebuild it")
        return cls(tokens, sa, manifest, path)

    @classmethod
    def from_documents(cls, docs: Iterable[Iterable[int]], vocab_size: int) -> "Datastore":
        """An in-memory datastore (no files): for tests and for stores that grow in a process."""
        tokens = _concatenate(docs, _dtype_for(vocab_size))
        return cls(tokens, _suffix_array(tokens), {"format": FORMAT, "tokens": int(tokens.shape[0]), "vocab_size": vocab_size})

    # ------------------------------------------------------------------ queries
    def _compare(self, pos: int, pattern: np.ndarray) -> int:
        """Sign of (suffix at ``pos``, cut to len(pattern)) vs ``pattern``; a shorter suffix equal so far is smaller."""
        seg = self.tokens[pos : pos + pattern.shape[0]]
        diff = np.flatnonzero(seg != pattern[: seg.shape[0]])
        if diff.size:
            return -1 if seg[diff[0]] < pattern[diff[0]] else 1
        return -1 if seg.shape[0] < pattern.shape[0] else 0

    def find(self, pattern: np.ndarray, lo: int = 0, hi: int | None = None) -> tuple[int, int]:
        """The range [lo, hi) of suffix-array rows whose suffixes start with ``pattern`` (searched within lo..hi)."""
        hi = self.suffix_array.shape[0] if hi is None else hi
        sa = self.suffix_array
        a, b = lo, hi
        while a < b:  # first row >= pattern
            mid = (a + b) // 2
            if self._compare(int(sa[mid]), pattern) < 0:
                a = mid + 1
            else:
                b = mid
        start, b = a, hi
        while a < b:  # first row > pattern
            mid = (a + b) // 2
            if self._compare(int(sa[mid]), pattern) <= 0:
                a = mid + 1
            else:
                b = mid
        return start, a

    def longest_match(self, context: np.ndarray, max_span: int, min_span: int = 1) -> tuple[int, int, int]:
        """The longest suffix of ``context`` (up to ``max_span`` tokens) found in the corpus.

        Returns:
            (span, lo, hi): its length and its suffix-array range; span 0 when even
            ``min_span`` tokens do not occur.
        """
        best = (0, 0, 0)
        a, b = min_span, min(max_span, context.shape[0])  # the answer, if any, lies in [a, b]
        while a <= b:
            m = (a + b) // 2
            lo, hi = self.find(np.ascontiguousarray(context[-m:]).astype(self.tokens.dtype))
            if lo < hi:
                best, a = (m, lo, hi), m + 1
            else:
                b = m - 1
        return best

    def continuations(self, span: int, lo: int, hi: int, k: int, length: int) -> list[list[int]]:
        """Up to ``k`` continuations (``length`` tokens after the match, cut at a document end), spread over the range."""
        if hi <= lo:
            return []
        rows = np.linspace(lo, hi - 1, num=min(k, hi - lo)).astype(np.int64) if hi - lo > k else np.arange(lo, hi)
        out = []
        for r in rows:
            start = int(self.suffix_array[r]) + span
            seg = self.tokens[start : start + length]
            stop = np.flatnonzero(seg == self.sep)
            out.append(seg[: stop[0]].tolist() if stop.size else seg.tolist())
        return [c for c in out if c]


def _concatenate(docs: Iterable[Iterable[int]], dtype: np.dtype) -> np.ndarray:
    sep = np.iinfo(dtype).max
    parts = []
    for doc in docs:
        arr = np.asarray(list(doc), dtype=np.int64)
        if arr.size:
            parts.append(arr)
            parts.append(np.array([sep]))
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(parts).astype(dtype)


def _suffix_array(tokens: np.ndarray) -> np.ndarray:
    from pydivsufsort import divsufsort

    if tokens.shape[0] == 0:
        return np.zeros(0, dtype=np.int32)
    return divsufsort(np.ascontiguousarray(tokens))


# --------------------------------------------------------------------------- building
def iter_documents(source: str, roles: tuple[str, ...] = ("assistant",), limit: int | None = None) -> Iterator[str]:
    """Texts of a corpus: ``"sharegpt"``, a conversations .jsonl (e.g. ``specdec data distill`` output), a
    .jsonl of ``{"text": ...}`` records, or a directory of ``*.txt`` files (one document each)."""
    path = Path(source)
    if source != "sharegpt" and path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{path} holds no *.txt files")
        for n, f in enumerate(files):
            if limit is not None and n >= limit:
                return
            yield f.read_text(encoding="utf-8", errors="replace")
        return
    if source != "sharegpt" and path.suffix == ".jsonl" and path.is_file():
        with path.open() as fh:
            first = fh.readline()
        if first.strip() and "text" in json.loads(first):
            with path.open() as fh:
                for n, line in enumerate(fh):
                    if limit is not None and n >= limit:
                        return
                    if line.strip():
                        yield json.loads(line)["text"]
            return
    from specdec.training.data import load_conversations

    for conv in load_conversations(source, limit=limit):
        for m in conv:
            if m["role"] in roles or "all" in roles:
                yield m["content"]


def build_datastore(tokenizer, source: str, out: str | os.PathLike, *, roles: tuple[str, ...] = ("assistant",),
                    limit: int | None = None, force: bool = False, progress: bool = True) -> dict:
    """Tokenise ``source`` with ``tokenizer`` and write a datastore to ``out`` (atomically); returns its manifest."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose another --out or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    vocab = len(tokenizer)
    dtype = _dtype_for(vocab)
    from tqdm.auto import tqdm

    docs = tqdm(iter_documents(source, roles, limit), desc="tokenising", unit="doc", disable=not progress)
    ids = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in docs)
    counted = _Counting(ids)
    tokens = _concatenate(counted, dtype)
    if tokens.shape[0] == 0:
        raise ValueError(f"{source} gave no text to index")
    if progress:
        print(f"suffix array over {tokens.shape[0]:,} tokens ...", flush=True)
    sa = _suffix_array(tokens)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "suffix_array.npy", sa)
        manifest = {
            "format": FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer), "tokenizer_name": getattr(tokenizer, "name_or_path", ""),
            "vocab_size": vocab, "tokens": int(tokens.shape[0]), "documents": counted.n, "source": str(source), "roles": list(roles),
            "token_dtype": str(dtype), "build_seconds": round(time.perf_counter() - t0, 1),
            "bytes": int(tokens.nbytes + sa.nbytes), "specdec": _version(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


class _Counting:
    """Passes documents through and counts them."""

    def __init__(self, it):
        self.it, self.n = it, 0

    def __iter__(self):
        for x in self.it:
            self.n += 1
            yield x


def _version() -> str:
    import specdec

    return specdec.__version__
