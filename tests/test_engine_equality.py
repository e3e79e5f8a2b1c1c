"""Greedy speculative output equals plain HF greedy output, token for token."""

import pytest
import torch

import specdec
from conftest import hf_greedy, tiny_model
from drafters_for_tests import OracleDrafter, RandomDrafter
from specdec.drafters import PromptLookupConfig, PromptLookupDrafter


def random_prompt(g, vocab, lo=1, hi=40, repetitive=False):
    n = int(torch.randint(lo, hi, (1,), generator=g))
    if repetitive:  # copy-heavy prompts give prompt lookup something to match
        base = torch.randint(0, vocab, (max(2, n // 3),), generator=g)
        return base.repeat(3)[:n] if n > 1 else base[:1]
    return torch.randint(0, vocab, (n,), generator=g)


@pytest.mark.parametrize("drafter", ["prompt-lookup", "none", "prompt-lookup:adaptive=false,min_ngram=1,max_candidates=4"])
def test_random_prompts_match_hf_greedy(tiny, drafter):
    g = torch.Generator().manual_seed(1)
    vocab = tiny.config.vocab_size
    for i in range(12):
        ids = random_prompt(g, vocab, repetitive=i % 2 == 0)
        n = int(torch.randint(1, 48, (1,), generator=g))
        ref = hf_greedy(tiny, ids, n, min_new_tokens=n)
        out = specdec.generate(tiny, None, ids, drafter=drafter, max_new_tokens=n)
        assert out.token_ids == ref, f"prompt {i} ({ids.numel()} tokens, {n} new)"
        assert out.text is None and out.finish_reason == "length"
        assert out.stats.new_tokens == n


def test_prompt_ending_mid_ngram_and_single_token_prompt(tiny):
    vocab = tiny.config.vocab_size
    # prompt ends with the first half of an n-gram that occurred before: lookup proposes the old continuation
    ids = torch.tensor([3, 4, 5, 6, 7, 8, 3, 4, 5, 6, 7, 8, 3, 4])
    for prompt in (ids, ids[:1]):
        ref = hf_greedy(tiny, prompt, 30, min_new_tokens=30)
        assert specdec.generate(tiny, None, prompt, max_new_tokens=30).token_ids == ref
    assert vocab > 8


def test_self_drafting_accepts_everything(tiny):
    ids = torch.tensor([1, 2, 3, 4, 5])
    ref = hf_greedy(tiny, ids, 41, min_new_tokens=41)
    k = 4
    out = specdec.generate(tiny, None, ids, drafter=OracleDrafter(ids.numel(), ref, k), max_new_tokens=41)
    assert out.token_ids == ref
    # 1 token from the prefill, then k + 1 per step: 40 / 5 = 8 forwards
    assert out.stats.target_forwards == 8
    assert out.stats.tokens_per_step == [k + 1] * 8


def test_random_drafting_accepts_almost_nothing_and_stays_exact(tiny):
    ids = torch.tensor([7, 8, 9])
    ref = hf_greedy(tiny, ids, 30, min_new_tokens=30)
    out = specdec.generate(tiny, None, ids, drafter=RandomDrafter(tiny.config.vocab_size), max_new_tokens=30)
    assert out.token_ids == ref
    assert out.stats.mean_accepted_length < 1.5


def test_stops_at_eos_where_hf_does(tiny):
    ids = torch.tensor([11, 12, 13, 11, 12])
    free = hf_greedy(tiny, ids, 25, min_new_tokens=25)
    eos = free[9]  # a token greedy emits mid-way becomes the end-of-sequence token
    first = free.index(eos)
    tiny.generation_config.eos_token_id = eos
    try:
        ref = hf_greedy(tiny, ids, 25)
        for drafter in ("prompt-lookup", OracleDrafter(ids.numel(), free, 6)):
            out = specdec.generate(tiny, None, ids, drafter=drafter, max_new_tokens=25)
            assert out.token_ids == ref == free[: first + 1]
            assert out.finish_reason == "eos"
    finally:
        tiny.generation_config.eos_token_id = None


def test_max_new_tokens_cuts_mid_step(tiny):
    ids = torch.tensor([1, 2, 3])
    ref = hf_greedy(tiny, ids, 13, min_new_tokens=13)
    out = specdec.generate(tiny, None, ids, drafter=OracleDrafter(3, ref + [0] * 10, 5), max_new_tokens=13)
    assert out.token_ids == ref and len(out.token_ids) == 13
    assert specdec.generate(tiny, None, ids, max_new_tokens=0).token_ids == []


def test_drafter_instances_are_reusable(tiny):
    drafter = PromptLookupDrafter(PromptLookupConfig(max_ngram=2))
    ids = torch.tensor([5, 6, 5, 6, 5])
    first = specdec.generate(tiny, None, ids, drafter=drafter, max_new_tokens=20)
    second = specdec.generate(tiny, None, ids, drafter=drafter, max_new_tokens=20)
    assert first.token_ids == second.token_ids == hf_greedy(tiny, ids, 20, min_new_tokens=20)


def test_stop_strings_and_streaming_match_hf(default_tokenizer):
    tok = default_tokenizer
    model = tiny_model("llama", vocab_size=len(tok), seed=3)
    model.generation_config.eos_token_id = tok.eos_token_id
    prompt = "The cat sat on the mat. The cat sat on the"
    ids = torch.tensor(tok(prompt)["input_ids"])
    free = hf_greedy(model, ids, 30, min_new_tokens=30)
    text = tok.decode(free[:12])
    stop = text[-3:] if text[-3:].strip() else text[-5:]
    ref = hf_greedy(model, ids, 30, stop_strings=[stop], tokenizer=tok)
    out = specdec.generate(model, tok, prompt, max_new_tokens=30, stop=stop)
    assert out.token_ids == ref and out.finish_reason == "stop"
    assert stop in out.text
    holder = {}
    pieces = list(specdec.stream(model, tok, prompt, max_new_tokens=30, result=holder))
    assert "".join(pieces) == holder["result"].text == tok.decode(free, skip_special_tokens=True)


def test_stats_report_the_first_token_apart_from_decoding(tiny):
    """GenerationStats: time to the first token (prefill included) and decode-only speed, for one prompt and a batch."""
    out = specdec.generate(tiny, None, torch.tensor([1, 2, 3, 1, 2]), drafter="prompt-lookup", max_new_tokens=20)
    s = out.stats
    assert s.prefill_time_s <= s.first_token_s < s.wall_time_s
    assert s.decode_tokens_per_s == pytest.approx(19 / (s.wall_time_s - s.first_token_s))
    assert s.as_dict()["first_token_s"] == round(s.first_token_s, 4)
    batch = specdec.generate(tiny, None, [torch.tensor([4, 5, 6]), torch.tensor([7, 8, 9, 7])], drafter="none", max_new_tokens=8)
    for r in batch:
        assert 0 < r.stats.first_token_s < r.stats.wall_time_s and r.stats.decode_tokens_per_s > 0
