"""Sampling settings: seeds, typical acceptance, warping, options."""

import pytest
import torch

import specdec
from conftest import hf_greedy
from specdec.tree import TokenTree
from specdec.verifiers import SamplingConfig, SpeculativeSampler, TypicalVerifier, Warper, make_verifier


def test_a_seed_makes_a_sampled_run_reproducible(tiny):
    ids = torch.tensor([4, 5, 6, 4, 5])
    runs = [specdec.generate(tiny, None, ids, max_new_tokens=24, temperature=0.9, top_p=0.95, seed=7).token_ids for _ in range(2)]
    assert runs[0] == runs[1]
    other = specdec.generate(tiny, None, ids, max_new_tokens=24, temperature=0.9, top_p=0.95, seed=8).token_ids
    assert other != runs[0]  # a different seed gives a different sample (24 tokens, 96-way vocabulary)


@pytest.mark.parametrize("temperature", [0.0, 1e-4])
def test_typical_acceptance_at_temperature_to_zero_is_greedy(tiny, temperature):
    ids = torch.tensor([9, 8, 7, 9, 8])
    ref = hf_greedy(tiny, ids, 30, min_new_tokens=30)
    out = specdec.generate(tiny, None, ids, max_new_tokens=30, temperature=temperature, acceptance="typical", seed=0)
    assert out.token_ids == ref


def test_typical_rule_on_hand_made_logits():
    # root p = softmax([4, 3, -9, -9]) -> ~[0.73, 0.27, 0, 0], entropy ~0.58, threshold min(0.09, 0.3 e^-0.58) = 0.09
    tree = TokenTree(torch.tensor([0, 1, 2]), torch.tensor([-1, 0, 0]))
    logits = torch.tensor([[4.0, 3.0, -9.0, -9.0], [0.0, 0.0, 0.0, 9.0], [0.0, 0.0, 0.0, 0.0]])
    acc = TypicalVerifier(SamplingConfig(temperature=1.0)).accept(tree, logits, torch.Generator().manual_seed(0))
    assert acc.path.tolist() == [0, 1]  # token 1 (p=0.27) plausible, token 2 (p~0) not
    assert acc.bonus == 3  # p at node 1 is ~one-hot on 3


def test_point_mass_worked_example_from_the_docstring():
    """p = [0.5, 0.3, 0.2]; children 1 then 2 -> outputs distributed exactly as p (checked by exact accounting)."""
    tree = TokenTree(torch.tensor([0, 1, 2]), torch.tensor([-1, 0, 0]))
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64))
    sampler = SpeculativeSampler(SamplingConfig(temperature=1.0))
    g = torch.Generator().manual_seed(3)
    firsts = torch.tensor([acc.new_tokens(tree)[0] for acc in (sampler.accept(tree, logits, g) for _ in range(6000))])
    freq = torch.bincount(firsts, minlength=3).double() / 6000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=0.025)


def test_warper_matches_hf_processors_including_repetition_penalty():
    torch.manual_seed(0)
    tree = TokenTree.from_sequences(3, [[5, 6], [7]])
    logits = torch.randn(len(tree), 10, dtype=torch.float64)
    prefix = torch.tensor([1, 2, 5])
    cfg = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.3)
    p = Warper(cfg)(tree, logits, prefix)
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.8), TopKLogitsWarper(5), TopPLogitsWarper(0.9)])
    for node in range(len(tree)):
        ctx = torch.cat([prefix, tree.tokens[tree.path_to(node)]])[None]
        ref = torch.softmax(procs(ctx, logits[node : node + 1].clone()), -1)[0]
        torch.testing.assert_close(p[node], ref)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0.5, top_p=1.5), "top_p"),
        (dict(temperature=0.5, top_k=0), "top_k"),
        (dict(temperature=0.5, acceptance="fast"), "acceptance"),
        (dict(temperature=0.0, repetition_penalty=1.2), "repetition_penalty"),
    ],
)
def test_bad_sampling_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_verifier(None, **kwargs)
