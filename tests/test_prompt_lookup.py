import pytest
import torch

from specdec.drafters import PromptLookupConfig, PromptLookupDrafter, build_drafter
from specdec.drafters.base import DraftState, StepResult
from specdec.drafters.prompt_lookup import find_candidates
from specdec.sizing import trim


@pytest.mark.parametrize(
    "ids, n, k, m, expected, why",
    [
        ([5, 6, 7, 5, 6, 9, 5, 6], 2, 3, 3, [[9, 5, 6], [7, 5, 6]], "most recent match first"),
        ([5, 6, 7, 5, 6, 7, 5, 6], 2, 2, 3, [[7, 5]], "identical continuations are merged"),
        ([1, 2, 3, 4], 2, 3, 3, [], "no earlier occurrence"),
        ([1, 2], 2, 3, 3, [], "sequence no longer than n"),
        ([4, 4, 4], 1, 3, 3, [[4], [4, 4]], "overlapping matches; the nearest gives the shortest tail"),
        ([1, 2, 9, 1, 2, 8, 1, 2, 7, 1, 2], 2, 1, 2, [[7], [8]], "max_candidates caps the list"),
    ],
)
def test_find_candidates(ids, n, k, m, expected, why):
    assert find_candidates(torch.tensor(ids), n, k, m) == expected, why


def state(ids):
    return DraftState(torch.tensor(ids), prompt_len=len(ids))


def test_longest_ngram_wins_and_tree_is_rooted_at_last_token():
    d = PromptLookupDrafter(PromptLookupConfig(max_ngram=3, adaptive=False, num_tokens=2))
    tree = d.propose(state([1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3]))
    assert int(tree.tokens[0]) == 3
    # 3-gram [1, 2, 3] matches at 0 -> continuation [4, 9]; the 2-gram match [2, 3] -> [5, ...] is not used
    assert [tree.tokens[p[1:]].tolist() for p in tree.leaf_path_list()] == [[4, 9]]


def test_no_match_drafts_nothing():
    d = PromptLookupDrafter()
    assert d.propose(state([1, 2, 3, 4])).num_drafts == 0


def cpu_like_cost(n):
    """A cost curve shaped like a CPU's: a second node costs 0.2 step, each further one 0.03."""
    return 1.0 if n == 1 else 1.2 + 0.03 * (n - 2)


def feed(d, ids, accepted):
    """One step: propose, trim for the cost curve, accept the first ``accepted`` drafts of the first path."""
    tree = trim(d.propose(state(ids)), cpu_like_cost)
    path = tree.path_to(0)
    if tree.num_drafts and accepted:
        leaf = tree.leaf_path_list()[0]
        path = leaf[: accepted + 1]
    d.observe(StepResult(tree, path, [0] * path.numel()))
    return tree


def test_sized_drafts_shrink_to_nothing_when_they_fail_and_grow_when_they_land():
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2]
    bad = PromptLookupDrafter()
    sizes = [feed(bad, ids, 0).num_drafts for _ in range(40)]
    assert sizes[0] > 0 and sizes[20:].count(0) >= 15  # (almost) stops drafting where drafts never land
    good = PromptLookupDrafter()
    sizes = [feed(good, ids, 10).num_drafts for _ in range(30)]
    assert sizes[-1] > sizes[0] and sizes[-1] == 10  # drafts lengthen to the whole continuation where they land


def test_a_match_size_switched_off_is_tried_again():
    """Estimates of candidates that were trimmed away relax toward the prior, so drafting resumes now and then."""
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    d = PromptLookupDrafter()
    sizes = [feed(d, ids, 0).num_drafts for _ in range(120)]
    assert sizes[10:].count(0) > 80 and any(sizes[40:])


def test_unscored_trees_are_verified_as_proposed():
    d = PromptLookupDrafter(PromptLookupConfig(adaptive=False, num_tokens=4))
    tree = d.propose(state([1, 2, 3, 4, 5, 6, 7, 8, 1, 2]))
    assert tree.scores is None and trim(tree, cpu_like_cost) is tree and tree.num_drafts == 4


@pytest.mark.parametrize("spec", ["prompt-lookup:max_ngram=0", "prompt-lookup:nope=1", "prompt-lookup:num_tokens=x", "prompt-lookup:foo", "prompt-lookup:adaptive=ture"])
def test_bad_specs_are_clear_errors(spec):
    with pytest.raises(ValueError):
        build_drafter(spec)


def test_spec_options_reach_the_config():
    d = build_drafter("prompt-lookup:max_ngram=5,adaptive=false,prior_first=0.25")
    assert d.config.max_ngram == 5 and d.config.adaptive is False and d.config.prior_first == 0.25


def test_a_session_takes_per_request_options_and_leaves_the_drafter_alone():
    """``Drafter.open(options)``: the session drafts with the request's settings (one token per candidate
    here), the drafter it came from keeps its own, and a wrong option is an error naming the valid ones."""
    from specdec.drafters.base import DraftState, NoDrafter, build_drafter

    drafter = build_drafter("prompt-lookup:adaptive=false")
    ids = torch.tensor([4, 5, 6, 7, 8, 9, 4, 5, 6, 7, 8, 9, 4, 5])
    state = DraftState(ids, ids.numel())
    full = drafter.open()
    full.reset(ids)
    short = drafter.open({"num_tokens": "1", "max_candidates": 1})
    short.reset(ids)
    assert len(full.propose(state)) > 2
    assert len(short.propose(state)) == 2 and short.propose(state).tokens.tolist() == [5, 6]
    assert drafter.config.num_tokens == 10 and drafter.config.max_candidates == 3
    with pytest.raises(ValueError, match="per-request option 'store'.*max_ngram"):
        drafter.open({"store": "x"})
    with pytest.raises(ValueError, match="num_tokens"):
        drafter.open({"num_tokens": "many"})
    with pytest.raises(ValueError, match="per-request options: none"):
        NoDrafter().open({"num_tokens": 1})
