"""GAD's block drafter: lossless, what it reads at inference equals what it was trained on, training ships a drafter."""

import json

import pytest
import torch

import specdec
from conftest import hf_greedy, save_tiny_target, tiny_model, write_conversations
from specdec.drafters.base import DraftState, Target
from specdec.drafters.gad import GADBlock, GADConfig, GADDrafter, block_mask, decoder_layers
from specdec.training.gad import window_batch


def random_block(model, block=4, window=6, seed=0):
    torch.manual_seed(seed)
    layers, rotary = decoder_layers(model, 2)
    cfg = GADConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size, block=block, window=window, num_layers=2)
    blk = GADBlock(cfg, layers, rotary, model.get_input_embeddings(), model.get_output_embeddings().weight)
    torch.nn.init.normal_(blk.slots, std=1.0)
    return blk.to(model.dtype)


def test_block_mask_table():
    m = block_mask(torch.tensor([2]), 3, 2, torch.float32)[0, 0] == 0  # rows: pad, c1, c2, root, s1, s2
    assert m[1].tolist() == [False, True, False, False, False, False]  # a context row: causal, padding hidden
    assert m[3].tolist() == [False, True, True, True, False, False]  # the root sees the context
    assert m[4].tolist() == [False, True, True, True, True, True]  # a slot sees everything, the other slot too


def test_gad_greedy_equals_hf_greedy(tiny):
    drafter = GADDrafter.from_block(random_block(tiny))
    g = torch.Generator().manual_seed(5)
    for i in range(4):
        ids = torch.randint(0, 96, (int(torch.randint(2, 25, (1,), generator=g)),), generator=g)
        ref = hf_greedy(tiny, ids, 24, min_new_tokens=24)
        for sized in (False, True):
            assert specdec.generate(tiny, None, ids, drafter=drafter, max_new_tokens=24, size_trees=sized).token_ids == ref, (i, sized)


def test_inference_reads_the_same_window_as_training():
    """The block's logits at a step equal its logits on the training window built for that position."""
    model = tiny_model("llama")
    blk = random_block(model)
    ids = torch.randint(0, 96, (14,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        hidden = model(ids[None], output_hidden_states=True).hidden_states[-1][0]
    d = GADDrafter.from_block(blk)
    d.bind(Target.of(model))
    d.reset(ids[:10])
    d.propose(DraftState(ids[:11], 10, hidden[:10], 0))  # positions 0..9; the root is ids[10]
    state = DraftState(ids[:14], 10, hidden[10:13], 10)  # three more committed; the root is ids[13]
    with torch.inference_mode():
        ctx = torch.cat([hidden[:10], hidden[10:13]])[-6:]
        live = d.block(ctx[None], torch.tensor([6]), torch.tensor([int(ids[13])]), torch.tensor([7]))
        feats = [{"hidden": hidden, "labels": torch.zeros(14, dtype=torch.long), "ids": ids}]
        batch = window_batch(feats, [(0, 12)], 6, 4)
        trained = d.block(batch["context"].to(model.dtype), batch["window"], batch["root"], batch["start"])
    torch.testing.assert_close(live, trained)
    tree = d.propose(state)
    assert int(tree.tokens[0]) == int(ids[13]) and tree.num_drafts == 4


def test_training_ships_a_gad_drafter(tmp_path, default_tokenizer):
    from specdec.training import load_recipe, train

    target = save_tiny_target(tmp_path / "target", default_tokenizer)
    data = write_conversations(tmp_path / "convs.jsonl", [(f"Count to {i}.", " ".join(str(j) for j in range(i + 8))) for i in range(12)])
    cfg = load_recipe("gad-smollm2-cpu", dict(model=str(target), data=str(data), output_dir=str(tmp_path / "run"), features_dir="", num_conversations=9, skip=0, store_layers="-1", bf16=False,
                                              heldout=3, max_len=48, depth=4, gad={"window": 6, "windows": 4}, draft_vocab_size=128,
                                              batch_size=8, max_steps=3, epochs=1, save_steps=100, logging_steps=1, progress=False))
    final = train(cfg)
    saved = json.loads((final / "config.json").read_text())
    assert saved["block"] == 4 and len(saved["extra"]["heldout_accuracy"]) == 4
    model, tok = specdec.load_model(target)
    out = specdec.generate(model, tok, "Count to 3.", drafter=f"gad:{final}", max_new_tokens=10)
    assert out.token_ids == specdec.generate(model, tok, "Count to 3.", drafter="none", max_new_tokens=10).token_ids
    with pytest.raises(ValueError, match="vocabulary"):
        specdec.generate(tiny_model("llama"), None, torch.tensor([1, 2]), drafter=f"gad:{final}", max_new_tokens=2)
