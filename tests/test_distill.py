"""Self-distillation at scale: a killed run resumes to exactly what an uninterrupted run writes; one writer
per output; settings that change the answers are checked; deduplication; the store reads back."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import zlib

import pytest
import torch

from specdec.training.data import load_conversations
from specdec.training.distill import (DistillConfig, DistillLocked, _read_members, distill, lock_dir, model_fingerprint, read_distilled,
                                      select_prompts)


@pytest.fixture(scope="module")
def target(tmp_path_factory, default_tokenizer):
    from conftest import save_tiny_target

    path = save_tiny_target(tmp_path_factory.mktemp("target"), default_tokenizer)
    from specdec import load_model

    return path, load_model(str(path))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """40 conversations: every third has a second user turn, and two repeat an earlier first turn."""
    path = tmp_path_factory.mktemp("src") / "convs.jsonl"
    with path.open("w") as f:
        for i in range(40):
            first = f"Question number {i % 38}:  tell me   something." if i >= 38 else f"Question number {i}: tell me something."
            msgs = [{"role": "user", "content": first}, {"role": "assistant", "content": "ShareGPT's answer."}]
            if i % 3 == 0:
                msgs += [{"role": "user", "content": f"And then what about {i}?"}, {"role": "assistant", "content": "More."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def records(out):
    from specdec.training.distill import iter_records

    return sorted((r["id"], r["turn"], json.dumps(r["messages"]), r["answer_tokens"]) for r in iter_records(out))


def test_duplicates_are_dropped_and_turns_kept(source):
    users = select_prompts(load_conversations(str(source)))
    assert len(users) == 38  # ids 38 and 39 repeat 0 and 1 up to case and whitespace
    assert users[3] == ["Question number 3: tell me something.", "And then what about 3?"]


def test_a_killed_distillation_resumes_to_exactly_the_uninterrupted_set(target, source, tmp_path):
    path, (model, tok) = target
    cfg = DistillConfig(prompts=str(source), turns=2, max_new_tokens=40, max_batch=3, shard_size=10)
    whole = distill(model, tok, tmp_path / "whole", cfg, progress=False)
    assert whole["conversations"] == 38 and whole["answers"] == 38 + 13  # 13 of the 38 have a second turn
    assert len(whole["shards"]) == 4  # 10 conversations a shard

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "specdec.cli", "data", "distill", "--model", str(path), "--prompts", str(source), "--out", str(out),
           "--turns", "2", "--max-new-tokens", "40", "--batch-size", "3", "--shard-size", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "shard-00000.jsonl.gz").is_file():
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = records(out)
    assert 0 < len(partial) < 38 + 13  # killed mid-run
    with (out / "shard-00000.jsonl.gz").open("ab") as f:  # and as if the kill had cut a member half-written
        member = zlib.compressobj(9, zlib.DEFLATED, 31)
        f.write((member.compress(b'{"id": 99, "turn": 1}\n' * 50) + member.flush())[:30])
    assert records(out) == partial  # the cut member is not read

    again = distill(model, tok, out, cfg, progress=False)
    assert records(out) == records(tmp_path / "whole")
    assert again["answer_tokens"] == whole["answer_tokens"] and len(again["runs"]) == 1  # the killed run never wrote one
    with gzip.open(out / "shard-00000.jsonl.gz", "rt") as f:  # every shard is a valid gzip file for any reader
        assert all(json.loads(line)["id"] < 40 for line in f)


def test_a_second_run_on_the_same_output_is_refused(target, source, tmp_path):
    _, (model, tok) = target
    out = tmp_path / "d"
    out.mkdir()
    holder = lock_dir(out)  # another run holds the output
    try:
        with pytest.raises(DistillLocked, match=f"pid {os.getpid()}"):
            distill(model, tok, out, DistillConfig(prompts=str(source), max_new_tokens=4), progress=False)
    finally:
        holder.close()
    assert not list(out.glob("shard-*"))  # nothing was written
    distill(model, tok, out, DistillConfig(prompts=str(source), limit=4, turns=1, max_new_tokens=4), progress=False)


def test_settings_that_change_answers_must_match_and_the_store_reads_back(target, source, tmp_path):
    _, (model, tok) = target
    out = tmp_path / "d"
    m = distill(model, tok, out, DistillConfig(prompts=str(source), limit=6, turns=1, max_new_tokens=5), progress=False)
    assert m["conversations"] == 6 and m["answer_tokens"] == 30  # a random model never says EOS: 5 tokens each
    with pytest.raises(ValueError, match="max_new_tokens"):
        distill(model, tok, out, DistillConfig(prompts=str(source), limit=6, turns=1, max_new_tokens=6), progress=False)
    m = distill(model, tok, out, DistillConfig(prompts=str(source), limit=8, turns=2, max_new_tokens=5), progress=False)
    assert m["conversations"] == 8 and m["answers"] == 8 + 3  # limit and turns may grow
    convs = load_conversations(str(out))
    assert [len(c) for c in convs] == [4, 2, 2, 4, 2, 2, 4, 2]  # ids 0, 3, 6 have two turns
    assert [r["id"] for r in read_distilled(out)] == list(range(8))
    assert convs[3][0]["content"].startswith("Question number 3") and convs[3][2]["content"] == "And then what about 3?"


def test_the_fingerprint_names_the_weights_not_their_dtype(target):
    import copy

    from specdec import load_model

    path, (model, tok) = target
    fp = model_fingerprint(model, tok)
    assert model_fingerprint(load_model(str(path), dtype="bfloat16")[0], tok) == fp  # the same model, generating in bf16
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(iter(other.parameters())).view(-1)[0] += 1.0
    assert model_fingerprint(other, tok) != fp


def test_line_separators_inside_answers_do_not_end_a_record(tmp_path):
    from specdec.training.distill import _Writer

    out = tmp_path / "d"
    out.mkdir()
    writer = _Writer(out, shard_size=10)
    texts = ["one\u2028two", "three\x85four", "five\x0bsix\x1cseven", "plain"]
    for i, t in enumerate(texts):
        writer.add({"id": i, "turn": 1, "messages": [{"role": "user", "content": t}, {"role": "assistant", "content": t}]})
    writer.flush()
    assert [r["messages"][0]["content"] for r in read_distilled(out, partial=True)] == texts
    size = (out / "shard-00000.jsonl.gz").stat().st_size
    _Writer(out, shard_size=10)  # a rerun opens the last shard: it must not cut it at such a character
    assert (out / "shard-00000.jsonl.gz").stat().st_size == size and len(read_distilled(out, partial=True)) == 4


def test_read_members_stops_at_a_cut_member(tmp_path):
    path = tmp_path / "s.jsonl.gz"
    blobs = []
    for k in range(3):
        c = zlib.compressobj(9, zlib.DEFLATED, 31)
        blobs.append(c.compress(json.dumps({"id": k}).encode() + b"\n") + c.flush())
    path.write_bytes(blobs[0] + blobs[1] + blobs[2][:-5])
    recs, end = _read_members(path)
    assert [r["id"] for r in recs] == [0, 1] and end == len(blobs[0]) + len(blobs[1])
