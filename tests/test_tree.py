import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.tree import TokenTree, parents_from_paths


def naive_ancestors(parents):
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j != -1:
            mask[i, j] = True
            j = parents[j]
    return mask


@st.composite
def random_parents(draw, max_n=40):
    n = draw(st.integers(1, max_n))
    return [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]


@settings(max_examples=150, deadline=None)
@given(random_parents())
def test_derived_fields_match_a_naive_walk(parents):
    tree = TokenTree(torch.arange(len(parents)), torch.tensor(parents))
    mask = naive_ancestors(parents)
    assert torch.equal(tree.ancestor_mask, mask)
    assert torch.equal(tree.depths, mask.sum(1) - 1)
    assert torch.equal(tree.position_ids(7), tree.depths + 7)
    # each leaf path is a parent chain from the root to a leaf, and every leaf appears once
    leaves = set()
    for path in tree.leaf_path_list():
        assert path[0] == 0
        for a, b in zip(path[:-1].tolist(), path[1:].tolist()):
            assert parents[b] == a
        leaves.add(int(path[-1]))
    assert leaves == {i for i in range(len(parents)) if i not in parents[1:]}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=6), min_size=0, max_size=6))
def test_trie_holds_every_sequence_once(seqs):
    tree = TokenTree.from_sequences(99, seqs)
    prefixes = {tuple(s[:d]) for s in seqs for d in range(1, len(s) + 1)}
    assert tree.num_drafts == len(prefixes)  # shared prefixes merged, nothing else
    for s in seqs:  # each sequence is a path from the root
        node = 0
        for tok in s:
            kids = [i for i in range(len(tree)) if tree.parents[i] == node and tree.tokens[i] == tok]
            assert len(kids) == 1
            node = kids[0]
        assert tree.path_to(node).numel() == len(s) + 1


def test_worked_example_from_the_docstring():
    tree = TokenTree.from_sequences(10, [[1, 2], [1, 3]])
    assert tree.tokens.tolist() == [10, 1, 2, 3]
    assert tree.parents.tolist() == [-1, 0, 1, 1]
    assert tree.depths.tolist() == [0, 1, 2, 2]
    assert tree.ancestor_mask[3].tolist() == [True, True, False, True]
    assert tree.leaf_paths.tolist() == [[0, 1, 2], [0, 1, 3]]


@pytest.mark.parametrize(
    "parents, why",
    [
        ([0, 0], "root must have parent -1"),
        ([-1, 1], "a node cannot be its own parent"),
        ([-1, 2, 0], "parents must come before children"),
        ([-1, -1], "only the root has no parent"),
    ],
)
def test_bad_structure_is_rejected(parents, why):
    with pytest.raises(ValueError):
        TokenTree(torch.arange(len(parents)), torch.tensor(parents))


def test_merge_unions_paths_and_keeps_sources():
    a = TokenTree.from_sequences(5, [[1, 2, 3]], source=0)
    b = TokenTree.from_sequences(5, [[1, 2, 4], [7]], source=1)
    m = a.merge(b)
    seqs = sorted(m.tokens[p[1:]].tolist() for p in m.leaf_path_list())
    assert seqs == [[1, 2, 3], [1, 2, 4], [7]]
    assert m.num_drafts == 5
    assert sorted(m.sources[m.is_leaf].tolist()) == [0, 1, 1]
    with pytest.raises(ValueError):
        a.merge(TokenTree.root_only(6))


def test_merge_keeps_every_per_node_field():
    """Auxiliary flags and embeddings, draft distributions, scores and sources all survive a fusion."""
    v = 10
    a = TokenTree(torch.tensor([5, 1, 0]), torch.tensor([-1, 0, 1]), auxiliary=torch.tensor([False, False, True]),
                  input_embeds=torch.arange(12.0).reshape(3, 4), scores=torch.tensor([1.0, 0.4, 0.0]))
    q = torch.softmax(torch.randn(3, v), -1)
    b = TokenTree(torch.tensor([5, 1, 2]), torch.tensor([-1, 0, 1]), draft_probs=q, scores=torch.tensor([1.0, 0.7, 0.2]),
                  sources=torch.tensor([-1, 3, 3]))
    m = a.merge(b)
    assert m.tokens.tolist() == [5, 1, 0, 2] and m.parents.tolist() == [-1, 0, 1, 1]
    assert m.auxiliary.tolist() == [False, False, True, False]  # b's node 2 did not merge into a's aux node
    assert torch.equal(m.input_embeds[2], a.input_embeds[2]) and not m.input_embeds[3].any()
    assert m.scores.tolist() == pytest.approx([1.0, 0.7, 0.0, 0.2])  # the shared node keeps the larger estimate
    assert m.sources.tolist() == [-1, -1, -1, 3]
    torch.testing.assert_close(m.draft_probs[3], q[2])  # b's own q
    assert m.draft_probs[2].tolist() == [1.0] + [0.0] * (v - 1)  # a point mass at the token for a's nodes
    sub = m.subtree(torch.tensor([0, 1, 3]))
    assert sub.tokens.tolist() == [5, 1, 2] and sub.parents.tolist() == [-1, 0, 1] and sub.auxiliary.tolist() == [False] * 3
    with pytest.raises(ValueError, match="parent"):
        m.subtree(torch.tensor([0, 3]))


def test_children_and_token_paths():
    tree = TokenTree.from_sequences(9, [[1, 2], [1, 3], [4]])
    assert tree.children == [[1, 4], [2, 3], [], [], []]
    assert tree.token_paths == [(), (1,), (1, 2), (1, 3), (4,)]


def test_paths_to_parents_medusa_format():
    parents, choices = parents_from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
    assert parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert choices.tolist() == [-1, 0, 1, 0, 1, 0, 0]
    with pytest.raises(ValueError):
        parents_from_paths([(0, 1)])  # (0,) missing
