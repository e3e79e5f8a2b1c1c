"""specdec bench end to end on a tiny random model: schema and arithmetic of the report."""

import json

import pytest
import torch

from conftest import tiny_model
from specdec.bench import load_questions, run_bench
from specdec.cli import main

METRIC_KEYS = {"prompts", "new_tokens", "target_forwards", "mean_accepted_length", "tokens_per_s", "speedup_vs_hf_greedy",
               "speedup_vs_none", "identical_to_greedy", "identical_to_plain", "tokens_per_step_histogram"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_tokenizer):
    path = tmp_path_factory.mktemp("tinybench")
    model = tiny_model("qwen2", vocab_size=len(default_tokenizer), dtype=torch.float32, seed=4)
    model.generation_config.eos_token_id = default_tokenizer.eos_token_id
    model.save_pretrained(path)
    default_tokenizer.save_pretrained(path)
    return path


def check_metrics(m):
    assert METRIC_KEYS <= set(m)
    # prefill and decoding apart: a first token came before the end, and decoding is the time after it
    assert 0 < m["ttft_s_median"] <= m["wall_time_s"] and m["prefill_tokens_per_s"] > 0
    assert 0 < m["decode_tokens_per_s"] and m["decode_speedup_vs_hf_greedy"] > 0
    assert m["mean_accepted_length"] == pytest.approx(m["new_tokens"] / m["target_forwards"], abs=1e-3)
    assert m["tokens_per_s"] == pytest.approx(m["new_tokens"] / m["wall_time_s"], rel=1e-2)
    assert 0 <= m["identical_to_greedy"] <= m["prompts"] and 0 <= m["identical_to_plain"] <= m["prompts"]


