"""PPD: prompt tokens ride in the verify pass, are never accepted or committed, and their outputs draft."""

import json

import pytest
import torch

import specdec
from conftest import hf_greedy, save_tiny_target, tiny_model, write_conversations
from specdec.drafters.base import StepResult
from specdec.drafters.ppd import PPDConfig, PPDDrafter, PPDDrafterConfig, PromptTokens, attach_prompt_tokens
from specdec.tree import TokenTree


def random_tokens(model, m=3, v=1, seed=0):
    torch.manual_seed(seed)
    tok = PromptTokens(PPDConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size, num_prompt_tokens=m, num_virtual=v))
    torch.nn.init.normal_(tok.embeds, std=1.0)
    return tok.to(model.dtype)


def test_prompt_token_chains_hang_below_their_nodes():
    tree = TokenTree.from_sequences(5, [[1, 2]])
    embeds = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 3)  # m = 2, v = 2, H = 3
    t = attach_prompt_tokens(tree, [0, 2], embeds)
    assert t.tokens[:3].tolist() == [5, 1, 2] and len(t) == 3 + 2 * 2 * 2 and t.num_drafts == 2
    # below node 0: chain (v=0) 3 -> 4, chain (v=1) 5 -> 6; below node 2: 7 -> 8, 9 -> 10
    assert t.parents.tolist() == [-1, 0, 1, 0, 3, 0, 5, 2, 7, 2, 9]
    assert t.auxiliary.tolist() == [False] * 3 + [True] * 8
    assert torch.equal(t.input_embeds[4], embeds[1, 0]) and torch.equal(t.input_embeds[9], embeds[0, 1])
    assert t.position_ids(10)[[3, 4, 7, 8]].tolist() == [11, 12, 13, 14]  # prompt token i sits i places after its node


class Recording(PPDDrafter):
    def observe(self, result: StepResult):
        self.results = getattr(self, "results", []) + [result]
        super().observe(result)


@pytest.mark.parametrize("v", [1, 3])
def test_ppd_equals_greedy_and_never_accepts_or_commits_a_prompt_token(tiny, v):
    from specdec.runner import TreeRunner

    drafter = Recording(random_tokens(tiny, v=v))
    g = torch.Generator().manual_seed(2)
    unsized = []
    for i in range(3):
        ids = torch.randint(0, 96, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g)
        ref = hf_greedy(tiny, ids, 20, min_new_tokens=20)
        for sized in (True, False):
            before = len(getattr(drafter, "results", []))
            out = specdec.generate(tiny, None, ids, drafter=drafter, max_new_tokens=20, size_trees=sized)
            assert out.token_ids == ref
            if not sized:
                unsized += drafter.results[before:]
    carried = [r for r in drafter.results if r.tree.auxiliary is not None]
    # sized steps carry prompt tokens only where this host's measured cost says they pay; unsized ones always do
    assert unsized and all(r.tree.auxiliary is not None for r in unsized)
    for r in carried:
        assert not bool(r.tree.auxiliary[r.path].any())
        assert r.aux_logits.shape[0] == int(r.tree.auxiliary.sum())
    # the KV after a step with prompt tokens is exactly the committed tokens'
    tree = attach_prompt_tokens(TokenTree.from_sequences(int(ids[-1]), [[3, 4]]), [0, 1], drafter.tokens.embeds.detach())
    with torch.inference_mode(), TreeRunner(tiny) as runner, TreeRunner(tiny) as plain:
        runner.prefill(ids[:-1])
        runner.forward(tree)
        runner.commit(ids.numel() - 1, torch.tensor([0, 1]))
        plain.prefill(torch.cat([ids, torch.tensor([3])]))
        assert runner.prefix_len == plain.prefix_len == ids.numel() + 1
        torch.testing.assert_close(runner.cache.layers[0].keys, plain.cache.layers[0].keys, rtol=1e-9, atol=1e-9)


def test_prompt_tokens_attached_only_where_their_guesses_pay_for_their_nodes():
    """Carriers and count per step: the chance a node is the last accepted times what its guesses are worth to
    the next step, against the measured cost of the extra nodes in this one."""
    from types import SimpleNamespace

    d = PPDDrafter(random_tokens(tiny_model("llama"), m=3), PPDDrafterConfig())
    root = TokenTree.root_only(7)
    d.target = SimpleNamespace(cost=None)
    assert d.prompt_plan(root) == ([0], 3)  # no measured cost: all of them on the root
    d.target = SimpleNamespace(cost=lambda n: 1.0)  # extra nodes are free: all of them
    assert d.prompt_plan(root) == ([0], 3)
    d.target = SimpleNamespace(cost=lambda n: 1.0 + 0.5 * (n - 1))  # every node costs half a step: none pays
    assert d.prompt_plan(root) == ([], 0)
    r1, r2 = d.rates[(1, 0)], d.rates[(2, 0)]
    kappa = (r1 + r1 * r2) / 4  # the first guess repays its two nodes (now and next step), the second does not
    d.target = SimpleNamespace(cost=lambda n: 1.0 + kappa * (n - 1))
    assert d.prompt_plan(root) == ([0], 1)
    tree = d.propose(SimpleNamespace(root=7))
    assert len(tree) == 2 and bool(tree.auxiliary[1])
    # with a draft below the root, the node more likely to be the last accepted carries
    guess = TokenTree(torch.tensor([7, 9]), torch.tensor([-1, 0]))
    d.target = SimpleNamespace(cost=lambda n: 1.0 + 0.3 * r1 * (n - 1))
    guess.scores = torch.tensor([1.0, 0.8])
    carriers, count = d.prompt_plan(guess)
    assert carriers == [1] and count >= 1
    guess.scores = torch.tensor([1.0, 0.2])
    assert d.prompt_plan(guess)[0] == [0]
    d.target = SimpleNamespace(cost=lambda n: 1.0)  # free: both may carry
    assert d.prompt_plan(guess) == ([0, 1], 3)
    d.options.prompts = 2  # fixed by the user
    assert d.prompt_plan(root) == ([0], 2)


