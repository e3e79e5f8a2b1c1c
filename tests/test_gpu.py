"""On a CUDA GPU: the same engine, every tensor on the device. Runs where CUDA is present (benchmarks/gpu_check.sh)."""

import pytest
import torch

import specdec
from conftest import hf_greedy, tiny_model
from drafters_for_tests import OracleDrafter, RandomDrafter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run benchmarks/gpu_check.sh there)")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def gpu_model(request):
    return tiny_model(request.param, dtype=torch.float32).to("cuda")


@pytest.mark.parametrize("attn", ["torch", "triton"])
def test_greedy_on_cuda_equals_hf_greedy(gpu_model, attn):
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        ids = torch.randint(0, 96, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g)
        ref = hf_greedy(gpu_model, ids.cuda(), 24, min_new_tokens=24)
        for drafter in ("prompt-lookup:adaptive=false", "none", OracleDrafter(ids.numel(), ref, 4), RandomDrafter(96)):
            out = specdec.generate(gpu_model, None, ids, drafter=drafter, max_new_tokens=24, attn=attn)
            assert out.token_ids == ref, (i, drafter, attn)


def test_sampling_on_cuda_runs_and_reproduces(gpu_model):
    ids = torch.tensor([3, 4, 5, 3, 4, 5, 3])
    runs = [specdec.generate(gpu_model, None, ids, drafter="prompt-lookup", max_new_tokens=20, temperature=1.0, seed=7).token_ids
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 20
    typical = specdec.generate(gpu_model, None, ids, drafter="prompt-lookup", max_new_tokens=20, temperature=0.7,
                               acceptance="typical", seed=3)
    assert len(typical.token_ids) == 20


def test_bf16_cuda_profile_and_generation():
    model = tiny_model("llama", dtype=torch.bfloat16).to("cuda")
    out = specdec.generate(model, None, torch.tensor([1, 2, 3, 1, 2]), drafter="prompt-lookup", max_new_tokens=12, dtype="bfloat16")
    assert len(out.token_ids) == 12
