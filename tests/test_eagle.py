"""EAGLE-3-class drafter: lossless on two architectures (alone, fused, with a draft vocabulary), training-time
test computes exactly what drafting computes, files, fit checks, training on a tiny model."""

import json

import pytest
import torch

import specdec
from specdec.drafters import build_drafter
from conftest import assert_greedy_equals_hf_on_random_prompts, hf_greedy, save_tiny_target, tiny_model, write_conversations
from specdec.drafters.eagle import EagleConfig, EagleDrafter, EagleDrafterConfig, EagleModel, default_feature_layers


def random_eagle(model, layers=(1, 2), draft=None, seed=0, steps=3):
    torch.manual_seed(seed)
    cfg = EagleConfig.for_target(model, feature_layers=list(layers), draft_vocab_size=draft, ttt_steps=steps)
    vocab = model.config.vocab_size
    dv = torch.arange(draft) * (vocab // draft) if draft else torch.arange(vocab)
    eagle = EagleModel(cfg, dv, model.get_output_embeddings().weight[dv].detach())
    for p in eagle.parameters():  # random, so drafts are not all the same token
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3)
    return eagle.to(model.dtype).attach(model.get_input_embeddings())


def test_default_feature_layers_are_low_mid_high():
    assert default_feature_layers(30) == [2, 15, 27]
    assert default_feature_layers(2) == [1]


@pytest.mark.parametrize("kind", ["plain", "draft-vocab", "fused", "last-layer"])
def test_eagle_greedy_equals_hf_greedy(tiny, kind):
    layers = (-1,) if kind == "last-layer" else (1, 0, 2)
    drafter = EagleDrafter(random_eagle(tiny, layers, draft=48 if kind == "draft-vocab" else None), EagleDrafterConfig(depth=4, beam=4, topk=3))
    if kind == "fused":
        from specdec.drafters.fused import FusedDrafter
        from specdec.drafters.prompt_lookup import PromptLookupDrafter

        drafter = FusedDrafter([PromptLookupDrafter(), drafter])
    assert_greedy_equals_hf_on_random_prompts(tiny, drafter, kind)
    batch = specdec.generate(tiny, None, [torch.tensor([3, 4, 5]), torch.tensor([9, 8, 7, 6, 5, 4])], drafter=drafter, max_new_tokens=12)
    assert [r.token_ids for r in batch] == [hf_greedy(tiny, torch.tensor(p), 12, min_new_tokens=12) for p in ([3, 4, 5], [9, 8, 7, 6, 5, 4])]


def test_training_time_test_computes_what_drafting_computes():
    """Step j of the unrolled training forward at index t gives the logits drafting computes at depth j + 1 of the
    chain from t (same entries, same positions, same masks): training trains what inference runs."""
    from specdec.drafters.base import DraftState, Target
    from specdec.training.eagle import EagleModule

    model = tiny_model("llama")
    eagle = random_eagle(model, (1, 2), steps=3)
    drafter = EagleDrafter(eagle, EagleDrafterConfig(depth=3, beam=1, topk=1))
    drafter.bind(Target.of(model))
    prompt = torch.tensor([5, 17, 3, 88, 41, 9, 60])
    seen = []
    logits_fn = eagle.logits
    eagle.logits = lambda h: seen.append(logits_fn(h).reshape(-1, logits_fn(h).shape[-1])[-1]) or logits_fn(h)
    with torch.inference_mode():
        out = model(prompt[None], output_hidden_states=True)
        feats = torch.cat([out.hidden_states[1], out.hidden_states[2]], -1)[0]
        drafter.reset(prompt)
        root = 33
        tree = drafter.propose(DraftState(torch.cat([prompt, torch.tensor([root])]), len(prompt), feats, 0))
    eagle.logits = logits_fn
    chain = tree.tokens[1:].tolist()  # beam 1: a chain
    assert len(chain) == 3 and len(seen) == 3
    seq = torch.cat([prompt, torch.tensor([root] + chain)])
    with torch.inference_mode():
        full = model(seq[None], output_hidden_states=True)
        features = torch.cat([full.hidden_states[1], full.hidden_states[2]], -1)
        module = EagleModule(eagle, eagle.head.weight, 96, steps=3, decay=0.8, distill=True)
        unrolled = [eagle.logits(h[0, len(prompt) - 1]) for _, h, _, _ in module.unroll(features, seq[None], torch.zeros_like(seq)[None])]
    for j in range(3):
        torch.testing.assert_close(unrolled[j], seen[j], rtol=1e-4, atol=1e-5)  # (softmax sums in float32)


