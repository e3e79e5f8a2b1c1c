import torch

from conftest import tiny_model
from specdec.runner import TreeRunner
from specdec.tree import TokenTree


def test_commit_equals_recomputing_the_accepted_path():
    model = tiny_model("llama")
    prefix = torch.tensor([5, 9, 2, 7])
    # root 7 is re-fed as the tree root, so the prefix in the cache is [5, 9, 2]
    tree = TokenTree.from_sequences(7, [[1, 2, 3], [4, 5], [1, 6]])
    with torch.inference_mode(), TreeRunner(model) as runner:
        runner.prefill(prefix[:-1])
        runner.forward(tree)
        path = tree.path_to(int(torch.nonzero(tree.tokens == 6)))  # root -> 1 -> 6, not contiguous
        assert path.tolist() != list(range(path.numel()))
        runner.commit(3, path)
        assert runner.prefix_len == 3 + path.numel()
        logits = runner.forward(TokenTree.root_only(8)).logits
        # reference: causal run over prefix + accepted path + next token
        full = torch.cat([prefix, tree.tokens[path[1:]], torch.tensor([8])])
        ref = model(full[None]).logits[0, -1]
    torch.testing.assert_close(logits[0], ref, rtol=1e-9, atol=1e-9)


def test_rollback_is_a_pointer_move_and_capacity_grows():
    model = tiny_model("qwen2")
    with torch.inference_mode(), TreeRunner(model) as runner:
        runner.prefill(torch.arange(300) % 90)  # beyond the initial capacity
        layer = runner.cache.layers[0]
        storage = layer._k.data_ptr()
        runner.rollback(100)
        assert runner.prefix_len == 100 and layer._k.data_ptr() == storage
        logits = runner.forward(TokenTree.root_only(3)).logits
        ref = model(torch.cat([torch.arange(100) % 90, torch.tensor([3])])[None]).logits[0, -1]
    torch.testing.assert_close(logits[0], ref, rtol=1e-9, atol=1e-9)


def test_routed_and_masked_tree_forwards_agree_and_the_model_is_restored():
    """The tree through transformers' attention interface equals the tree through a 4-D mask, per node."""
    model = tiny_model("llama")
    before = model.config._attn_implementation
    tree = TokenTree.from_sequences(7, [[1, 2, 3], [4, 5], [1, 6]])
    outs = []
    for route in (True, False):
        with torch.inference_mode(), TreeRunner(model, route=route) as runner:
            assert runner.route is route
            runner.prefill(torch.tensor([5, 9, 2]))
            outs.append(runner.forward(tree).logits)
        assert model.config._attn_implementation == before
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-9)
