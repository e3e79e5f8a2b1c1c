"""Training beyond one process: torchrun with 2 CPU processes (gloo), and DeepSpeed ZeRO-2 on the CPU."""

import json
import os
import socket
import subprocess
import sys

import torch

from specdec.drafters.medusa import MedusaHeads
from test_training import ROOT, convs, overrides, tiny_target  # noqa: F401  (fixtures)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, env=None):
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_two_gloo_processes_match_one_process(tiny_target, convs, tmp_path):  # noqa: F811
    # feature_dtype pinned: "auto" is decided per model, machine and thread count (torchrun gives each process one
    # thread), so the two runs could time fp32 against bf16 separately and extract in different dtypes
    common = dict(max_steps=6, epochs=5, lr=3e-3, save_steps=100, feature_dtype="float32")
    run([sys.executable, "-m", "specdec.cli", "train", "--recipe", "medusa1-smollm2-cpu",
         *overrides(tiny_target, convs, tmp_path / "one", batch_size=4, **common)])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "specdec.cli", "train", "--recipe", "medusa1-smollm2-cpu",
         *overrides(tiny_target, convs, tmp_path / "two", batch_size=2, **common)])
    one = MedusaHeads.from_pretrained(tmp_path / "one" / "final").state_dict()
    two = MedusaHeads.from_pretrained(tmp_path / "two" / "final").state_dict()
    moved = sum(float(v.abs().sum()) for k, v in one.items() if "blocks" in k)
    assert moved > 0  # training changed the heads
    for key in one:  # same global batches, same normalisation: only summation order differs
        torch.testing.assert_close(one[key], two[key], rtol=1e-3, atol=1e-4)


def test_deepspeed_zero2_runs_real_steps_on_the_cpu(tiny_target, convs, tmp_path):  # noqa: F811
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}))
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = run([sys.executable, "-m", "specdec.cli", "train", "--recipe", "medusa1-smollm2-cpu",
                *overrides(tiny_target, convs, tmp_path / "ds", max_steps=4, deepspeed=str(ds), logging_steps=1)], env=env)
    assert (tmp_path / "ds" / "final" / "model.safetensors").is_file()
    state = MedusaHeads.from_pretrained(tmp_path / "ds" / "final").state_dict()
    assert sum(float(v.abs().sum()) for k, v in state.items() if "blocks" in k) > 0
    assert "zero" in (proc.stdout + proc.stderr).lower() or (tmp_path / "ds").is_dir()
