"""The cost profile: measured once per model and setting, cached, interpolated; and `specdec profile`."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from specdec import profile as prof
from specdec.cli import main
from specdec.profile import CostProfile, get_profile, load_profile, measure_profile, profile_key, save_profile


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("n, expected, why", [
    (1, 1.0, "a plain step is the unit"),
    (3, 1.3, "halfway between v(2) = 1.2 and v(4) = 1.4"),
    (8, 2.0, "a measured point"),
    (12, 2.5, "between 8 and 16"),
    (32, 5.0, "past the last point: the last slope (1/8 per node) continues"),
])
def test_cost_interpolates_between_measured_points(n, expected, why):
    p = CostProfile(step_ms=10.0, v={1: 1.0, 2: 1.2, 4: 1.4, 8: 2.0, 16: 3.0})
    assert p.cost(n) == pytest.approx(expected), why


def test_cost_answers_for_a_replaced_curve_not_the_remembered_one():
    p = CostProfile(step_ms=10.0, v={1: 1.0, 2: 1.2, 4: 1.4})
    assert p.cost(3) == pytest.approx(1.3) and p.cost(3) == pytest.approx(1.3)  # the second answer is the kept one
    p.v = {1: 1.0, 2: 2.0, 4: 4.0}
    assert p.cost(3) == pytest.approx(3.0)


def test_measure_save_load_round_trip(cache_dir):
    model = tiny_model("llama", dtype=torch.float32)
    p = measure_profile(model, fast=True, repeats=2)
    assert p.v[1] == 1.0 and set(p.v) == set(prof.NODE_COUNTS) and p.step_ms > 0
    assert p.key == profile_key(model, fast=True) and set(p.linear_plan) == {"1", "2", "4", "8", "16", "32", "64"}
    save_profile(p)
    again = load_profile(p.key)
    assert again.v == p.v and again.linear_plan == p.linear_plan and again.linear_invariant == p.linear_invariant
    other = dict(p.key, threads=p.key["threads"] + 1)
    assert load_profile(other) is None  # another thread count is another machine setting
    assert profile_key(model, fast=False) != p.key


def test_get_profile_measures_once_then_reads_the_cache(cache_dir, monkeypatch):
    model = tiny_model("qwen2", dtype=torch.float32)
    first = get_profile(model, fast=True, progress=False)

    def fail(*a, **k):
        raise AssertionError("measured again although a cached profile fits")

    monkeypatch.setattr(prof, "measure_profile", fail)
    assert get_profile(model, fast=True, progress=False).v == first.v


def test_a_damaged_cache_file_is_measured_again(cache_dir):
    model = tiny_model("llama", dtype=torch.float32)
    p = get_profile(model, fast=False, progress=False)
    path = next((cache_dir / "profiles").glob("*.json"))
    path.write_text('{"step_ms": 1.0, "v": ')  # a write cut short
    assert load_profile(p.key) is None
    assert get_profile(model, fast=False, progress=False).v[1] == 1.0
    json.loads(path.read_text())  # rewritten whole


def test_profile_cli_json(cache_dir, tmp_path, capsys):
    model = tiny_model("llama", vocab_size=96, dtype=torch.float32)
    model.save_pretrained(tmp_path / "m")
    _tokenizer_for(tmp_path / "m")
    # a real process: whatever libraries log while loading must not reach stdout, which holds only the JSON
    run = subprocess.run([sys.executable, "-m", "specdec.cli", "profile", "--model", str(tmp_path / "m"), "--json",
                          "--plot", str(tmp_path / "v.png")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert out["v"]["1"] == 1.0 and set(out["v"]) == {str(n) for n in prof.NODE_COUNTS} and out["step_ms"] > 0
    assert (tmp_path / "v.png").stat().st_size > 1000
    assert main(["profile", "--model", str(tmp_path / "m")]) == 0  # the cached one, as a table
    assert "| v(n) |" in capsys.readouterr().out
    assert main(["profile", "--model", str(tmp_path / "m"), "--threads", "0"]) == 2


def _tokenizer_for(path):
    """A tiny word-level tokenizer, so the directory loads as a model (profile never tokenises)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")))
    tok.save_pretrained(path)