def test_unrolled_steps_at_sampled_positions_compute_what_the_full_unroll_does():
    """eagle.ttt_positions: steps 1.. at a random sample of answer indices give, there, the full unroll's states;
    only wanted indices are marked sampled, and a short sequence's fillers are not; the loss trains through it."""
    from specdec.training.eagle import EagleModule

    model = tiny_model("llama")
    eagle = random_eagle(model, (1, 2), steps=3)
    torch.manual_seed(3)
    b, t = 3, 20
    ids = torch.randint(0, 96, (b, t))
    labels = torch.randint(0, 96, (b, t))
    labels[2, 9:] = -100  # a short sequence: 3 wanted indices (x_6..x_8), fewer than the 5 sampled
    answer = torch.zeros(b, t, dtype=torch.bool)
    answer[:, 6:] = True
    features = torch.randn(b, t, 2 * model.config.hidden_size)
    module = EagleModule(eagle, eagle.head.weight.detach(), 96, steps=3, decay=0.8, distill=True, positions=5)
    with torch.no_grad():
        full = [h for _, h, _, _ in module.unroll(features, ids, labels, answer)]
        part = list(module.unroll(features, ids, labels, answer, positions=5))
    assert [p[1].shape[1] for p in part] == [t - 1, 5, 5]
    for j, h, at, sampled in part[1:]:
        want = (labels[:, 2:] >= 0) & answer[:, 2:]  # step 1's target at index t is x_{t+2}
        assert torch.equal(sampled, want.gather(1, at)) and sampled[:2].all()
        assert int(sampled[2].sum()) == 3 and len(set(at[2].tolist())) == 5  # all its wanted ones, then fillers
        torch.testing.assert_close(h, full[j].gather(1, at[..., None].expand(-1, -1, h.shape[-1])), rtol=1e-5, atol=1e-5)
    module.train()
    out = module(features, features[..., : model.config.hidden_size], ids, labels, answer)
    out["loss"].backward()
    assert eagle.q_proj.weight.grad is not None and torch.isfinite(out["loss"])


def test_vocab_option_drafts_over_the_most_frequent_tokens_and_stays_lossless(tmp_path):
    from specdec.drafters.base import add_draft_counts

    model = tiny_model("llama")
    eagle = random_eagle(model, draft=32)
    counts = torch.arange(32).flip(0) * 3 + (torch.arange(32) == 20) * 1000  # row 20 the most frequent, then 0, 1, ...
    add_draft_counts(eagle, counts)
    eagle.save_pretrained(tmp_path / "e")
    drafter = build_drafter(f"eagle:{tmp_path / 'e'},vocab=5")
    assert drafter.model.draft_vocab.tolist() == eagle.draft_vocab[[0, 1, 2, 3, 20]].tolist()
    assert torch.equal(drafter.model.head.weight, eagle.head.weight[[0, 1, 2, 3, 20]])
    proposed, propose = [], drafter.propose
    drafter.propose = lambda state: proposed.append(propose(state)) or proposed[-1]
    ids = torch.tensor([4, 5, 6, 7])
    out = specdec.generate(model, None, ids, drafter=drafter, max_new_tokens=10, size_trees=False)
    assert out.token_ids == hf_greedy(model, ids, 10, min_new_tokens=10)
    drafted = {t for tree in proposed for t in tree.tokens[1:].tolist()}
    assert drafted and drafted <= set(drafter.model.draft_vocab.tolist())
    with pytest.raises(ValueError, match="between 1 and the draft vocabulary's 32"):
        build_drafter(f"eagle:{tmp_path / 'e'},vocab=33")
    random_eagle(model, draft=32).save_pretrained(tmp_path / "old")  # saved without counts
    with pytest.raises(ValueError, match="holds none"):
        build_drafter(f"eagle:{tmp_path / 'old'},vocab=8")


