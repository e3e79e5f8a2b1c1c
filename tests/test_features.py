"""The feature store: what it holds equals the target's own forward; a killed extraction resumes to the same
bytes; another spec is refused; training streams it in a new order every epoch."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from specdec.training.features import EpochSampler, FeatureSpec, answer_mask, extract_store


@pytest.fixture(scope="module")
def target(tmp_path_factory, default_tokenizer):
    from conftest import save_tiny_target

    from specdec import load_model

    path = save_tiny_target(tmp_path_factory.mktemp("target"), default_tokenizer)
    return path, load_model(str(path))


def conversations(n=9):
    return [[{"role": "user", "content": f"Say something about the number {i}." * (1 + i % 3)},
             {"role": "assistant", "content": f"The number {i} is a number. " * (1 + i % 4)}] for i in range(n)]


SPEC = dict(layers=[1, 2, -1], max_len=96, topk=4, dtype="bfloat16")


def test_the_store_holds_the_targets_own_features(target, tmp_path):
    _, (model, tok) = target
    convs = conversations()
    store = extract_store(model, tok, convs, tmp_path / "f", FeatureSpec(**SPEC), data_key="t", shard_items=4, progress=False)
    assert len(store) == 9 and [s["name"] for s in store.manifest["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    from specdec.training.data import tokenize_conversation

    for i in (0, 5, 8):
        ids = tokenize_conversation(tok, convs[i], 96)
        with torch.inference_mode():
            out = model(input_ids=ids[None], output_hidden_states=True)
        item = store.item(i)
        assert torch.equal(item["ids"], ids)
        assert item["hidden"].shape == (ids.numel(), 3, model.config.hidden_size)
        for j, layer in enumerate(SPEC["layers"]):
            torch.testing.assert_close(item["hidden"][:, j], out.hidden_states[layer][0].bfloat16().float(), rtol=0, atol=0.02)
        torch.testing.assert_close(store.item(i, layers=[-1, 1])["hidden"], item["hidden"][:, [2, 0]])
        logp = torch.log_softmax(out.logits[0].float(), -1)
        assert torch.equal(item["labels"], logp.argmax(-1))
        assert torch.equal(item["topk_ids"][:, 0], item["labels"])
        torch.testing.assert_close(item["topk_logp"], logp.topk(4, -1).values, rtol=1e-3, atol=1e-3)  # fp16
        assert item["answer"].any() and not item["answer"][:3].any()  # the user turn comes first
    assert isinstance(store._shards[0]["hidden"], np.memmap)  # read through memory maps, not loaded


def test_a_bfloat16_forward_extracts_into_its_own_store(target, tmp_path):
    _, (model, tok) = target
    convs = conversations(3)
    spec = FeatureSpec(**dict(SPEC, forward_dtype="bfloat16"))
    store = extract_store(model, tok, convs, tmp_path / "f", spec, data_key="t", shard_items=4, progress=False)
    assert model.dtype == torch.float32  # the caller's model is not cast
    assert store.manifest["spec"]["forward_dtype"] == "bfloat16"
    full = extract_store(model, tok, convs, tmp_path / "g", FeatureSpec(**SPEC), data_key="t", shard_items=4, progress=False)
    a, b = store.item(2), full.item(2)
    assert torch.equal(a["ids"], b["ids"]) and not torch.equal(a["hidden"], b["hidden"])  # computed in another dtype
    torch.testing.assert_close(a["hidden"], b["hidden"], rtol=0.05, atol=0.1)
    with pytest.raises(ValueError, match="other data, model or settings"):  # never mixed with a float32 store
        extract_store(model, tok, convs, tmp_path / "f", FeatureSpec(**SPEC), data_key="t", shard_items=4, progress=False)
    with pytest.raises(ValueError, match="forward_dtype"):
        FeatureSpec(forward_dtype="int8")


def test_a_store_grows_to_more_conversations_of_the_same_data(target, tmp_path):
    _, (model, tok) = target
    convs = conversations(9)
    small = extract_store(model, tok, convs[:5], tmp_path / "f", FeatureSpec(**SPEC), data_key="t", shard_items=4, progress=False)
    assert len(small) == 5
    grown = extract_store(model, tok, convs, tmp_path / "f", FeatureSpec(**SPEC), data_key="t", shard_items=4, progress=False)
    whole = extract_store(model, tok, convs, tmp_path / "g", FeatureSpec(**SPEC), data_key="t", shard_items=4, progress=False)
    assert len(grown) == 9 and grown.manifest["items"] == 9
    for i in range(9):
        a, b = grown.item(i), whole.item(i)
        assert all(torch.equal(a[k], b[k]) for k in b)
    with pytest.raises(ValueError, match="already holds 9"):
        extract_store(model, tok, convs[:3], tmp_path / "f", FeatureSpec(**SPEC), data_key="t", shard_items=4, progress=False)


def test_auto_feature_dtype_is_timed_and_recorded(target):
    from specdec.training.features import fastest_forward_dtype

    _, (model, _) = target
    first = fastest_forward_dtype(model, tokens=256, repeats=1)
    assert first in ("", "bfloat16")
    assert fastest_forward_dtype(copy.deepcopy(model).to(torch.bfloat16)) == ""  # not float32: kept as it is
    assert model.dtype == torch.float32
    # decided once per model and machine: the cached choice is what later calls get (so repeated runs agree)
    from specdec.profile import _profile_dir, profile_key

    key = {**profile_key(model, fast=False), "measure": "bulk forward dtype", "tokens": 256}
    files = [f for f in _profile_dir().glob("forward-dtype-*.json") if json.loads(f.read_text()).get("key") == key]
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["choice"] == first
    record["choice"] = "" if first else "bfloat16"
    files[0].write_text(json.dumps(record))
    assert fastest_forward_dtype(model, tokens=256, repeats=1) == record["choice"]
    files[0].write_text("{damaged")  # a damaged file is timed again and rewritten
    assert fastest_forward_dtype(model, tokens=256, repeats=1) in ("", "bfloat16")
    assert json.loads(files[0].read_text())["key"] == record["key"]


def test_answer_mask_marks_the_assistant_text(default_tokenizer):
    tok = default_tokenizer
    conv = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello friend"}]
    from specdec.training.data import tokenize_conversation

    ids = tokenize_conversation(tok, conv, 100)
    mask = answer_mask(tok, conv, ids)
    assert "Hello friend" in tok.decode(ids[mask]) and "Hi there" not in tok.decode(ids[mask])


def test_a_killed_extraction_resumes_to_the_same_store(target, tmp_path):
    path, (model, tok) = target
    convs = conversations(12)
    whole = extract_store(model, tok, convs, tmp_path / "whole", FeatureSpec(**SPEC), data_key="t", shard_items=2, progress=False)
    data = tmp_path / "convs.json"
    data.write_text(json.dumps(convs))
    out = tmp_path / "killed"
    script = ("import json, sys; from specdec import load_model; from specdec.training.features import FeatureSpec, extract_store; "
              f"m, t = load_model({str(path)!r}); c = json.load(open({str(data)!r})); "
              f"extract_store(m, t, c, {str(out)!r}, FeatureSpec(**{SPEC!r}), data_key='t', shard_items=2, batch_tokens=96, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "shard-00001" / "offsets.npy").is_file():
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = sorted(p.name for p in out.glob("shard-*"))
    assert proc.returncode == -signal.SIGKILL and 0 < len(done) < 6, done
    with pytest.raises(ValueError, match="other data"):  # a different spec never mixes into it
        extract_store(model, tok, convs, out, FeatureSpec(**{**SPEC, "topk": 2}), data_key="t", shard_items=2, progress=False)
    again = extract_store(model, tok, convs, out, FeatureSpec(**SPEC), data_key="t", shard_items=2, progress=False)
    assert len(again) == len(whole) == 12
    for i in range(12):
        a, b = again.item(i), whole.item(i)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.glob(".*.tmp"))


def test_every_epoch_reads_the_store_in_a_new_order():
    s = EpochSampler(50, seed=3)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert sorted(first) == sorted(second) == list(range(50)) and first != second
    s.set_epoch(0)
    assert list(s) == first  # every process computes the same order for an epoch


def test_the_trainer_draws_a_new_order_each_epoch(target, tmp_path):
    """Through HF Trainer: the order the module sees differs between epochs (the Trainer calls set_epoch)."""
    from torch import nn

    from specdec.training.trainer import DrafterTrainer
    from transformers import TrainingArguments

    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, index):
            seen.extend(index.tolist())
            return {"loss": (self.w - 1).pow(2).sum()}

    data = [{"index": torch.tensor(i)} for i in range(12)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, seed=5, logging_steps=100)
    trainer = DrafterTrainer(model=Probe(), args=args, train_dataset=data, data_collator=lambda b: {"index": torch.stack([x["index"] for x in b])},
                             sampler=EpochSampler(len(data), seed=5))
    trainer.train()
    assert sorted(seen[:12]) == sorted(seen[12:]) == list(range(12)) and seen[:12] != seen[12:]


def test_length_grouped_batches_pad_little_and_change_every_epoch():
    lengths = [int(x) for x in torch.randint(5, 500, (96,), generator=torch.Generator().manual_seed(0))]
    s = EpochSampler(96, seed=1, lengths=lengths, batch_size=4, group=8)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert sorted(first) == sorted(second) == list(range(96)) and first != second

    def padding(order):
        return sum(max(lengths[i] for i in order[b : b + 4]) * 4 - sum(lengths[i] for i in order[b : b + 4]) for b in range(0, 96, 4))

    assert padding(first) < 0.5 * padding(list(EpochSampler(96, seed=1)))  # against a plain shuffle


def test_skip_trains_on_conversations_after_the_skipped_ones_with_a_store_of_their_own(target, tmp_path):
    """``skip``: the held-out conversations stay the first ones; the training ones start ``skip`` later, and
    their features go to a store keyed apart from the unskipped one (never mixed up)."""
    from specdec.training.common import start_run, target_features
    from specdec.training.config import TrainConfig

    path, _ = target
    convs = conversations(9)
    data = tmp_path / "convs.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    common = dict(model=str(path), data=str(data), heldout=2, num_conversations=3, max_len=96, progress=False,
                  features_dir=str(tmp_path / "f"))
    plain = TrainConfig(**common, output_dir=str(tmp_path / "a"))
    skipped = TrainConfig(**common, skip=3, output_dir=str(tmp_path / "b"))
    _, model, tok, held, train = start_run(plain)
    assert held == convs[:2] and train == convs[2:5]
    _, _, _, held_s, train_s = start_run(skipped)
    assert held_s == convs[:2] and train_s == convs[5:8]
    target_features(model, tok, held + train, plain)
    with pytest.raises(ValueError, match="other data"):  # the plain store is not read as the skipped one's
        target_features(model, tok, held_s + train_s, skipped)
    skipped.features_dir = str(tmp_path / "g")
    _, feats = target_features(model, tok, held_s + train_s, skipped)
    from specdec.training.data import tokenize_conversation

    assert torch.equal(feats[0]["ids"], tokenize_conversation(tok, convs[5], 96))
    with pytest.raises(ValueError, match="skip"):
        TrainConfig(**common, skip=-1)
