"""The frozen target's features at scale: a sharded, memory-mapped store, extracted once, streamed by every method.

The target runs once over the conversations (teacher forcing, chat template,
cut at ``max_len`` tokens); per position it stores::

    hidden      [N, L, H] bf16/fp16  the hidden states of the L layers asked for (``layers``: indices into HF's
                                     ``hidden_states``; -1 is the last layer after the final norm, what
                                     Medusa/Clover read; EAGLE-3 adds a low, a middle and a high layer)
    ids         [N] int32            the input token
    labels      [N] int32            the target's own greedy next token (self-distillation labels)
    answer      [N] bool             the token belongs to an assistant turn (training may weight only these)
    topk_ids    [N, K] int32         the target's K most likely next tokens ...
    topk_logp   [N, K] fp16          ... and their log-probabilities (for KL training)

A directory holds ``manifest.json`` and ``shard-NNNNN/`` folders, each with
those arrays as ``.npy`` files (read with ``np.load(mmap_mode="r")``: memory
stays bounded whatever the data size) and ``offsets.npy`` ([items + 1]
position offsets of its conversations). A shard is written into a temporary
folder and renamed when complete, so a killed extraction loses at most the
shard in flight and a rerun computes only the missing shards; a second
extraction on the same directory is refused while one runs.

Why bf16 by default: hidden states of this size are well within bf16's
range; it halves the disk and the page cache the streaming reads need, and
the drafters' own training runs in fp32 on top.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

__all__ = ["FeatureSpec", "FeatureStore", "extract_store", "EpochSampler", "answer_mask"]

FORMAT = 1
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
FORWARD_DTYPES = ("", "float32", "bfloat16", "float16")  # "" = as loaded; TrainConfig.feature_dtype "auto" resolves to one


@dataclass
class FeatureSpec:
    """What to extract.

    Attributes:
        layers: indices into the model's ``hidden_states`` (0 = embeddings, i = after decoder layer i; -1 = the
            last, after the final norm).
        max_len: conversations are cut at this many tokens.
        topk: how many of the target's top next-token log-probabilities to keep per position (0: none).
        dtype: ``"bfloat16"`` or ``"float16"`` for the hidden states.
        forward_dtype: the dtype the target runs in while extracting (``""``: as it was loaded). ``"bfloat16"``
            extracts several times faster on CPUs with bf16 matrix units (measured 5.1x on an Intel Sapphire
            Rapids host with AMX); its features and labels carry bf16 rounding (the labels differ from the
            float32 greedy tokens only where the target is near a tie). Part of the store's key.
    """

    layers: list[int] = field(default_factory=lambda: [-1])
    max_len: int = 1024
    topk: int = 16
    dtype: str = "bfloat16"
    forward_dtype: str = ""

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be a non-empty list of distinct hidden-state indices, got {self.layers}")
        if self.max_len < 2 or self.topk < 0:
            raise ValueError(f"max_len must be >= 2 and topk >= 0, got {self.max_len}, {self.topk}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.forward_dtype not in FORWARD_DTYPES:
            raise ValueError(f"forward_dtype must be one of {FORWARD_DTYPES}, got {self.forward_dtype!r}")


def fastest_forward_dtype(model, tokens: int = 1024, repeats: int = 2) -> str:
    """``"bfloat16"`` or ``""`` (as loaded: float32): whichever runs a bulk forward of a float32 ``model`` faster here,
    timed (a few seconds) on random tokens in batches like extraction's. bf16 wins where the CPU has bf16
    matrix units (5.1x on a Sapphire Rapids host with AMX) and loses on an AVX2-only CPU; a model that is
    not float32 keeps its dtype (``""``).

    Decided once per model and machine and cached beside the cost profiles (``$SPECDEC_CACHE/profiles``,
    ``forward-dtype-*.json``): where the two dtypes run about as fast, timing in every process made two runs of
    the same recipe extract in different dtypes (and train on different features); delete the file to time again."""
    if getattr(model, "dtype", None) != torch.float32:
        return ""
    from specdec.profile import _key_file, _write_atomic, profile_key

    key = {**profile_key(model, fast=False), "measure": "bulk forward dtype", "tokens": tokens}
    path = _key_file(key, prefix="forward-dtype-")
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key and cached.get("choice") in ("", "bfloat16"):
            return cached["choice"]
    except (OSError, ValueError, AttributeError):
        pass
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (max(1, tokens // 256), 256), generator=torch.Generator().manual_seed(0))
    times = {}
    for name in ("float32", "bfloat16"):
        m = model if name == "float32" else copy.deepcopy(model).to(torch.bfloat16)
        try:
            with torch.inference_mode():
                m(input_ids=ids[:1, :32])  # warm-up
                t = time.perf_counter()
                for _ in range(repeats):
                    m(input_ids=ids)
                times[name] = time.perf_counter() - t
        except RuntimeError:  # no bf16 kernels on this CPU
            times[name] = float("inf")
    best = min(times, key=times.get)
    choice = "" if best == "float32" else best
    _write_atomic(path, {"key": key, "choice": choice, "seconds": {k: (v if v != float("inf") else None) for k, v in times.items()}})
    return choice


def answer_mask(tokenizer, messages: list[dict], ids: Tensor) -> Tensor:
    """[T] bool: which of the chat-templated ``ids`` belong to assistant turns (their text, found by rendering
    the conversation up to each turn and comparing token prefixes)."""
    mask = torch.zeros(ids.numel(), dtype=torch.bool)
    if not getattr(tokenizer, "chat_template", None):
        return mask | True
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        a = len(tokenizer(head, add_special_tokens=False)["input_ids"])
        b = len(tokenizer(upto, add_special_tokens=False)["input_ids"])
        mask[a : min(b, ids.numel())] = True
    return mask


# ---------------------------------------------------------------------------------------------------- store
class FeatureStore:
    """A feature directory, opened read-only: items are conversations, read through memory maps."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.path} is not a feature store (no manifest.json); extract one with "
                                    "specdec.training.features.extract_store")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{self.path} holds feature format {self.manifest.get('format')}, this specdec reads {FORMAT}; re-extract")
        self.spec = FeatureSpec(**self.manifest["spec"])
        self._shards = [self._open(self.path / s["name"]) for s in self.manifest["shards"]]
        self._index = [(si, j) for si, sh in enumerate(self._shards) for j in range(len(sh["offsets"]) - 1)]

    def _open(self, folder: Path) -> dict:
        return {p.stem: np.load(p, mmap_mode="r") for p in folder.glob("*.npy")}

    def __len__(self) -> int:
        return len(self._index)

    def item_labels(self, i: int) -> np.ndarray:
        """[T] the target's greedy labels of conversation ``i`` (read without the hidden states)."""
        si, j = self._index[i]
        sh = self._shards[si]
        return np.asarray(sh["labels"][int(sh["offsets"][j]) : int(sh["offsets"][j + 1])], dtype=np.int64)

    def item_len(self, i: int) -> int:
        si, j = self._index[i]
        off = self._shards[si]["offsets"]
        return int(off[j + 1] - off[j])

    @property
    def layers(self) -> list[int]:
        return self.spec.layers

    @property
    def num_tokens(self) -> int:
        return sum(int(sh["offsets"][-1]) for sh in self._shards)

    def item(self, i: int, layers: list[int] | None = None) -> dict:
        """Conversation ``i``: hidden [T, L', H] (the layers asked for, in that order; all by default) as a
        float tensor, and ids, labels [T] long, answer [T] bool, topk_ids [T, K] long, topk_logp [T, K] float."""
        si, j = self._index[i]
        sh = self._shards[si]
        a, b = int(sh["offsets"][j]), int(sh["offsets"][j + 1])
        pick = list(range(len(self.layers))) if layers is None else [self.layers.index(x) for x in layers]
        raw = torch.from_numpy(np.ascontiguousarray(sh["hidden"][a:b][:, pick]))
        out = {"hidden": raw.view(_DTYPES[self.spec.dtype]).float(), "ids": torch.from_numpy(sh["ids"][a:b].astype(np.int64)),
               "labels": torch.from_numpy(sh["labels"][a:b].astype(np.int64)), "answer": torch.from_numpy(sh["answer"][a:b].copy())}
        if self.spec.topk:
            out["topk_ids"] = torch.from_numpy(sh["topk_ids"][a:b].astype(np.int64))
            out["topk_logp"] = torch.from_numpy(sh["topk_logp"][a:b].astype(np.float32))
        return out


