"""The drafter contract: what a drafter sees (hidden states, embeddings, generator) and hears (aux outputs)."""

import pytest
import torch

import specdec
from conftest import hf_greedy, tiny_model
from specdec.drafters.base import DraftState, Drafter, StepResult
from specdec.engine import decode_steps
from specdec.tree import TokenTree
from specdec.verifiers import GreedyVerifier


class AuxDrafter(Drafter):
    """A toy PPD: under the root, two auxiliary prompt-token nodes with their own embeddings (a chain), plus the
    guesses its aux nodes' logits gave at the previous step. Records what it saw and heard."""

    name = "aux"
    needs_hidden_states = True

    def __init__(self, hidden_size, vocab):
        g = torch.Generator().manual_seed(5)
        self.embeds = torch.randn(2, hidden_size, generator=g, dtype=torch.float64)
        self.vocab = vocab
        self.heard: list[StepResult] = []
        self.seen: list[DraftState] = []
        self.guesses: list[int] = []

    def propose(self, state):
        self.seen.append(state)
        guesses = [t for t in self.guesses if t != state.root][:1]
        n_draft = len(guesses)
        tokens = [state.root] + guesses + [0, 0]  # aux nodes carry a placeholder token
        parents = [-1] + [0] * n_draft + [0, 1 + n_draft]
        aux = torch.tensor([False] * (1 + n_draft) + [True, True])
        embeds = torch.zeros(len(tokens), self.embeds.shape[1], dtype=torch.float64)
        embeds[aux] = self.embeds
        return TokenTree(torch.tensor(tokens), torch.tensor(parents), auxiliary=aux, input_embeds=embeds)

    def observe(self, result):
        self.heard.append(result)
        self.guesses = result.aux_logits.argmax(-1).tolist()


@pytest.mark.parametrize("fused", [False, True], ids=["alone", "fused-with-prompt-lookup"])
def test_auxiliary_nodes_are_never_accepted_or_committed_and_their_outputs_come_back(tiny, fused):
    from specdec.drafters.fused import FusedDrafter
    from specdec.drafters.prompt_lookup import PromptLookupConfig, PromptLookupDrafter

    ids = torch.tensor([3, 4, 5, 6, 3, 4, 5, 6, 3, 4])
    ref = hf_greedy(tiny, ids, 24, min_new_tokens=24)
    aux = AuxDrafter(tiny.config.hidden_size, tiny.config.vocab_size)
    drafter = FusedDrafter([aux, PromptLookupDrafter(PromptLookupConfig(adaptive=False))]) if fused else aux
    out = specdec.generate(tiny, None, ids, drafter=drafter, max_new_tokens=24)
    assert out.token_ids == ref  # lossless
    for result in aux.heard:
        tree = result.tree
        assert not bool(tree.auxiliary[result.path].any())  # never accepted
        assert result.aux_logits.shape == (int(tree.auxiliary.sum()), tiny.config.vocab_size)
        assert result.aux_hidden.shape == (int(tree.auxiliary.sum()), tiny.config.hidden_size)
    # the aux outputs are the target's own outputs for those embeddings at those positions
    state, result = aux.seen[0], aux.heard[0]
    with torch.inference_mode():
        model_in = tiny.get_input_embeddings()(state.token_ids[None])
        chain = torch.cat([model_in, aux.embeds[None].to(model_in.dtype)], dim=1)
        ref_logits = tiny(inputs_embeds=chain).logits[0, -2:]
    torch.testing.assert_close(result.aux_logits, ref_logits, rtol=1e-7, atol=1e-7)


def test_no_auxiliary_kv_is_committed(tiny):
    """After every step the cache holds exactly the committed tokens: its length and its keys match a plain run."""
    from specdec.runner import TreeRunner

    ids = torch.tensor([7, 8, 9, 7, 8])
    aux = AuxDrafter(tiny.config.hidden_size, tiny.config.vocab_size)
    with torch.inference_mode(), TreeRunner(tiny) as runner:
        runner.prefill(ids[:-1])
        tree = aux.propose(DraftState(ids, ids.numel()))
        prefix = runner.prefix_len
        runner.forward(tree)
        runner.commit(prefix, torch.tensor([0]))  # the root alone is accepted
        assert runner.prefix_len == ids.numel()
        keys = runner.cache.layers[0].keys.clone()
    with torch.inference_mode(), TreeRunner(tiny) as plain:
        plain.prefill(ids)
        torch.testing.assert_close(keys, plain.cache.layers[0].keys, rtol=1e-9, atol=1e-9)


