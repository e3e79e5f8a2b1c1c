"""Generation through the tree kernel inside the model's own attention layers stays token-identical."""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

import specdec
from conftest import hf_greedy, tiny_model
from drafters_for_tests import OracleDrafter


def tiny_mistral():
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=1, max_position_embeddings=512, sliding_window=None)
    m = MistralForCausalLM(cfg).to(torch.float32).eval()
    m.generation_config.eos_token_id = None
    return m


@pytest.mark.parametrize("make", [lambda: tiny_model("llama", dtype=torch.float32), lambda: tiny_model("qwen2", dtype=torch.float32), tiny_mistral],
                         ids=["llama", "qwen2", "mistral"])
def test_triton_attention_generation_equals_greedy(make):
    model = make().to("cuda" if torch.cuda.is_available() else "cpu")
    ids = torch.tensor([5, 6, 7, 5, 6, 7, 5])
    ref = hf_greedy(model, ids, 20, min_new_tokens=20)
    before = model.config._attn_implementation
    for drafter in ("prompt-lookup:adaptive=false", OracleDrafter(ids.numel(), ref, 4)):
        out = specdec.generate(model, None, ids, drafter=drafter, max_new_tokens=20, attn="triton")
        assert out.token_ids == ref
    assert model.config._attn_implementation == before  # restored afterwards


def test_bad_attn_option():
    with pytest.raises(ValueError, match="attn"):
        specdec.generate(tiny_model("llama"), None, torch.tensor([1, 2]), attn="flash")


def test_routing_is_counted_so_overlapping_generations_cannot_undo_each_other():
    from specdec.tree_attention.hf import IMPLEMENTATION, Routing

    model = tiny_model("llama")
    own = model.config._attn_implementation
    first, second = Routing(model), Routing(model)
    assert second.previous == own
    first.restore()
    assert model.config._attn_implementation == IMPLEMENTATION  # the second generation still runs routed
    first.restore()  # idempotent: does not count twice
    assert model.config._attn_implementation == IMPLEMENTATION
    second.restore()
    assert model.config._attn_implementation == own


def test_generations_on_threads_sharing_one_model_equal_each_alone():
    import threading

    model = tiny_model("qwen2")
    prompts = [torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 14, 20)]
    alone = [specdec.generate(model, None, p, drafter="prompt-lookup", max_new_tokens=40).token_ids for p in prompts]
    got = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def run(i):
        start.wait()
        got[i] = specdec.generate(model, None, prompts[i], drafter="prompt-lookup", max_new_tokens=40).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone
    assert model.config._attn_implementation != "specdec_tree"
