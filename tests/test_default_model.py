"""End-to-end checks on the embedded default model (SmolLM2-135M-Instruct)."""

import pytest
import torch

import specdec
from conftest import hf_greedy
from specdec.engine import prepare_input_ids

pytestmark = pytest.mark.default_model

CHAT = [
    "What is the capital of France? Answer in one sentence.",
    "Give me three tips for staying focused while studying.",
    "Correct the grammar: 'She don't like apples and he go to school by bus every days.'",
]

COPY_HEAVY = (
    "Fix the spelling mistakes in this paragraph and return the corrected paragraph:\n\n"
    "The quick brown fox jumpd over the lazy dog. Then the dog woke up and chasd the fox accross the field, "
    "but the fox was to fast and escaped into the forrest."
)


@pytest.mark.parametrize("question", CHAT)
def test_greedy_equals_hf_on_chat_prompts(default_model, question):
    model, tok = default_model
    msgs = [{"role": "user", "content": question}]
    ids = prepare_input_ids(tok, msgs)
    ref = hf_greedy(model, ids, 48)
    out = specdec.generate(model, tok, msgs, drafter="prompt-lookup", max_new_tokens=48)
    assert out.token_ids == ref
    assert out.text == tok.decode(ref, skip_special_tokens=True)


def test_prompt_lookup_accepts_long_runs_on_copy_heavy_prompts(default_model):
    model, tok = default_model
    msgs = [{"role": "user", "content": COPY_HEAVY}]
    out = specdec.generate(model, tok, msgs, drafter="prompt-lookup", max_new_tokens=64)
    assert out.token_ids == hf_greedy(model, prepare_input_ids(tok, msgs), 64)
    assert out.stats.mean_accepted_length > 1.5, out.stats.as_dict()


def test_shipped_medusa_heads_are_lossless_and_accept_tokens(default_model):
    model, tok = default_model
    msgs = [{"role": "user", "content": "Explain what a hash table is in two sentences."}]
    ref = hf_greedy(model, prepare_input_ids(tok, msgs), 48)
    for drafter in ("medusa", "medusa+prompt-lookup"):
        out = specdec.generate(model, tok, msgs, drafter=drafter, max_new_tokens=48)
        assert out.token_ids == ref
        assert out.stats.mean_accepted_length > 1.2, out.stats.as_dict()
