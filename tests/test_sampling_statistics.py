"""Speculative sampling reproduces the target's distribution exactly (seeded chi-square tests).

The joint distribution of the first 3 generated tokens, sampled through the
real engine with several drafters (one deliberately bad, one stochastic with
q far from p), is compared with the exact distribution computed by
enumeration. The same test with the residual step removed must fail.
"""

import itertools

import pytest
import torch

from conftest import tiny_model
from specdec.drafters import PromptLookupConfig, PromptLookupDrafter
from specdec.drafters.base import Drafter
from specdec.engine import decode_steps
from specdec.tree import TokenTree
from specdec.verifiers import SamplingConfig, SpeculativeSampler
from table_model import TableModel, model_logits_fn

VOCAB = 4
PROMPT = torch.tensor([1, 2, 3, 1, 2])
SAMPLES = 12_000
CONFIGS = [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_k=3)]


class BadDrafter(Drafter):
    """Deterministic branching drafts that the target mostly rejects."""

    name = "bad"

    def propose(self, state):
        return TokenTree.from_sequences(state.root, [[0, 0], [3, 1], [2]])


class FarQDrafter(Drafter):
    """Stochastic drafter: siblings drawn from a fixed q far from p, without replacement,
    each child carrying q renormalised over the tokens its earlier siblings did not take."""

    name = "far-q"

    def __init__(self, seed=0):
        self.q = torch.tensor([0.85, 0.05, 0.05, 0.05], dtype=torch.float64)
        self.g = torch.Generator().manual_seed(seed)

    def _children(self, tokens, parents, rows, parent, k):
        avail = self.q.clone()
        made = []
        for _ in range(k):
            row = avail / avail.sum()
            x = int(torch.multinomial(row, 1, generator=self.g))
            tokens.append(x), parents.append(parent), rows.append(row)
            made.append(len(tokens) - 1)
            avail[x] = 0.0
        return made

    def propose(self, state):
        tokens, parents, rows = [state.root], [-1], [torch.zeros(VOCAB, dtype=torch.float64)]
        for child in self._children(tokens, parents, rows, 0, 2):
            self._children(tokens, parents, rows, child, 1)
        return TokenTree(torch.tensor(tokens), torch.tensor(parents), draft_probs=torch.stack(rows))


@pytest.fixture(scope="module")
def target():
    return TableModel(model_logits_fn(tiny_model("llama", vocab_size=VOCAB, seed=5)), VOCAB, hidden_size=HIDDEN)


HIDDEN = 8


