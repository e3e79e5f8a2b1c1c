import os

import torch

# Triton's interpreter must be chosen before any @triton.jit function is defined: on the CPU the kernel
# runs interpreted; on a CUDA machine (benchmarks/gpu_check.sh) it runs for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "SPECDEC_TEST_CACHE" not in os.environ:  # measured profiles and converted models go to a temporary cache, never the user's
    import tempfile

    import atexit
    import shutil

    os.environ["SPECDEC_TEST_CACHE"] = os.environ["SPECDEC_CACHE"] = tempfile.mkdtemp(prefix="specdec-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SPECDEC_CACHE"], ignore_errors=True)

import pytest
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_model(arch: str, vocab_size: int = 96, seed: int = 0, dtype=torch.float64):
    """A tiny random causal LM. float64 keeps argmax ties (and so spurious mismatches) out of equality tests."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def default_model():
    from specdec import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer alone (the model's weights are not loaded)."""
    from specdec.models import load_tokenizer

    return load_tokenizer("default")


def save_tiny_target(path, tokenizer, seed: int = 7):
    """A tiny random Llama with the default model's tokenizer, saved as a model directory (for training tests)."""
    model = tiny_model("llama", vocab_size=len(tokenizer), dtype=torch.float32, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_conversations(path, pairs):
    """A conversations .jsonl of (user, assistant) pairs."""
    import json

    with open(path, "w") as f:
        for user, assistant in pairs:
            f.write(json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}) + "\n")
    return path


def hf_greedy(model, ids: torch.Tensor, n: int, **kwargs) -> list[int]:
    """Plain HF greedy generation: the reference every drafter must reproduce."""
    ids = ids.to(model.device)
    out = model.generate(ids[None], attention_mask=torch.ones(1, ids.numel(), dtype=torch.long, device=model.device),
                         do_sample=False, max_new_tokens=n, **kwargs)
    return out[0, ids.numel():].tolist()


def assert_greedy_equals_hf_on_random_prompts(model, drafter, label="", prompts: int = 4, n: int = 24) -> None:
    """A drafter's greedy output equals HF greedy on random prompts of random lengths, with trees sized by the
    measured cost and untrimmed (then it must also have drafted something)."""
    import specdec

    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    for i in range(prompts):
        ids = torch.randint(0, vocab, (int(torch.randint(2, 25, (1,), generator=g)),), generator=g)
        ref = hf_greedy(model, ids, n, min_new_tokens=n)
        for sized in (False, True):
            out = specdec.generate(model, None, ids, drafter=drafter, max_new_tokens=n, size_trees=sized)
            assert out.token_ids == ref, (i, label, sized)
            if not sized:
                assert out.stats.drafted_tokens > 0
