"""Tree sizing: the kept tree maximises expected tokens per unit of measured cost."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.sizing import AcceptanceRates, best_size, learn, monotone_scores, judged_nodes, trim, trim_batch
from specdec.tree import TokenTree


def cost_table(table):
    return lambda n: table[n] if n in table else table[max(table)] + 0.1 * (n - max(table))


def test_worked_example_from_the_module_doc():
    tree = TokenTree(torch.tensor([9, 1, 2, 3]), torch.tensor([-1, 0, 1, 2]), scores=torch.tensor([1.0, 0.6, 0.3, 0.1]))
    cost = cost_table({1: 1.0, 2: 1.1, 3: 1.15, 4: 1.3})
    k, ratio = best_size(tree.scores[1:], cost, 64)
    assert k == 2 and ratio == pytest.approx(1.9 / 1.15)
    assert trim(tree, cost).tokens.tolist() == [9, 1, 2]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), max_size=12), st.lists(st.floats(0.0, 0.5), min_size=12, max_size=12),
       st.integers(1, 14))
def test_best_size_is_the_best_prefix_of_the_sorted_scores(scores, steps, max_nodes):
    curve = {1: 1.0}
    for n, step in enumerate(steps, 2):
        curve[n] = curve[n - 1] + step
    cost = cost_table(curve)
    top = sorted(scores, reverse=True)[: max_nodes - 1]
    ratios = [(1.0 + sum(top[:k])) / cost(k + 1) for k in range(len(top) + 1)]
    k, ratio = best_size(torch.tensor(scores, dtype=torch.float64), cost, max_nodes)
    assert ratio == pytest.approx(max(ratios)) and ratios[k] == pytest.approx(max(ratios))
    assert best_size(scores, cost, max_nodes) == (k, ratio)  # a list gives what the tensor gives


def test_no_tree_pays_when_every_node_is_unlikely():
    tree = TokenTree.from_sequences(5, [[1, 2], [3]], scores=[[0.05, 0.04], [0.03]])
    trimmed = trim(tree, cost_table({1: 1.0, 2: 1.2, 3: 1.25, 4: 1.3}))
    assert len(trimmed) == 1 and int(trimmed.tokens[0]) == 5


@st.composite
def scored_trees(draw, max_n=8):
    n = draw(st.integers(1, max_n))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    scores = [1.0] + [draw(st.floats(0.0, 1.0)) for _ in range(1, n)]
    return TokenTree(torch.arange(n), torch.tensor(parents), scores=torch.tensor(scores))


def closed_subsets(tree):
    """(nodes, expected tokens) of every ancestor-closed node set containing the root."""
    s, parents, out = monotone_scores(tree), tree.parents.tolist(), [(1, 1.0)]
    for r in range(1, len(tree)):
        for subset in itertools.combinations(range(1, len(tree)), r):
            if all(parents[i] in set(subset) | {0} for i in subset):
                out.append((r + 1, 1 + sum(float(s[i]) for i in subset)))
    return out


def brute_force_best(tree, cost):
    """The best ratio over every ancestor-closed node set containing the root."""
    return max(gain / cost(n) for n, gain in closed_subsets(tree))


@settings(max_examples=120, deadline=None)
@given(scored_trees(), st.floats(0.01, 0.6), st.floats(0.0, 0.1))
def test_trim_is_optimal_and_keeps_a_tree(tree, jump, slope):
    """Against brute force over all ancestor-closed subsets, for a concave-ish CPU-like cost curve."""
    cost = lambda n: 1.0 if n == 1 else 1.0 + jump + slope * (n - 2)  # noqa: E731
    trimmed = trim(tree, cost)
    s = monotone_scores(trimmed)
    ratio = (1 + float(s[1:].sum())) / cost(len(trimmed))
    assert ratio == pytest.approx(brute_force_best(tree, cost), rel=1e-9)
    kept = set(trimmed.token_paths)
    assert all(p[:-1] in kept for p in kept if p)  # every kept node's parent is kept


@settings(max_examples=60, deadline=None)
@given(st.lists(scored_trees(max_n=6), min_size=1, max_size=4), st.floats(0.01, 0.6), st.floats(0.0, 0.1))
def test_batch_sizing_is_optimal_for_the_padded_forward(trees, jump, slope):
    """The batch's forward holds B rows padded to the largest kept tree: brute force over every choice of
    one ancestor-closed node set per row, scored as total expected tokens / cost(B * largest size)."""
    cost = lambda n: 1.0 if n == 1 else 1.0 + jump + slope * (n - 2)  # noqa: E731
    kept = trim_batch(trees, cost)
    got = sum(1 + float(monotone_scores(t)[1:].sum()) for t in kept) / cost(len(trees) * max(len(t) for t in kept))
    best = max(sum(g for _, g in combo) / cost(len(trees) * max(n for n, _ in combo))
               for combo in itertools.product(*[closed_subsets(t) for t in trees]))
    assert got == pytest.approx(best, rel=1e-9)
    for tree, k in zip(trees, kept):
        paths = set(k.token_paths)
        assert all(p[:-1] in paths for p in paths if p) and set(paths) <= set(tree.token_paths)
    if len(trees) == 1:
        assert kept[0].tokens.tolist() == trim(trees[0], cost).tokens.tolist()


def test_a_big_batch_drafts_less_than_one_row():
    """On a CPU-like curve, drafts that pay for one row pay less when sixteen rows share the forward."""
    from specdec.profile import CostProfile

    v = CostProfile(step_ms=30.0, v={1: 1.0, 2: 1.0, 4: 1.15, 8: 1.33, 16: 1.57, 32: 2.02, 64: 2.71}).cost
    tree = TokenTree.from_sequences(5, [[1, 2, 3]], scores=[[0.3, 0.2, 0.1]])
    assert len(trim_batch([tree], v)[0]) == 3  # (1 + .3 + .2) / v(3) = 1.395 beats 1.3 / v(2) and 1.6 / v(4)
    # sixteen rows: 16 * 1.3 / v(32) = 10.30 beats 16 / v(16) = 10.19 and 16 * 1.5 / v(48) = 10.15
    assert [len(t) for t in trim_batch([tree] * 16, v)] == [2] * 16


def test_monotone_scores_cap_children_by_parents_and_zero_auxiliary_nodes():
    tree = TokenTree(torch.tensor([0, 1, 2, 3]), torch.tensor([-1, 0, 1, 0]), auxiliary=torch.tensor([False, False, False, True]),
                     scores=torch.tensor([0.7, 0.2, 0.9, 0.5]))
    assert monotone_scores(tree).tolist() == pytest.approx([1.0, 0.2, 0.2, 0.0])


def test_auxiliary_nodes_stay_only_under_kept_nodes():
    tree = TokenTree(torch.tensor([0, 1, 2, 7, 8]), torch.tensor([-1, 0, 0, 1, 2]),
                     auxiliary=torch.tensor([False, False, False, True, True]), scores=torch.tensor([1.0, 0.9, 0.01, 0.0, 0.0]))
    trimmed = trim(tree, cost_table({1: 1.0, 2: 1.05, 3: 1.5, 4: 1.6, 5: 1.7}))
    assert trimmed.tokens.tolist() == [0, 1, 7] and trimmed.auxiliary.tolist() == [False, False, True]


def test_judged_nodes_are_the_children_of_accepted_nodes():
    #      0
    #    1   2        accepted path 0 -> 1 -> 3; node 4 (child of 1) was judged and rejected,
    #   3 4   5       nodes 2 (child of root) too; 5 and 6 were never judged
    #   6?
    tree = TokenTree(torch.arange(7), torch.tensor([-1, 0, 0, 1, 1, 2, 3]))
    nodes, hits = judged_nodes(tree, torch.tensor([0, 1, 3]))
    assert nodes.tolist() == [1, 2, 3, 4, 6] and hits.tolist() == [True, False, True, False, False]


def test_acceptance_rates_learn_and_relax():
    rates = AcceptanceRates(prior=0.5, decay=0.9, strength=2.0, forget=0.5)
    assert rates["a"] == 0.5
    for _ in range(20):
        rates.update("a", False)
    low = rates["a"]
    assert low < 0.15
    rates.relax("a")
    assert low < rates["a"] < 0.5  # fading evidence drifts back toward the prior
    for _ in range(30):
        rates.update("b", True)
    assert rates["b"] > 0.85
    assert rates.path_scores([-1, 0, 1], [None, "b", "a"]) == pytest.approx([1.0, rates["b"], rates["b"] * rates["a"]])


def test_learn_updates_judged_nodes_and_relaxes_trimmed_ones():
    rates = AcceptanceRates(prior=0.5)
    keys = {(1,): "first", (1, 2): "second", (7,): "other"}
    tree = TokenTree.from_sequences(0, [[1, 2]])  # candidate (7,) was trimmed away
    rates.update("other", False)
    before = rates["other"]
    learn(rates, keys, tree, torch.tensor([0, 1]))  # 1 accepted, 2 rejected
    assert rates["first"] > 0.5 > rates["second"]
    assert rates["other"] > before


def test_trees_without_scores_are_verified_as_proposed():
    tree = TokenTree.from_sequences(3, [[1, 2, 3, 4]])
    assert trim(tree, cost_table({1: 1.0, 2: 5.0})) is tree


def test_node_budget_cuts_every_tree_to_its_best_nodes_and_stays_lossless():
    """node_budget=N: every verified tree holds at most N nodes whatever the machine's cost, output unchanged."""
    import specdec
    from conftest import tiny_model
    from specdec.drafters import PromptLookupConfig, PromptLookupDrafter

    class Recording(PromptLookupDrafter):
        def observe(self, result):
            self.sizes = getattr(self, "sizes", []) + [len(result.tree)]
            super().observe(result)

    model = tiny_model("llama")
    ids = torch.tensor([4, 5, 6, 7, 8, 4, 5, 6, 7, 8, 4, 5, 6])
    plain = specdec.generate(model, None, ids, drafter="none", max_new_tokens=20).token_ids
    wide = Recording(PromptLookupConfig(min_ngram=1, num_tokens=6))
    assert specdec.generate(model, None, ids, drafter=wide, max_new_tokens=20, size_trees=False).token_ids == plain
    assert max(wide.sizes) > 3
    cut = Recording(PromptLookupConfig(min_ngram=1, num_tokens=6))
    assert specdec.generate(model, None, ids, drafter=cut, max_new_tokens=20, node_budget=3).token_ids == plain
    assert max(cut.sizes) <= 3 and max(cut.sizes) > 1
    with pytest.raises(ValueError, match="node_budget"):
        specdec.generate(model, None, ids, drafter="none", max_new_tokens=2, node_budget=-1)


def test_joint_sizing_with_a_measured_batch_cost_turns_speculation_off_under_load():
    """v(B, n) measured over rows x nodes: trees grow while one row runs and shrink to the root when sixteen
    rows make extra nodes expensive, even where cost(B*n) on one row's curve would still draft."""
    from specdec.profile import BatchCostProfile

    batch = BatchCostProfile(step_ms=30.0, v={1: {1: 1.0, 2: 1.0, 4: 1.1}, 16: {1: 4.0, 2: 6.5, 4: 11.0}}).cost
    one_row = lambda n: 1.0 + n / 256  # noqa: E731  (nearly free extra rows)
    tree = TokenTree.from_sequences(5, [[1, 2, 3]], scores=[[0.5, 0.3, 0.2]])
    assert len(trim_batch([tree], one_row, batch_cost=batch)[0]) == 4
    assert [len(t) for t in trim_batch([tree] * 16, one_row, batch_cost=batch)] == [1] * 16
    assert [len(t) for t in trim_batch([tree] * 16, one_row)] == [4] * 16  # extrapolated from one row, it drafts
