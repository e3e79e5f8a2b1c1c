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


def test_a_released_cache_lends_its_buffers_to_the_next_and_keeps_nothing_of_its_own():
    from specdec.cache import TreeKVCache

    from specdec import cache as cache_mod

    with cache_mod._spare_lock:
        cache_mod._spare.clear()
    a = TreeKVCache()
    k = torch.randn(1, 2, 300, 8)
    for i in range(2):
        a.update(k, k + 1, i)
    ptrs = {a.layers[0]._k.data_ptr(), a.layers[1]._k.data_ptr()}
    a.release()
    assert a.get_seq_length() == 0 and not a.layers[0].is_initialized
    b = TreeKVCache()
    small = torch.randn(1, 2, 10, 8)
    b.update(small, small * 2, 0)
    assert b.layers[0]._k.data_ptr() in ptrs  # a spare buffer, not a fresh allocation
    torch.testing.assert_close(b.layers[0].keys, small)
    torch.testing.assert_close(b.layers[0].values, small * 2)
    other = TreeKVCache()
    other.update(torch.randn(1, 3, 10, 8), torch.randn(1, 3, 10, 8), 0)  # another head count: not from the pool
    assert other.layers[0]._k.data_ptr() not in ptrs
    a.update(k[:, :, :5], k[:, :, :5], 0)  # the released cache starts over, empty
    assert a.get_seq_length() == 5