def test_files_round_trip_and_fit_checks(tmp_path):
    model = tiny_model("llama")
    eagle = random_eagle(model, draft=32)
    eagle.save_pretrained(tmp_path / "e")
    back = EagleModel.from_pretrained(tmp_path / "e")
    assert back.config == eagle.config and all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), eagle.state_dict().values()))
    ids = torch.tensor([4, 5, 6, 7])
    a = specdec.generate(model, None, ids, drafter=f"eagle:{tmp_path / 'e'}", max_new_tokens=10)
    assert a.token_ids == hf_greedy(model, ids, 10, min_new_tokens=10)
    raw = json.loads((tmp_path / "e" / "config.json").read_text())
    (tmp_path / "e" / "config.json").write_text(json.dumps({**raw, "format_version": 0}))
    with pytest.raises(ValueError, match="format 0.*retrain"):
        specdec.drafters.build_drafter(f"eagle:{tmp_path / 'e'}")
    (tmp_path / "e" / "config.json").write_text(json.dumps({**raw, "hidden_size": 64, "num_heads": 4}))
    with pytest.raises(ValueError, match="shape"):
        specdec.drafters.build_drafter(f"eagle:{tmp_path / 'e'}")
    with pytest.raises(ValueError, match="reads layers"):  # the target has hidden states 0 .. 2
        specdec.generate(model, None, ids, drafter=EagleDrafter(random_eagle(model, layers=(1, 5))), max_new_tokens=4)


def test_training_fits_eagle_and_ships_a_drafter(tmp_path, default_tokenizer):
    from specdec.training import load_recipe, train

    target = save_tiny_target(tmp_path / "target", default_tokenizer)
    data = write_conversations(tmp_path / "convs.jsonl", [(f"Say something about topic {i}.", f"Topic {i} is a fine topic. " * 3) for i in range(16)])
    cfg = load_recipe("eagle-smollm2-cpu", dict(model=str(target), data=str(data), output_dir=str(tmp_path / "run"), features_dir="",
                                                num_conversations=12, heldout=4, max_len=64, depth=3, draft_vocab_size=128, store_layers=[],
                                                batch_size=4, max_steps=4, epochs=1, save_steps=100, logging_steps=2, progress=False))
    final = train(cfg)
    saved = json.loads((final / "config.json").read_text())
    assert saved["feature_layers"] == [1] and len(saved["extra"]["heldout_accuracy"]) == 3 and saved["extra"]["train_time_s"] > 0
    model, tok = specdec.load_model(target)
    msgs = [{"role": "user", "content": "Say something about topic 3."}]
    out = specdec.generate(model, tok, msgs, drafter=f"eagle:{final}", max_new_tokens=12, size_trees=False)  # (untrimmed: it drafts)
    assert out.token_ids == specdec.generate(model, tok, msgs, drafter="none", max_new_tokens=12).token_ids
    assert out.stats.drafted_tokens > 0
    counts = EagleModel.from_pretrained(final).draft_counts
    assert counts is not None and counts.shape == (128,) and counts.sum() > 0  # label counts kept for vocab=N
    # a run continued from that drafter (a later session: new optimizer, same layers and draft vocabulary)
    cfg.output_dir = str(tmp_path / "run2")
    cfg.eagle.init = str(final)
    cfg.eagle.ttt_positions = 8  # (the later steps at 8 sampled positions)
    cfg.max_steps = 2
    again = train(cfg)
    first, second = EagleModel.from_pretrained(final), EagleModel.from_pretrained(again)
    assert torch.equal(first.draft_vocab, second.draft_vocab)
    assert torch.equal(second.draft_counts, 2 * first.draft_counts)  # the same conversations counted once more
    assert not torch.equal(first.fc.weight, second.fc.weight)  # it trained on
    extra = json.loads((again / "config.json").read_text())["extra"]
    assert [r["train_steps"] for r in extra["runs"]] == [4, 2] and extra["total_train_steps"] == 6
    assert extra["runs"][1]["init"] == str(final) and extra["train_steps"] == 2
    cfg.eagle.layers = [2]
    with pytest.raises(ValueError, match="reads layers"):
        train(cfg)


