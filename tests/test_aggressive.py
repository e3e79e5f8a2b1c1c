"""Aggressive decoding: IAD's alignment to the source, the separate draft model; both lossless."""

import pytest
import torch

import specdec
from conftest import hf_greedy, tiny_model
from specdec.drafters.draft_model import DraftModelConfig, DraftModelDrafter
from specdec.drafters.iad import IADConfig, IADDrafter, _ngram_index, align, user_content_span

SOURCE = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]


@pytest.mark.parametrize("output, expected, why", [
    ([10, 11, 12], ("unique", [3]), "copying from the start: the next source token is 13"),
    ([10, 11, 99, 13], ("unique", [4]), "a substitution: the suffix 13 re-aligns right after it"),
    ([10, 11, 12, 77, 13, 14], ("unique", [5]), "an insertion: the output carries on where the source does"),
    ([10, 11, 12, 14], ("unique", [5]), "a deletion: the output skipped 13 and aligns after 14"),
    ([10, 11, 12, 13, 99, 98], ("none", []), "the output left the source for good: nothing to draft"),
])
def test_alignment_cases(output, expected, why):
    assert align(SOURCE, _ngram_index(SOURCE, 4), output, 4) == expected, why


def test_a_repeated_ngram_does_not_realign_until_it_is_unique():
    source = [1, 2, 3, 9, 1, 2, 4]  # "1 2" occurs twice
    index = _ngram_index(source, 4)
    assert align(source, index, [7, 1, 2], 4) == ("ambiguous", [2, 6])  # both places; drafted as a small tree
    assert align(source, index, [3, 9, 1, 2], 4) == ("unique", [6])  # a longer suffix settles it
    assert align(source, index, [1, 2], 1) == ("ambiguous", [2, 6])  # max_ngram stops the search


def test_the_source_is_the_last_user_message(default_tokenizer):
    msgs = [{"role": "user", "content": "Correct this: me and him goes home."}]
    ids = specdec.engine.prepare_input_ids(default_tokenizer, msgs).tolist()
    start, end = user_content_span(default_tokenizer, ids)
    assert default_tokenizer.decode(ids[start:end]) == "Correct this: me and him goes home."


def test_iad_proposes_the_source_continuation_and_a_tree_when_ambiguous():
    from specdec.drafters.base import DraftState

    d = IADDrafter(IADConfig(num_tokens=3))
    d.source_text = None
    d._tokenizer = None
    d.reset(torch.tensor([1, 2, 3, 9, 1, 2, 4, 5]))  # no chat template: the whole prompt is the source
    tree = d.propose(DraftState(torch.tensor([1, 2, 3, 9, 1, 2, 4, 5, 3, 9]), prompt_len=8))
    assert [tree.tokens[p[1:]].tolist() for p in tree.leaf_path_list()] == [[1, 2, 4]]
    tree = d.propose(DraftState(torch.tensor([1, 2, 3, 9, 1, 2, 4, 5, 1, 2]), prompt_len=8))
    assert sorted(tree.tokens[p[1:]].tolist() for p in tree.leaf_path_list()) == [[3, 9, 1], [4, 5]]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_iad_and_the_draft_model_equal_hf_greedy(arch):
    target = tiny_model(arch)
    draft = tiny_model(arch, seed=1)
    g = torch.Generator().manual_seed(4)
    for i in range(5):
        ids = torch.randint(0, 96, (int(torch.randint(4, 30, (1,), generator=g)),), generator=g)
        ref = hf_greedy(target, ids, 24, min_new_tokens=24)
        for drafter in (IADDrafter(), DraftModelDrafter(draft, config=DraftModelConfig(k=4, fast=False)),
                        DraftModelDrafter(target, config=DraftModelConfig(k=4, fast=False))):
            for sized in (True, False):
                out = specdec.generate(target, None, ids, drafter=drafter, max_new_tokens=24, size_trees=sized)
                assert out.token_ids == ref, (i, drafter.name, sized)


def test_self_drafting_with_the_target_as_draft_model_accepts_everything():
    target = tiny_model("llama")
    ids = torch.tensor([3, 1, 4, 1, 5])
    out = specdec.generate(target, None, ids, drafter=DraftModelDrafter(tiny_model("llama"), config=DraftModelConfig(k=4, fast=False)),
                           max_new_tokens=21, size_trees=False)
    assert out.stats.tokens_per_step == [5] * 4  # every draft accepted: 4 drafts + the bonus per step


def test_a_draft_model_for_another_vocabulary_is_refused():
    with pytest.raises(ValueError, match="vocabulary"):
        specdec.generate(tiny_model("llama"), None, torch.tensor([1, 2]), drafter=DraftModelDrafter(tiny_model("llama", vocab_size=90)),
                         max_new_tokens=2)


def test_relaxed_verification_table():
    from specdec.tree import TokenTree
    from specdec.verifiers import GreedyVerifier, RelaxedGreedyVerifier, make_verifier

    tree = TokenTree.from_sequences(0, [[2, 3], [4]])  # nodes: 0 root, 1 (2), 2 (3), 3 (4)
    logits = torch.full((4, 6), -10.0)
    logits[0, [1, 2, 4]] = torch.tensor([5.0, 4.5, 1.0])  # at the root: argmax 1, then 2 (0.5 behind), then 4 (4 behind)
    logits[1, [3, 5]] = torch.tensor([3.0, 2.9])  # after 2: argmax 3
    logits[2, 5] = 1.0
    assert GreedyVerifier().accept(tree, logits).path.tolist() == [0]
    assert RelaxedGreedyVerifier(top_beta=1, tau=100.0).accept(tree, logits).path.tolist() == [0]  # beta 1: greedy
    relaxed = RelaxedGreedyVerifier(top_beta=3, tau=1.0).accept(tree, logits)
    assert relaxed.path.tolist() == [0, 1, 2] and relaxed.bonus == 5  # 2 is 0.5 behind: in; 4 is 4 behind: out
    assert RelaxedGreedyVerifier(top_beta=3, tau=0.1).accept(tree, logits).path.tolist() == [0]
    assert isinstance(make_verifier(acceptance="gad", gad_top_beta=2), RelaxedGreedyVerifier)
    with pytest.raises(ValueError, match="temperature 0"):
        make_verifier(acceptance="gad", temperature=0.5)


def test_jfleg_prompts_come_from_a_local_checkout(tmp_path, monkeypatch):
    from specdec.bench import load_questions

    (tmp_path / "test.src").write_text("He go to school .\nShe do n't like it , really .\n")
    monkeypatch.setenv("SPECDEC_JFLEG", str(tmp_path))
    qs = load_questions("jfleg")
    assert [q["category"] for q in qs] == ["grammar", "grammar"]
    assert qs[0]["turns"][0].endswith("He go to school.") and qs[1]["turns"][0].endswith("She don't like it, really.")
    monkeypatch.setenv("SPECDEC_JFLEG", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="SPECDEC_JFLEG"):
        load_questions("jfleg")


def test_source_text_reaches_the_iad_drafter():
    from specdec.cli import _with_source_text
    from specdec.drafters import build_drafter

    d = _with_source_text(build_drafter("iad+prompt-lookup"), "the text")
    assert d.drafters[0].source_text == "the text"
    with pytest.raises(ValueError, match="iad"):
        _with_source_text(build_drafter("prompt-lookup"), "x")