def test_batch_profile_is_measured_over_rows_and_nodes_then_cached(cache_dir, monkeypatch):
    from specdec.profile import BatchCostProfile, get_batch_profile

    model = tiny_model("llama", dtype=torch.float32)
    first = get_batch_profile(model, fast=False, progress=False)
    assert sorted(first.v) == list(prof.BATCH_ROWS) and all(sorted(r) == list(prof.BATCH_NODES) for r in first.v.values())
    assert first.v[1][1] == 1.0
    for b in first.v:  # never cheaper with more nodes or more rows
        assert all(first.v[b][n] <= first.v[b][m] for n, m in zip(prof.BATCH_NODES, prof.BATCH_NODES[1:]))
    for n in prof.BATCH_NODES:
        assert all(first.v[b][n] <= first.v[c][n] for b, c in zip(prof.BATCH_ROWS, prof.BATCH_ROWS[1:]))
    assert first.cost(4, 8) == pytest.approx(first.v[4][8])

    def fail(*a, **k):
        raise AssertionError("measured again although a cached profile fits")

    monkeypatch.setattr(prof, "measure_batch_profile", fail)
    assert get_batch_profile(model, fast=False, progress=False).v == first.v
    assert isinstance(first, BatchCostProfile)


def test_batch_cost_interpolates_in_nodes_then_rows():
    from specdec.profile import BatchCostProfile

    p = BatchCostProfile(step_ms=10.0, v={1: {1: 1.0, 4: 1.3}, 4: {1: 1.2, 4: 2.4}})
    assert p.cost(1, 4) == pytest.approx(1.3)
    assert p.cost(4, 2) == pytest.approx(1.6)  # a third of the way from 1.2 to 2.4
    assert p.cost(2, 1) == pytest.approx(1.0 + 0.2 / 3)  # between rows 1 and 4 at one node
    assert p.cost(8, 4) == pytest.approx(2.4 + (2.4 - 1.3) * 4 / 3)  # past the last row count: the last slope goes on


def _long_profile(**extra) -> CostProfile:
    return CostProfile(step_ms=10.0, v={1: 1.0, 4: 2.0, 16: 5.0}, curves={1024: {"step_ms": 20.0, "v": {1: 1.0, 4: 1.2, 16: 2.0}}}, **extra)


@pytest.mark.parametrize("n, prefix, expected, why", [
    (4, 100, 2.0, "short prefix: the base curve"),
    (4, 1024, 1.2, "a measured prefix: its own curve"),
    (4, 576, (0.5 * 10 * 2.0 + 0.5 * 20 * 1.2) / 15.0, "halfway: the milliseconds weighted, over the interpolated step"),
    (4, 5000, 1.2, "past the longest measured prefix: its curve"),
    (8, 1024, 1.2 + (2.0 - 1.2) * 4 / 12, "between node counts, as before"),
])
def test_a_profile_with_long_prefix_curves_answers_for_the_prefix(n, prefix, expected, why):
    p = _long_profile()
    assert p.cost_at(n, prefix) == pytest.approx(expected), why
    assert p.step_ms_at(576) == pytest.approx(15.0) and p.step_ms_at(9000) == pytest.approx(20.0)
    ctx = prof.ContextCost(p)
    ctx.prefix = prefix
    assert ctx(n) == pytest.approx(expected) and ctx.step_ms == pytest.approx(p.step_ms_at(prefix))


def test_long_prefix_curves_survive_the_cache_and_show_in_the_table(cache_dir):
    p = _long_profile(key={"model": "m"})
    save_profile(p)
    again = load_profile({"model": "m"})
    assert again.curves == p.curves and again.cost_at(4, 1024) == pytest.approx(1.2)
    assert "after 1024 (20.0 ms a step)" in p.table()


def test_generation_sizes_trees_with_the_curve_of_its_prefix_length(cache_dir):
    """A profile whose base curve makes any tree unaffordable and whose curve after 256 tokens makes trees free:
    a short prompt decodes plainly, a long one drafts (both lossless)."""
    import specdec
    from conftest import hf_greedy

    model = tiny_model("llama", dtype=torch.float32)
    key = profile_key(model, fast=True)
    save_profile(CostProfile(step_ms=1.0, v={1: 1.0, 2: 40.0, 64: 2000.0}, key=key,
                             curves={256: {"step_ms": 1.0, "v": {1: 1.0, 2: 1.0, 64: 1.0}}}))
    pattern = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12])
    for length, drafts in ((24, False), (320, True)):
        ids = pattern.repeat(length // 8)
        out = specdec.generate(model, None, ids, drafter="prompt-lookup", max_new_tokens=16)
        assert out.token_ids == hf_greedy(model, ids, 16, min_new_tokens=16)
        assert (out.stats.drafted_tokens > 0) == drafts, length


def test_curves_after_long_prefixes_are_measured_and_kept(cache_dir):
    model = tiny_model("llama", dtype=torch.float32)
    p = prof.add_prefix_curves(model, [64, 300], fast=True, progress=False)
    assert sorted(p.curves) == [300] and p.curves[300]["v"][1] == 1.0 and p.curves[300]["step_ms"] > 0
    assert load_profile(profile_key(model, fast=True)).curves.keys() == {300}
    with pytest.raises(ValueError, match="context"):
        prof.add_prefix_curves(model, [500], fast=True, progress=False)  # 500 + 64 nodes > 512 positions