def test_online_features_are_what_the_store_holds_and_train_a_lossless_drafter(tmp_path, default_tokenizer):
    """features=online: the target run inside the step gives the store's arrays (layers, greedy labels, answer
    mask) for the same conversations, and a run trained that way ships a drafter that drafts and stays lossless."""
    from specdec.training import load_recipe, train
    from specdec.training.common import collate_tokens, target_features, token_items
    from specdec.training.eagle import OnlineFeatures

    target = save_tiny_target(tmp_path / "target", default_tokenizer)
    data = write_conversations(tmp_path / "convs.jsonl", [(f"Tell me about item {i}.", f"Item {i} is blue and round. " * 2) for i in range(10)])
    settings = dict(model=str(target), data=str(data), output_dir=str(tmp_path / "run"), features_dir=str(tmp_path / "store"),
                    num_conversations=8, heldout=2, max_len=48, depth=3, draft_vocab_size=128, store_layers=[], batch_size=4,
                    max_steps=3, epochs=1, save_steps=100, logging_steps=1, progress=False, feature_dtype="")
    cfg = load_recipe("eagle-smollm2-cpu", settings)
    model, tok = specdec.load_model(target)
    from specdec.training.data import load_conversations

    convs = load_conversations(str(data))
    layers = [1, -1]
    _, stored = target_features(model, tok, convs, cfg, layers, min_len=3)
    _, tokens = token_items(tok, convs, cfg, min_len=3)
    online = OnlineFeatures(None, model, layers)
    assert len(stored) == len(tokens) == 8
    for i in (0, 5):
        got = online.features(**collate_tokens([tokens[i]]))
        want = stored[i]
        assert torch.equal(got["ids"][0], want["ids"]) and torch.equal(got["answer"][0], want["answer"])
        assert torch.equal(got["labels"][0], want["labels"])
        # the store keeps bf16: the same values up to its rounding
        torch.testing.assert_close(got["features"][0], want["hidden"][:, 0], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got["last"][0], want["hidden"][:, 1], rtol=1e-2, atol=1e-2)
    # a padded batch gives each row what it gives alone
    both = online.features(**collate_tokens([tokens[0], tokens[5]]))
    n = tokens[0]["ids"].numel()
    assert torch.equal(both["labels"][0, :n], online.features(**collate_tokens([tokens[0]]))["labels"][0])
    assert (both["labels"][0, n:] == -100).all() and not both["answer"][0, n:].any()

    cfg = load_recipe("eagle-smollm2-cpu", {**settings, "features": "online", "output_dir": str(tmp_path / "online")})
    final = train(cfg)
    saved = json.loads((final / "config.json").read_text())
    assert len(saved["extra"]["heldout_accuracy"]) == 3 and saved["extra"]["train_steps"] == 3
    assert 0 < saved["extra"]["median_step_s"] <= saved["extra"]["train_time_s"]  # a warm step's cost, what calibration reads
    assert not (tmp_path / "online" / "features").exists()  # nothing stored
    msgs = [{"role": "user", "content": "Tell me about item 4."}]
    out = specdec.generate(model, tok, msgs, drafter=f"eagle:{final}", max_new_tokens=12, size_trees=False)
    assert out.token_ids == specdec.generate(model, tok, msgs, drafter="none", max_new_tokens=12).token_ids
    assert out.stats.drafted_tokens > 0
    with pytest.raises(ValueError, match="online is implemented for method eagle only"):
        load_recipe("clover2-smollm2-cpu", {"features": "online"})