def exact_joint(target, config):
    """P(first 3 tokens) by enumeration, with p warped as the sampler warps it."""
    probs = {}
    for seq in itertools.product(range(VOCAB), repeat=3):
        p = 1.0
        for i in range(3):
            logits = target.logits_fn(tuple(PROMPT.tolist()) + seq[:i]) / config.temperature
            if config.top_k is not None:
                kth = torch.topk(logits, config.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            p *= float(torch.softmax(logits, -1)[seq[i]])
        probs[seq] = p
    return probs


def sample_counts(target, drafter, verifier, n, seed):
    g = torch.Generator().manual_seed(seed)
    counts = {}
    for _ in range(n):
        out = []
        for event in decode_steps(target, PROMPT, drafter, verifier, max_new_tokens=3, eos_ids=set(), generator=g):
            out.extend(event.new_tokens)
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    return counts


def chi_square_pvalue(counts, probs, n):
    cells = [c for c in probs if probs[c] * n >= 5]  # pool the rare cells into one
    rare = [c for c in probs if c not in cells]
    obs = [counts.get(c, 0) for c in cells] + [sum(counts.get(c, 0) for c in rare)]
    exp = [probs[c] * n for c in cells] + [sum(probs[c] for c in rare) * n]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    df = len([e for e in exp if e > 0]) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def draft_model_drafter(target):
    """A separate (tiny, random) draft model sampling its drafts; its softmax is q."""
    from specdec.drafters.base import Target
    from specdec.drafters.draft_model import DraftModelConfig, DraftModelDrafter

    d = DraftModelDrafter(tiny_model("llama", vocab_size=VOCAB, seed=9), config=DraftModelConfig(k=2, sample=True, fast=False))
    d.bind(Target.of(target, seed=3))
    return d


def rapid_drafter(target):
    """RAPID with a separate (tiny, random) draft model sampling over a shortened prompt (one chunk of one token
    kept from the prompt's middle)."""
    from specdec.drafters.base import Target
    from specdec.drafters.rapid import RapidConfig, RapidDrafter

    cfg = RapidConfig(chunk=1, top_chunks=1, head=1, tail=1, recent=2, period=1, k=2, sample=True, fast=False)
    d = RapidDrafter(tiny_model("llama", vocab_size=VOCAB, seed=9), config=cfg)
    d.bind(Target.of(target, seed=3))
    return d


def clover_drafter(target):
    """Clover heads (random, no Augmenting Block) drawing their drafts from q and carrying it."""
    from specdec.drafters.base import Target
    from specdec.drafters.clover import CloverConfig, CloverDrafter, CloverDrafterConfig, CloverHeads

    torch.manual_seed(4)
    cfg = CloverConfig(hidden_size=HIDDEN, vocab_size=VOCAB, num_heads=2, attention_heads=2, augment=False)
    heads = CloverHeads(cfg, None, None, target.get_input_embeddings(), target.get_output_embeddings().weight.float())
    for p in heads.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.5)
    heads = heads.to(torch.float64)
    d = CloverDrafter.from_heads(heads, CloverDrafterConfig(beam=3, topk=2, sample=True))
    d.bind(Target.of(target, seed=3))
    return d


def ppd_drafter(target):
    """PPD with random prompt tokens: point-mass drafts read from the prompt tokens' outputs."""
    from specdec.drafters.base import Target
    from specdec.drafters.ppd import PPDConfig, PPDDrafter, PPDDrafterConfig, PromptTokens

    torch.manual_seed(6)
    tokens = PromptTokens(PPDConfig(hidden_size=HIDDEN, vocab_size=VOCAB, num_prompt_tokens=2)).to(torch.float64)
    torch.nn.init.normal_(tokens.embeds, std=1.0)
    d = PPDDrafter(tokens, PPDDrafterConfig(topk=2, tree=4))
    d.bind(Target.of(target, seed=3))
    return d


def eagle_drafter(target):
    """A random EAGLE drafter (over the table model's one hidden layer) drawing its drafts from q and carrying it."""
    from specdec.drafters.base import Target
    from specdec.drafters.eagle import EagleConfig, EagleDrafter, EagleDrafterConfig, EagleModel

    torch.manual_seed(8)
    cfg = EagleConfig(hidden_size=HIDDEN, vocab_size=VOCAB, num_heads=2, num_kv_heads=1, intermediate_size=16, feature_layers=[-1])
    eagle = EagleModel(cfg, torch.arange(VOCAB))
    for p in eagle.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.5)
    d = EagleDrafter(eagle.to(torch.float64), EagleDrafterConfig(depth=2, beam=3, topk=2, sample=True, dtype="float64"))
    d.bind(Target.of(target, seed=3))
    return d


DRAFTERS = {
    "prompt-lookup": lambda target: PromptLookupDrafter(PromptLookupConfig(adaptive=False, min_ngram=1, num_tokens=3)),
    "bad": lambda target: BadDrafter(),
    "far-q": lambda target: FarQDrafter(),
    "draft-model": draft_model_drafter,
    "rapid": rapid_drafter,
    "clover": clover_drafter,
    "ppd": ppd_drafter,
    "eagle": eagle_drafter,
}


@pytest.mark.parametrize("config", CONFIGS, ids=["t1", "t0.7-top3"])
@pytest.mark.parametrize("name", list(DRAFTERS))
def test_speculative_sampling_matches_the_exact_distribution(target, name, config):
    probs = exact_joint(target, config)
    counts = sample_counts(target, DRAFTERS[name](target), SpeculativeSampler(config), SAMPLES, seed=11)
    assert sum(counts.values()) == SAMPLES
    assert chi_square_pvalue(counts, probs, SAMPLES) > 0.001


