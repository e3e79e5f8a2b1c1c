"""The training subsystem on a tiny model: data, Medusa-1, Medusa-2, resume, wandb, recipes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from specdec.drafters.medusa import MedusaHeads
from specdec.training import load_recipe, recipe_names, train
from specdec.training.data import iter_sharegpt, load_conversations

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["cats", "the sea", "bread", "trains", "winter", "music", "chess", "rivers", "clocks", "gardens", "rain", "bees"]


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory, default_tokenizer):
    path = tmp_path_factory.mktemp("target")
    model = tiny_model("llama", vocab_size=len(default_tokenizer), dtype=torch.float32, seed=7)
    model.save_pretrained(path)
    default_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def convs(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "convs.jsonl"
    with path.open("w") as f:
        for i, t in enumerate(TOPICS * 2):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Tell me about {t}, please ({i})."},
                                             {"role": "assistant", "content": f"Here is a short note about {t}. " * 3}]}) + "\n")
    return path


def settings(target, data, out, **extra):
    base = dict(model=str(target), data=str(data), output_dir=str(out), features_dir="", num_conversations=20, heldout=4, max_len=48,
                depth=3, draft_vocab_size=256, batch_size=4, max_steps=6, epochs=1, lr=3e-3, save_steps=100,
                logging_steps=2, progress=False, skip=0, store_layers="-1", bf16=False)  # the recipes' data keys, undone
    base.update(extra)
    return base


def test_medusa1_trains_logs_head_accuracy_and_ships_a_drafter(tiny_target, convs, tmp_path):
    import specdec

    cfg = load_recipe("medusa1-smollm2-cpu", settings(tiny_target, convs, tmp_path / "run"))
    final = train(cfg)
    heads = MedusaHeads.from_pretrained(final)
    assert heads.config.num_heads == 3 and heads.config.draft_vocab_size == 256
    acc = heads.config.extra["heldout_accuracy"]
    assert len(acc) == 3 and all(len(row) == 5 for row in acc)
    assert heads.config.tree and all(len(p) <= 3 for p in heads.config.tree)
    model, tok = specdec.load_model(tiny_target)
    out = specdec.generate(model, tok, "Tell me about cats", drafter=f"medusa:{final}", max_new_tokens=16)
    ref = model.generate(**tok("Tell me about cats", return_tensors="pt"), do_sample=False, max_new_tokens=16)
    assert out.token_ids == ref[0, -len(out.token_ids):].tolist()


def test_a_time_budget_stops_with_a_checkpoint_and_the_rerun_finishes(tiny_target, convs, tmp_path):
    cfg = load_recipe("medusa1-smollm2-cpu", settings(tiny_target, convs, tmp_path / "run", max_steps=6, max_time_s=1e-6))
    extra = MedusaHeads.from_pretrained(train(cfg)).config.extra
    assert extra["stopped_by_time"] and extra["train_steps"] == 1  # stops after the first step
    assert (tmp_path / "run" / "checkpoint-1" / "trainer_state.json").is_file()
    assert extra["peak_rss_mb"] > 50 and extra["train_time_s"] > 0 and extra["trained_on"] == str(convs)
    if Path("/proc/self/status").is_file():  # Linux: the training's own memory, apart from mapped store pages
        assert 50 < extra["peak_anon_mb"] <= extra["peak_rss_mb"]
    cfg = load_recipe("medusa1-smollm2-cpu", settings(tiny_target, convs, tmp_path / "run", max_steps=6))
    extra = MedusaHeads.from_pretrained(train(cfg)).config.extra
    assert not extra["stopped_by_time"] and extra["train_steps"] == 6


def test_methods_with_fewer_conversations_share_a_bigger_store(tiny_target, convs, tmp_path):
    store = tmp_path / "store"
    train(load_recipe("medusa1-smollm2-cpu", settings(tiny_target, convs, tmp_path / "a", features_dir=str(store), max_steps=1)))
    manifest = (store / "manifest.json").read_text()
    assert json.loads(manifest)["items"] == 24
    final = train(load_recipe("medusa1-smollm2-cpu", settings(tiny_target, convs, tmp_path / "b", features_dir=str(store), max_steps=1,
                                                             num_conversations=10)))
    assert (store / "manifest.json").read_text() == manifest  # served from the store, not extracted again
    assert MedusaHeads.from_pretrained(final).config.extra["train_conversations"] == 10


def test_medusa1_loss_falls_and_per_head_metrics_are_logged(tiny_target, convs, tmp_path):
    from transformers import TrainerCallback

    seen = []

    class Grab(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs or {}))

    from specdec.training import trainer as tr

    class Tracked(tr.DrafterTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.add_callback(Grab())

    import specdec.training.trainer as trainer_mod

    real = trainer_mod.DrafterTrainer
    trainer_mod.DrafterTrainer = Tracked
    try:
        train(load_recipe(None, settings(tiny_target, convs, tmp_path / "run", max_steps=20, epochs=5)))
    finally:
        trainer_mod.DrafterTrainer = real
    losses = [l["loss"] for l in seen if "loss" in l]
    assert losses[-1] < losses[0]
    assert any("head0_top1" in l and "head2_top5" in l for l in seen)


def run_cli(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "specdec.cli", *args], env={**os.environ, **(env or {})}, cwd=ROOT, **kw)


def overrides(target, data, out, **extra):
    return [f"{k}={v}" for k, v in settings(target, data, out, **extra).items()]


def test_a_killed_run_resumes_from_its_checkpoint_with_nothing_lost(tiny_target, convs, tmp_path):
    args = ["train", "--recipe", "medusa1-smollm2-cpu"]
    # long enough that the run is still going when its second checkpoint appears, even on a fast machine
    # feature_dtype pinned: "auto" times fp32 against bf16 in each process, and on a host where the two are close
    # the uninterrupted run and the killed one could extract their features in different dtypes (a resumed run
    # reuses its own store, so resuming itself is not affected)
    extra = dict(max_steps=200, save_steps=5, epochs=100, save_total_limit=3, feature_dtype="float32")
    whole = run_cli(args + overrides(tiny_target, convs, tmp_path / "whole", **extra))
    assert whole.wait(timeout=600) == 0
    proc = run_cli(args + overrides(tiny_target, convs, tmp_path / "killed", **extra))
    deadline = time.time() + 600

    def past_second_checkpoint() -> bool:  # (any of them: on a fast host checkpoint-10 may already be rotated away)
        steps = [int(p.parent.name.split("-")[1]) for p in (tmp_path / "killed").glob("checkpoint-*/trainer_state.json")]
        return any(10 <= s < 200 for s in steps)

    while not past_second_checkpoint():
        assert proc.poll() is None and time.time() < deadline, "run ended before its second checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    again = run_cli(args + overrides(tiny_target, convs, tmp_path / "killed", **extra))
    assert again.wait(timeout=600) == 0
    a = MedusaHeads.from_pretrained(tmp_path / "whole" / "final").state_dict()
    b = MedusaHeads.from_pretrained(tmp_path / "killed" / "final").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_medusa2_trains_lora_and_heads_and_merges(tiny_target, convs, tmp_path):
    import specdec

    final = train(load_recipe(None, settings(tiny_target, convs, tmp_path / "m2", method="medusa2", max_steps=4,
                                             medusa={"lora_r": 4, "head_warmup_steps": 2, "lora_targets": "q_proj,v_proj"})))
    merged, tok = specdec.load_model(final / "target")
    base, _ = specdec.load_model(tiny_target)
    ids = torch.tensor(tok("Tell me about rain")["input_ids"])
    assert not torch.allclose(merged(ids[None]).logits, base(ids[None]).logits)  # the LoRA moved the target
    out = specdec.generate(merged, tok, ids, drafter=f"medusa:{final}", max_new_tokens=12)
    ref = merged.generate(ids[None], attention_mask=torch.ones_like(ids[None]), do_sample=False, max_new_tokens=12)
    assert out.token_ids == ref[0, ids.numel():].tolist()


def test_medusa2_merged_model_equals_the_adapter_model(tiny_target):
    from peft import LoraConfig, get_peft_model

    import specdec

    model, _ = specdec.load_model(tiny_target)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        adapted = peft_model(ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_wandb_offline_run_is_recorded(tiny_target, convs, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(load_recipe(None, settings(tiny_target, convs, tmp_path / "w", max_steps=3, report_to="wandb", run_name="specdec-test")))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].glob("*.wandb"))


def test_recipes_parse_and_gpu_deepspeed_config_validates():
    from deepspeed.runtime.config import DeepSpeedConfig

    names = recipe_names()
    assert {"medusa1-smollm2-cpu", "medusa1-vicuna7b-gpu", "medusa2-vicuna7b-gpu"} <= set(names)
    for name in names:
        cfg = load_recipe(name)
        ds = cfg.deepspeed_config()
        if ds:
            resolved = json.loads(json.dumps(ds).replace('"auto"', "1"))
            resolved["bf16"] = {"enabled": True}
            parsed = DeepSpeedConfig(resolved)
            assert parsed.zero_optimization_stage == 2
    with pytest.raises(ValueError, match="stage"):
        DeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 7}})


@pytest.mark.parametrize("bad, match", [(["epochz=1"], "unknown setting"), (["lr=fast"], "number"), (["method=hydra"], "method"),
                                        (["shuffle=maybe"], "true or false"), (["batch_size=0"], "batch_size"),
                                        (["num_heads=3"], "it is now 'depth'"), (["ppd_groups=2"], "ppd.groups"),
                                        (["clover.augmnt=false"], "the clover section has augment"), (["hydra.layers=2"], "unknown section"),
                                        (["clover.augment=maybe"], "true or false"), (["ppd.groups=0"], "ppd.groups")])
def test_bad_settings_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        load_recipe("medusa1-smollm2-cpu", bad)
    with pytest.raises(FileNotFoundError, match="no recipe"):
        load_recipe("no-such-recipe")


def test_method_settings_sit_in_their_sections(tmp_path):
    cfg = load_recipe("gad-smollm2-cpu", ["gad.window=8", "depth=6", "clover.augment=false", "eagle.layers=1,2"])
    assert (cfg.gad.window, cfg.gad.windows, cfg.gad.layers, cfg.depth) == (8, 24, 2, 6)  # the recipe's other gad settings stay
    assert cfg.clover.augment is False and cfg.eagle.layers == [1, 2]
    assert cfg.to_dict()["gad"] == {"layers": 2, "window": 8, "windows": 24}
    old = tmp_path / "old.yaml"
    old.write_text("method: ppd\nppd_groups: 4\n")
    with pytest.raises(ValueError, match="it is now 'ppd.groups'"):
        load_recipe(str(old))
    nested = tmp_path / "new.yaml"
    nested.write_text("method: ppd\nppd:\n  groups: 4\n  aggregation: learned\n")
    cfg = load_recipe(str(nested), {"ppd": {"virtual": 2}})
    assert (cfg.ppd.groups, cfg.ppd.aggregation, cfg.ppd.virtual) == (4, "learned", 2)


def test_truncated_sharegpt_is_parsed_up_to_the_break(tmp_path):
    rec = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    text = "[" + ",\n".join(json.dumps(dict(rec, id=str(i))) for i in range(5)) + ',\n{"id": "cut", "conversations": [{"from": "hu'
    path = tmp_path / "sg.json"
    path.write_text(text)
    convs = list(iter_sharegpt(path))
    assert len(convs) == 5 and convs[0] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_real_sharegpt_file_yields_its_conversations():
    convs = load_conversations("sharegpt", limit=50, skip=10)
    assert len(convs) == 50 and all(c[0]["role"] == "user" for c in convs)


def test_kl_loss_equals_cross_entropy_against_one_hot_targets_and_trains(tiny_target, convs, tmp_path):
    from specdec.training.medusa import MedusaLoss

    torch.manual_seed(0)
    vocab = torch.arange(10)
    loss = MedusaLoss(10, vocab, decay=0.5)
    logits = torch.randn(2, 1, 6, 10)
    labels = torch.randint(0, 10, (1, 6))
    onehot = torch.full((1, 6, 10), -1e4).scatter(-1, labels[..., None], 0.0)  # target puts all mass on the label
    ce, _ = loss(logits, labels)
    kl, _ = loss(logits, labels, target_logits=onehot)
    torch.testing.assert_close(kl, ce, rtol=1e-4, atol=1e-4)
    final = train(load_recipe(None, settings(tiny_target, convs, tmp_path / "kl", loss_type="kl", max_steps=3)))
    assert MedusaHeads.from_pretrained(final).config.num_heads == 3


def test_resume_skips_a_checkpoint_cut_by_the_kill(tmp_path):
    from specdec.training.common import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path) is None
    for step, state in ((5, "{}"), (10, "{}"), (15, None), (20, '{"cut')):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
        if state is not None:
            (d / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
