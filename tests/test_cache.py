import torch

from conftest import tiny_model
from specdec.cache import TreeKVCache
from specdec.engine import _forward, _forward_prefill
from specdec.tree import TokenTree


def test_commit_equals_recomputing_the_accepted_path():
    model = tiny_model("llama")
    prefix = torch.tensor([5, 9, 2, 7])
    # root 7 is re-fed as the tree root, so the prefix in the cache is [5, 9, 2]
    tree = TokenTree.from_sequences(7, [[1, 2, 3], [4, 5], [1, 6]])
    with torch.inference_mode():
        cache = TreeKVCache()
        _forward_prefill(model, cache, prefix[:-1], False)
        _forward(model, cache, tree, False)
        path = tree.path_to(int(torch.nonzero(tree.tokens == 6)))  # root -> 1 -> 6, not contiguous
        assert path.tolist() != list(range(path.numel()))
        cache.commit(3, path)
        assert cache.get_seq_length() == 3 + path.numel()
        nxt = TokenTree.root_only(8)
        logits, _ = _forward(model, cache, nxt, False)
        # reference: causal run over prefix + accepted path + next token
        full = torch.cat([prefix, tree.tokens[path[1:]], torch.tensor([8])])
        ref = model(full[None]).logits[0, -1]
    torch.testing.assert_close(logits[0], ref, rtol=1e-9, atol=1e-9)


def test_truncate_is_a_pointer_move_and_capacity_grows():
    model = tiny_model("qwen2")
    with torch.inference_mode():
        cache = TreeKVCache()
        _forward_prefill(model, cache, torch.arange(300) % 90, False)  # beyond the initial capacity
        layer = cache.layers[0]
        storage = layer._k.data_ptr()
        cache.truncate(100)
        assert cache.get_seq_length() == 100 and layer._k.data_ptr() == storage
        logits, _ = _forward(model, cache, TokenTree.root_only(3), False)
        ref = model(torch.cat([torch.arange(100) % 90, torch.tensor([3])])[None]).logits[0, -1]
    torch.testing.assert_close(logits[0], ref, rtol=1e-9, atol=1e-9)