def test_clover_sampling_drafts_carry_their_distribution(target):
    """Sampled Clover drafts: each child's draft_probs row is q without its earlier siblings' tokens, and siblings
    come in draw order with scores that never rise."""
    from specdec.drafters.base import DraftState

    d = clover_drafter(target)
    d.reset(PROMPT)
    hidden = torch.stack([target._hidden(tuple(PROMPT[: i + 1].tolist())) for i in range(len(PROMPT))])
    ids = torch.cat([PROMPT, torch.tensor([2])])  # the prompt, then the first token (the root), as the engine hands them
    tree = d.propose(DraftState(ids, len(PROMPT), hidden, 0))
    assert tree.draft_probs is not None and tree.draft_probs.shape == (len(tree), VOCAB)
    for node in range(1, len(tree)):
        row = tree.draft_probs[node]
        assert abs(float(row.sum()) - 1.0) < 1e-6 and float(row[tree.tokens[node]]) > 0
        earlier = [c for c in tree.children[int(tree.parents[node])] if c < node]
        assert all(float(row[tree.tokens[c]]) == 0.0 for c in earlier)
        assert all(float(tree.scores[c]) >= float(tree.scores[node]) for c in earlier)


@pytest.mark.parametrize("name", ["bad", "far-q"])
def test_the_test_has_teeth_without_the_residual_step(target, name):
    config = CONFIGS[0]
    probs = exact_joint(target, config)
    counts = sample_counts(target, DRAFTERS[name](target), SpeculativeSampler(config, residual=False), SAMPLES, seed=11)
    assert chi_square_pvalue(counts, probs, SAMPLES) < 0.001


def test_power_detects_a_two_percent_shift(target):
    """The sample size resolves a 2-point shift of probability mass between two cells."""
    probs = exact_joint(target, CONFIGS[0])
    top = sorted(probs, key=probs.get, reverse=True)
    shifted = dict(probs)
    shifted[top[0]] -= 0.02
    shifted[top[1]] += 0.02
    expected_counts = {c: round(p * SAMPLES) for c, p in shifted.items()}
    assert chi_square_pvalue(expected_counts, probs, SAMPLES) < 0.001


@pytest.fixture(scope="module")
def target32():
    """The same table model with 32-wide hidden states (the native draft layer's shapes)."""
    return TableModel(model_logits_fn(tiny_model("llama", vocab_size=VOCAB, seed=5)), VOCAB, hidden_size=32)


def test_speculative_sampling_through_the_native_eagle_layer_matches_the_exact_distribution(target32):
    """EAGLE's Q8_0 native draft layer (csrc/step.c) drawing drafts from q and carrying it: still the exact
    distribution."""
    from specdec.drafters.base import Target
    from specdec.drafters.eagle import EagleConfig, EagleDrafter, EagleDrafterConfig, EagleModel, _NativeLayer

    torch.manual_seed(8)
    cfg = EagleConfig(hidden_size=32, vocab_size=VOCAB, num_heads=2, num_kv_heads=1, intermediate_size=32, feature_layers=[-1])
    eagle = EagleModel(cfg, torch.arange(VOCAB))
    for p in eagle.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.5)
    d = EagleDrafter(eagle, EagleDrafterConfig(depth=2, beam=3, topk=2, sample=True, dtype="float32"))
    d.bind(Target.of(target32, seed=3))
    d._native = _NativeLayer.of(eagle)  # the table model is fp64: ask for the native layer explicitly
    if d._native is None:
        pytest.skip("the native kernels need AVX-512 and a C compiler")
    config = CONFIGS[1]
    probs = exact_joint(target32, config)
    counts = sample_counts(target32, d, SpeculativeSampler(config), SAMPLES, seed=11)
    assert chi_square_pvalue(counts, probs, SAMPLES) > 0.001