def test_bench_report_schema_and_arithmetic(tiny_dir, tmp_path):
    out = tmp_path / "report"
    rc = main(["bench", "--model", str(tiny_dir), "--drafter", "prompt-lookup", "--drafter", "none", "--prompts", "mt-bench",
               "--limit", "1", "--categories", "writing,coding,math", "--max-new-tokens", "12", "--profile", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    for key, typ in [("model", str), ("device", str), ("dtype", str), ("threads", int), ("max_new_tokens", int),
                     ("temperature", float), ("specdec_version", str), ("runs", list), ("fast", bool), ("cost_profile", dict)]:
        assert isinstance(report[key], typ), key
    assert report["cost_profile"]["v"]["1"] == 1.0 and set(report["cost_profile"]["v"]) >= {"1", "2", "8", "64"}
    names = [r["drafter"] for r in report["runs"]]
    assert names == ["hf-greedy", "hf-prompt-lookup", "prompt-lookup", "none"]
    runs = {r["drafter"]: r for r in report["runs"]}
    for r in report["runs"]:
        check_metrics(r["overall"])
        assert set(r["by_category"]) == {"writing", "coding", "math"}
        for m in r["by_category"].values():
            check_metrics(m)
        assert sum(m["new_tokens"] for m in r["by_category"].values()) == r["overall"]["new_tokens"]
    greedy = runs["hf-greedy"]["overall"]
    assert greedy["speedup_vs_hf_greedy"] == pytest.approx(1.0, abs=1e-3)
    assert greedy["identical_to_greedy"] == greedy["prompts"] == 3 and greedy["mismatches"] == []
    plain = runs["none"]["overall"]
    assert plain["speedup_vs_none"] == pytest.approx(1.0, abs=1e-3) and plain["identical_to_plain"] == 3
    for name in ("prompt-lookup", "none"):
        m = runs[name]["overall"]
        assert m["identical_to_plain"] == 3  # lossless: equal to the engine's own plain decoding on every prompt
        assert len(m["mismatches"]) == 3 - m["identical_to_greedy"]  # every difference from HF is listed
        for x in m["mismatches"]:
            assert set(x) == {"question_id", "turn", "position", "margin"} and x["margin"] >= 0
        assert m["speedup_vs_hf_greedy"] == pytest.approx(greedy["wall_time_s"] / m["wall_time_s"], rel=1e-2)
        assert m["speedup_vs_none"] == pytest.approx(plain["wall_time_s"] / m["wall_time_s"], rel=1e-2)
        # decode steps emit every token but the one each prefill gives
        assert sum(int(k) * v for k, v in m["tokens_per_step_histogram"].items()) >= m["new_tokens"] - m["prompts"]
        assert set(runs[name]["profile"]) == {"draft", "forward", "accept", "commit", "other"}
    md = (out / "report.md").read_text()
    assert "| prompt-lookup |" in md and "speedup.png" in md and "Cost profile used" in md
    assert "## Prefill and decoding apart" in md
    assert plain["decode_speedup_vs_none"] == pytest.approx(1.0, abs=1e-3)
    assert greedy["decode_speedup_vs_hf_greedy"] == pytest.approx(1.0, abs=1e-3)
    assert (out / "speedup.png").stat().st_size > 1000 and (out / "accepted_lengths.png").stat().st_size > 1000


def test_interrupt_writes_a_partial_report(tiny_dir, tmp_path, monkeypatch):
    from specdec import bench, load_model

    model, tok = load_model(tiny_dir)
    calls = {"n": 0}
    real = bench._ours

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 6:  # warm-up (2: none + prompt-lookup) + two prompts, then Ctrl-C
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(bench, "_ours", flaky)
    qs = load_questions("mt-bench", limit=1)
    report = run_bench(model, tok, ["prompt-lookup"], qs, out_dir=tmp_path, model_name="tiny", max_new_tokens=6, progress=False)
    assert report["partial"] is True
    assert all(r["overall"]["prompts"] == 2 for r in report["runs"])
    assert json.loads((tmp_path / "report.json").read_text())["partial"] is True


def test_question_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_questions(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": []}\n')
    with pytest.raises(ValueError, match="turns"):
        load_questions(str(bad))
    with pytest.raises(ValueError, match="unknown categories"):
        load_questions("spec-bench", categories=["nope"])
    qs = load_questions("spec-bench", limit=2)
    assert len(qs) == 2 * 13


def test_throughput_mode_reports_tokens_per_second_per_batch_size(tiny_dir, tmp_path):
    out = tmp_path / "tp"
    rc = main(["bench", "--model", str(tiny_dir), "--drafter", "prompt-lookup", "--prompts", "mt-bench", "--limit", "1",
               "--categories", "writing,coding,math,roleplay", "--max-new-tokens", "6", "--batch-size", "1", "--batch-size", "2",
               "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["throughput"]
    assert {(r["method"], r["batch_size"]) for r in rows} == {(m, b) for m in ("hf-greedy", "none", "prompt-lookup") for b in (1, 2)}
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(r["new_tokens"] / r["wall_time_s"], rel=1e-2)
        assert r["groups"] == 4 // r["batch_size"]
    assert "batch 2" in (out / "report.md").read_text()


def test_the_long_context_set_is_what_its_builder_makes_and_every_prompt_is_3_to_7k_tokens(default_tokenizer):
    """``--prompts longctx``: 4 tasks × 6 prompts of 3–7K tokens, rebuilt bit for bit by benchmarks/build_longctx.py."""
    import importlib.util
    from pathlib import Path

    questions = load_questions("longctx")
    assert len(questions) == 24
    cats = {}
    for q in questions:
        cats[q["category"]] = cats.get(q["category"], 0) + 1
        n = len(default_tokenizer(q["turns"][0], add_special_tokens=False)["input_ids"])
        assert 3000 <= n <= 7000, (q["question_id"], n)
    assert cats == {"multi_doc_qa": 6, "long_doc_qa": 6, "summarization": 6, "extraction": 6}
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "build_longctx.py"
    spec = importlib.util.spec_from_file_location("build_longctx", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build(default_tokenizer) == questions


def test_the_report_shows_the_curves_measured_after_long_prefixes():
    from specdec.bench import _markdown

    cost = {"step_ms": 20.0, "v": {"1": 1.0, "4": 1.1, "16": 1.5}, "linear_plan": {"1": "torch"},
            "curves": {"4096": {"step_ms": 45.0, "v": {"1": 1.0, "16": 1.1}}}}
    text = _markdown({"model": "m", "device": "cpu", "dtype": "float32", "threads": 2, "max_new_tokens": 4, "temperature": 0.0,
                      "fast": True, "specdec_version": "x", "cost_profile": cost, "partial": False, "runs": []}, [])
    row = next(line for line in text.splitlines() if "after 4096 tokens" in line)
    assert "45.0 ms a step" in row and row.rstrip(" |").endswith("1.10")  # v(16) after 4096 tokens
    assert "| 1.02 |" in row  # v(4) between the measured 1 and 16: linear


def test_llama_cpp_peer_errors_are_clear_and_come_before_model_work(tiny_dir, tmp_path, monkeypatch, capsys):
    """--llama-cpp needs a GGUF model and llama-cpp-python, and compares greedy single sequences only."""
    args = ["bench", "--drafter", "prompt-lookup", "--prompts", "mt-bench", "--limit", "1", "--llama-cpp", "--out", str(tmp_path / "o")]
    assert main([*args[:1], "--model", str(tiny_dir), *args[1:]]) != 0
    assert "not one" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # as if not installed
    assert main([*args[:1], "--model", "default", *args[1:]]) != 0
    assert "needs llama-cpp-python" in capsys.readouterr().err
    assert main([*args[:1], "--model", "default", *args[1:], "--temperature", "0.7"]) != 0
    assert "greedy" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_llama_cpp_peer_columns_on_the_default_model(tmp_path):
    """With llama-cpp-python installed: its plain and prompt-lookup columns appear, with the own-greedy count."""
    pytest.importorskip("llama_cpp")
    from specdec.models import default_gguf_path, load_model

    model, tok = load_model("default")
    questions = load_questions("spec-bench", limit=1, categories=["coding", "summarization"])
    report = run_bench(model, tok, ["prompt-lookup"], questions, out_dir=tmp_path, model_name="default",
                       max_new_tokens=24, progress=False, llama_cpp=default_gguf_path())
    runs = {e["drafter"]: e["overall"] for e in report["runs"]}
    assert runs["llama.cpp"]["new_tokens"] > 0 and runs["llama.cpp"]["tokens_per_s"] > 0
    assert 0 <= runs["llama.cpp-prompt-lookup"]["identical_to_own_greedy"] <= 2
    assert "llama.cpp's own plain greedy" in (tmp_path / "report.md").read_text()