def test_one_sparse_tree_per_number_of_prompt_tokens_and_budget():
    d = PPDDrafter(random_tokens(tiny_model("llama"), m=3), PPDDrafterConfig())
    trees = d.sparse_trees((2, 8))
    assert sorted(trees) == [1, 2, 3]
    for k, by_budget in trees.items():
        for b, paths in by_budget.items():
            assert len(paths) <= b and max(map(len, paths)) <= k
            assert all(p[:-1] in paths or len(p) == 1 for p in paths)  # ancestor-closed
    ranks = len(d.accuracy[0])
    assert trees[1][8] == [(i,) for i in range(min(8, ranks))]  # one prompt token: one depth, ranks best first
    assert trees[3][8] != trees[1][8] and len(trees[3][8]) == 8


def test_ppd_fused_with_prompt_lookup_is_lossless(tiny):
    from specdec.drafters.fused import FusedDrafter
    from specdec.drafters.prompt_lookup import PromptLookupDrafter

    drafter = FusedDrafter([PPDDrafter(random_tokens(tiny)), PromptLookupDrafter()])
    ids = torch.tensor([4, 5, 6, 7, 4, 5, 6, 7, 4])
    assert specdec.generate(tiny, None, ids, drafter=drafter, max_new_tokens=24).token_ids == hf_greedy(tiny, ids, 24, min_new_tokens=24)


def test_the_next_tree_comes_from_the_accepted_nodes_prompt_tokens():
    """Guesses are read from the prompt tokens below the last accepted node, depth by depth."""
    model = tiny_model("llama")
    tokens = random_tokens(model, m=2)
    d = PPDDrafter(tokens, PPDDrafterConfig(topk=2, tree=4))
    tree = attach_prompt_tokens(TokenTree.from_sequences(9, [[1]]), [0, 1], tokens.embeds.detach())
    aux_logits = torch.zeros(4, 96)
    aux_logits[2, 40] = aux_logits[2, 41] = 5.0  # the chain below node 1: prompt token 1 -> 40/41,
    aux_logits[3, 50] = 6.0  # prompt token 2 -> 50
    d.observe(StepResult(tree, torch.tensor([0, 1]), [1, 7], aux_logits=aux_logits))
    assert d._guesses[0, :2].tolist() in ([40, 41], [41, 40]) and int(d._guesses[1, 0]) == 50
    d.observe(StepResult(tree, torch.tensor([0]), [3], aux_logits=aux_logits))
    assert int(d._guesses[0, 0]) not in (40, 41)  # the root's own chain: rows 0 and 1 (all zeros here)


def test_checkpoint_round_trip_and_fit_checks(tmp_path):
    model = tiny_model("qwen2")
    tokens = random_tokens(model, m=2, v=2)
    tokens.save_pretrained(tmp_path / "p")
    again = PromptTokens.from_pretrained(tmp_path / "p")
    torch.testing.assert_close(again.embeds.double(), tokens.embeds.double())
    assert (tmp_path / "p" / "model.safetensors").stat().st_size < 4096  # a few KB
    other = tiny_model("llama", vocab_size=100)
    with pytest.raises(ValueError, match="vocabulary of 96"):
        specdec.generate(other, None, torch.tensor([1, 2]), drafter=f"ppd:{tmp_path / 'p'}")
    with pytest.raises(FileNotFoundError):
        specdec.drafters.build_drafter(f"ppd:{tmp_path / 'missing'}")


def test_training_fits_prompt_tokens_and_ships_a_drafter(tmp_path, default_tokenizer):
    from specdec.training import load_recipe, train

    target = save_tiny_target(tmp_path / "target", default_tokenizer)
    data = write_conversations(tmp_path / "convs.jsonl", [(f"Tell me about {i}.", f"Number {i} is a number. " * 4) for i in range(14)])
    cfg = load_recipe("ppd-smollm2-cpu", dict(model=str(target), data=str(data), output_dir=str(tmp_path / "run"), num_conversations=10, skip=0,
                                              heldout=4, max_len=48, depth=2, ppd={"groups": 3}, batch_size=2, max_steps=4, epochs=1,
                                              save_steps=100, logging_steps=2, progress=False))
    final = train(cfg)
    saved = json.loads((final / "config.json").read_text())
    assert saved["num_prompt_tokens"] == 2 and len(saved["extra"]["heldout_accuracy"]) == 2 and saved["extra"]["parameters"] == 2 * 32
    trained = PromptTokens.from_pretrained(final)
    model = specdec.load_model(target)[0]
    init = model.get_input_embeddings()(torch.tensor(default_tokenizer("The next words are", add_special_tokens=False)["input_ids"][:2]))
    assert not torch.allclose(trained.embeds[:, 0].float(), init.float())  # it moved from its text initialisation
    model, tok = specdec.load_model(target)
    out = specdec.generate(model, tok, "Tell me about 3.", drafter=f"ppd:{final}", max_new_tokens=10)
    assert out.token_ids == specdec.generate(model, tok, "Tell me about 3.", drafter="none", max_new_tokens=10).token_ids
