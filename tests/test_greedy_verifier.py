import torch

from specdec.tree import TokenTree
from specdec.verifiers import greedy_accept


def onehot_logits(argmax, vocab=10):
    logits = torch.zeros(len(argmax), vocab)
    logits[torch.arange(len(argmax)), torch.tensor(argmax)] = 5.0
    return logits


def test_docstring_example_picks_the_deepest_correct_branch():
    # r -> a(1) -> c(3); r -> b(2)
    tree = TokenTree(torch.tensor([9, 1, 2, 3]), torch.tensor([-1, 0, 0, 1]))
    acc = greedy_accept(tree, onehot_logits([1, 3, 4, 7]))
    assert acc.path.tolist() == [0, 1, 3]
    assert acc.bonus == 7
    assert acc.new_tokens(tree) == [1, 3, 7]


def test_nothing_accepted_gives_the_root_argmax():
    tree = TokenTree.from_sequences(9, [[1, 2], [3]])
    acc = greedy_accept(tree, onehot_logits([5, 0, 0, 0]))
    assert acc.path.tolist() == [0] and acc.bonus == 5


def test_a_correct_child_under_a_wrong_parent_is_not_accepted():
    # r -> a(1) -> b(2); target says r->x, a->b. b is "correct" locally but its parent is not.
    tree = TokenTree.from_sequences(9, [[1, 2]])
    acc = greedy_accept(tree, onehot_logits([4, 2, 0]))
    assert acc.path.tolist() == [0] and acc.bonus == 4


def test_auxiliary_nodes_are_never_accepted():
    tree = TokenTree(torch.tensor([9, 1]), torch.tensor([-1, 0]), auxiliary=torch.tensor([False, True]))
    acc = greedy_accept(tree, onehot_logits([1, 3]))
    assert acc.path.tolist() == [0] and acc.bonus == 1


def test_full_chain_accepted():
    tree = TokenTree.from_sequences(9, [[1, 2, 3]])
    acc = greedy_accept(tree, onehot_logits([1, 2, 3, 8]))
    assert acc.path.tolist() == [0, 1, 2, 3] and acc.bonus == 8