def test_full_prompt_hidden_states_reach_the_drafter_then_each_accepted_path(tiny):
    aux = AuxDrafter(tiny.config.hidden_size, tiny.config.vocab_size)
    ids = torch.tensor([1, 2, 3, 4, 5, 6])
    specdec.generate(tiny, None, ids, drafter=aux, max_new_tokens=6)
    first = aux.seen[0]
    assert first.hidden_start == 0 and first.hidden_states.shape == (ids.numel(), tiny.config.hidden_size)
    with torch.inference_mode():
        ref = tiny(ids[None], output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(first.hidden_states, ref, rtol=1e-9, atol=1e-9)
    for before, after, result in zip(aux.seen, aux.seen[1:], aux.heard):
        assert after.hidden_start == before.token_ids.numel() - 1  # the root's position
        assert after.hidden_states.shape[0] == result.path.numel()  # the root + the accepted drafts
        assert after.hidden_start + after.hidden_states.shape[0] == after.token_ids.numel() - 1


class CoinDrafter(Drafter):
    """Samples its drafts with the run's generator."""

    name = "coin"

    def propose(self, state):
        g = self.target.generator
        return TokenTree.from_sequences(state.root, [torch.randint(0, 96, (3,), generator=g, device=g.device).tolist()])


def test_a_seeded_stochastic_drafter_reproduces(tiny):
    ids = torch.tensor([4, 5, 6])
    runs = [specdec.generate(tiny, None, ids, drafter=CoinDrafter(), max_new_tokens=16, seed=s, size_trees=False).stats
            for s in (1, 1)]
    assert runs[0].drafted_tokens == runs[1].drafted_tokens and runs[0].tokens_per_step == runs[1].tokens_per_step
    drafted = []
    for s in (1, 1):
        d = CoinDrafter()
        specdec.generate(tiny, None, ids, drafter=d, max_new_tokens=8, seed=s, size_trees=False)
        drafted.append(torch.randint(0, 96, (4,), generator=d.target.generator).tolist())
    assert drafted[0] == drafted[1]  # the generator's stream depends on the seed alone


def test_decode_steps_with_triton_needs_no_outside_context():
    """The runner routes the model itself: a branching tree through the kernel stays exact (interpreted on the CPU,
    compiled on a GPU when the interpreter is off)."""
    import os

    from drafters_for_tests import OracleDrafter

    model = tiny_model("llama", dtype=torch.float32)
    if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available():
        model = model.to("cuda")
    ids = torch.tensor([5, 6, 7, 5, 6])
    ref = hf_greedy(model, ids, 12, min_new_tokens=12)
    before = model.config._attn_implementation
    out = []
    for event in decode_steps(model, ids, OracleDrafter(ids.numel(), ref, 3), GreedyVerifier(), max_new_tokens=12,
                              eos_ids=set(), attn="triton"):
        out += event.new_tokens
    assert out == ref and model.config._attn_implementation == before


def test_cache_crop_follows_transformers():
    """As transformers 5's DynamicCache: crop(-n) removes n entries, a positive count is refused."""
    from transformers import DynamicCache

    from specdec.runner import TreeRunner

    model = tiny_model("llama")
    with torch.inference_mode(), TreeRunner(model) as runner:
        runner.prefill(torch.arange(10))
        runner.cache.crop(-3)
        assert runner.prefix_len == 7
        with pytest.raises(ValueError, match="negative"):
            runner.cache.crop(5)
    from specdec.runner import cache_argument

    hf = DynamicCache()
    with torch.inference_mode():
        model(torch.arange(10)[None], **{cache_argument(model): hf}, use_cache=True)
    hf.crop(-3)
    assert hf.get_seq_length() == 7
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("5.18"):  # before, a positive count was deprecated, not refused
        with pytest.raises(ValueError):
            hf.crop(5)


def test_cache_reaches_a_forward_that_spells_it_past_key_values():
    """transformers before its ``cache`` rename (5.17 on the GPU image) takes the KV cache as ``past_key_values`` and
    swallows unknown keywords: a ``cache=`` keyword was dropped and every step ran without its past (caught on the
    first GPU run). The engine asks the forward's signature which name it takes."""
    from transformers import LlamaForCausalLM

    import inspect

    parent = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"

    class OldSpelling(LlamaForCausalLM):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            kwargs.pop("cache", None)  # as the old forwards did with a keyword they did not know
            return super().forward(input_ids=input_ids, **{parent: past_key_values}, **kwargs)

    ref_model = tiny_model("llama")
    old = OldSpelling(ref_model.config).to(torch.float64).eval()
    old.load_state_dict(ref_model.state_dict())
    old.generation_config.eos_token_id = None
    ids = torch.tensor([5, 9, 2, 5, 9, 7, 1, 5, 9])
    ref = hf_greedy(ref_model, ids, 16, min_new_tokens=16)
    for drafter in ("none", "prompt-lookup:adaptive=false"):
        assert specdec.generate(old, None, ids, drafter=drafter, max_new_tokens=16).token_ids == ref, drafter
    short = ids[:5]
    batch = specdec.generate(old, None, [ids, short], drafter="prompt-lookup:adaptive=false", max_new_tokens=16, max_batch=2)
    assert [r.token_ids for r in batch] == [ref, hf_greedy(ref_model, short, 16, min_new_tokens=16)]