class EpochSampler(Sampler):
    """A new seeded random order every epoch (the Trainer calls :meth:`set_epoch`); every process computes
    the same order, so N processes still split one global order.

    With ``lengths`` (per item) and ``batch_size``, items are grouped by length: the epoch's random order is
    cut into windows of ``group`` batches, each window sorted by length and cut into batches, and the
    batches shuffled, so a batch pads little while every epoch still sees a new order and new batches.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, lengths: list[int] | None = None, batch_size: int = 1,
                 group: int = 16) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self.lengths, self.batch_size, self.group = lengths, batch_size, group

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is None or self.batch_size <= 1:
            return iter(order)
        window = self.batch_size * self.group
        batches = []
        for w in range(0, self.n, window):
            part = sorted(order[w : w + window], key=lambda i: self.lengths[i])
            batches += [part[b : b + self.batch_size] for b in range(0, len(part), self.batch_size)]
        return iter([i for k in torch.randperm(len(batches), generator=g).tolist() for i in batches[k]])


# ---------------------------------------------------------------------------------------------------- extraction
def _key(fingerprint: str, data_key: str, spec: FeatureSpec, shard_items: int) -> str:
    return hashlib.sha1(json.dumps([FORMAT, fingerprint, data_key, asdict(spec), shard_items]).encode()).hexdigest()[:16]


@torch.inference_mode()
def _features(model, batch: list[Tensor], spec: FeatureSpec) -> list[dict]:
    """One right-padded forward over a few sequences; per sequence its arrays (padding never reaches a real
    position: attention is causal and the pads come after). Only the layers asked for are captured."""
    from specdec.runner import tapped_forward

    t = max(x.numel() for x in batch)
    ids = torch.zeros(len(batch), t, dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : x.numel()] = x
    out, hidden = tapped_forward(model, tuple(spec.layers), input_ids=ids.to(model.device))
    hidden = hidden.view(len(batch), t, len(spec.layers), -1)  # [B, T, L, H]
    logits = out.logits
    res = []
    for i, x in enumerate(batch):
        n = x.numel()
        item = {"hidden": hidden[i, :n].to(_DTYPES[spec.dtype]).cpu().view(torch.int16).numpy(),
                "labels": logits[i, :n].argmax(-1).int().cpu().numpy()}
        if spec.topk:
            top = torch.log_softmax(logits[i, :n].float(), -1).topk(spec.topk, dim=-1)
            item["topk_ids"] = top.indices.int().cpu().numpy()
            item["topk_logp"] = top.values.half().cpu().numpy()
        res.append(item)
    return res


def _shard_items(folder: Path) -> int:
    """How many conversations a finished shard holds (-1: none there)."""
    path = folder / "offsets.npy"
    return len(np.load(path, mmap_mode="r")) - 1 if path.is_file() else -1


def _write_shard(folder: Path, items: list[dict]) -> None:
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    lengths = [len(it["ids"]) for it in items]
    np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    for name in items[0]:
        np.save(tmp / f"{name}.npy", np.concatenate([it[name] for it in items]))
    old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
    if folder.exists():  # a shard of a smaller extraction, redone with more conversations
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def extract_store(model, tokenizer, conversations: list[list[dict]], out: str | os.PathLike, spec: FeatureSpec, *,
                  data_key: str, shard_items: int = 256, batch_tokens: int = 2048, progress: bool = True) -> FeatureStore:
    """Extract (or finish extracting) the features of ``conversations`` into ``out``; returns the opened store.

    ``data_key`` names the data (e.g. the distilled directory and its token total): a store of other data, another
    model or another spec is refused instead of mixed in. A store of the first n conversations grows to more
    (its last, partial shard is redone); the first n items of a store are the first n conversations. Conversations are cut at ``spec.max_len`` tokens and
    batched by up to ``batch_tokens`` padded tokens per forward.
    """
    from tqdm.auto import tqdm

    from specdec.training.data import tokenize_conversation
    from specdec.training.distill import lock_dir, model_fingerprint, write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if spec.forward_dtype and getattr(model, "dtype", None) != getattr(torch, spec.forward_dtype):
        model = copy.deepcopy(model).to(getattr(torch, spec.forward_dtype))  # a copy: the caller's model stays as it is
    lock = lock_dir(out, "feature extraction")
    try:
        key = _key(model_fingerprint(model, tokenizer), data_key, spec, shard_items)
        manifest_path = out / "manifest.json"
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("key") != key:
                raise ValueError(f"{out} holds features of other data, model or settings ({manifest.get('spec')}, data "
                                 f"{manifest.get('data')}); give another directory")
        else:  # written first, so a killed first run's shards are never mixed with another setting's
            manifest = {"format": FORMAT, "key": key, "data": data_key, "spec": asdict(spec), "shards": [], "items": 0, "wall_time_s": 0.0}
            write_json(manifest_path, manifest)
        if manifest.get("items", 0) > len(conversations):
            raise ValueError(f"{out} already holds {manifest['items']} conversations' features, more than the "
                             f"{len(conversations)} given; open it with FeatureStore (any prefix of it serves)")
        starts = list(range(0, len(conversations), shard_items))
        names = [f"shard-{s // shard_items:05d}" for s in starts]
        # a shard is done when it holds all its conversations (the last one of a smaller extraction is redone)
        todo = [(s, n) for s, n in zip(starts, names) if _shard_items(out / n) != min(shard_items, len(conversations) - s)]
        t0 = time.perf_counter()
        bar = tqdm(total=len(conversations), initial=len(conversations) - sum(min(shard_items, len(conversations) - s) for s, _ in todo),
                   desc="features", unit="conv", disable=not progress)
        for start, name in todo:
            convs = conversations[start : start + shard_items]
            seqs = [tokenize_conversation(tokenizer, c, spec.max_len) for c in convs]
            items: list[dict] = [{} for _ in convs]
            order = sorted(range(len(seqs)), key=lambda i: seqs[i].numel())
            while order:  # batches of similar lengths, up to batch_tokens padded tokens
                group = [order.pop()]
                while order and seqs[order[-1]].numel() * (len(group) + 1) <= batch_tokens:
                    group.append(order.pop())
                for i, f in zip(group, _features(model, [seqs[i] for i in group], spec)):
                    items[i] = f
                bar.update(len(group))
            for i, (conv, ids) in enumerate(zip(convs, seqs)):
                items[i]["ids"] = ids.int().numpy()
                items[i]["answer"] = answer_mask(tokenizer, conv, ids).numpy()
            _write_shard(out / name, items)
            manifest["wall_time_s"] = round(manifest["wall_time_s"] + time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            write_json(manifest_path, manifest)
        bar.close()
        manifest["shards"] = [{"name": n, "items": min(shard_items, len(conversations) - s)} for s, n in zip(starts, names)]
        manifest["items"] = len(conversations)
        write_json(manifest_path, manifest)
    finally:
        lock.close()
    return FeatureStore(out)
