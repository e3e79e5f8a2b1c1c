"""Batch > 1: each row of a batch equals that prompt alone, for every drafter; ragged commits; sampling at batch 3."""

import collections
import itertools
import time

import pytest
import torch

import specdec
from conftest import tiny_model
from drafters_for_tests import RandomDrafter
from specdec.batch import BatchRunner
from specdec.runner import TreeRunner
from specdec.tree import TokenTree


def prompts_of_many_lengths(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, vocab, (6,), generator=g)
    return [torch.randint(0, vocab, (3,), generator=g), torch.cat([base, base, base[:3]]), torch.randint(0, vocab, (31,), generator=g),
            torch.cat([torch.randint(0, vocab, (9,), generator=g), base, base])]


def drafter_specs(model, tmp_path):
    """Every kind of drafter, small and random where it is trained."""
    from test_clover import random_heads as clover_heads
    from test_eagle import random_eagle
    from test_gad import random_block
    from test_medusa import random_heads as medusa_heads
    from test_ppd import random_tokens

    from specdec.datastore import Datastore
    from specdec.drafters.clover import CloverDrafter
    from specdec.drafters.draft_model import DraftModelConfig, DraftModelDrafter
    from specdec.drafters.eagle import EagleDrafter, EagleDrafterConfig
    from specdec.drafters.gad import GADDrafter
    from specdec.drafters.medusa import MedusaDrafter
    from specdec.drafters.ppd import PPDDrafter
    from specdec.drafters.rapid import RapidConfig, RapidDrafter
    from specdec.drafters.rest import RestConfig, RestDrafter

    vocab = model.config.vocab_size
    store = Datastore.from_documents([torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(5)], vocab)
    return {
        "none": lambda: "none",
        "prompt-lookup": lambda: "prompt-lookup:adaptive=false",
        "medusa": lambda: MedusaDrafter(medusa_heads(model)),
        "clover": lambda: CloverDrafter.from_heads(clover_heads(model)),
        "ppd": lambda: PPDDrafter(random_tokens(model)),
        "eagle": lambda: EagleDrafter(random_eagle(model), EagleDrafterConfig(depth=3, beam=3, topk=2)),
        "gad": lambda: GADDrafter.from_block(random_block(model)),
        "rest": lambda: RestDrafter(store, RestConfig(min_span=1)),
        "suffix": lambda: "suffix",
        "iad": lambda: "iad",
        "draft-model": lambda: DraftModelDrafter(tiny_model(model.config.model_type, seed=3), config=DraftModelConfig(k=3, fast=False)),
        "rapid": lambda: RapidDrafter(None, config=RapidConfig(chunk=4, top_chunks=2, head=2, tail=4, period=3, k=3, fast=False)),
        "medusa+prompt-lookup": lambda: "fused",
    }


@pytest.mark.parametrize("kind", ["none", "prompt-lookup", "medusa", "clover", "ppd", "gad", "rest", "suffix", "iad", "draft-model", "rapid",
                                  "medusa+prompt-lookup"])
def test_every_row_equals_its_prompt_alone(tiny, kind, tmp_path):
    specs = drafter_specs(tiny, tmp_path)
    if kind == "medusa+prompt-lookup":
        from specdec.drafters.fused import FusedDrafter
        from specdec.drafters.prompt_lookup import PromptLookupDrafter

        make = lambda: FusedDrafter([specs["medusa"](), PromptLookupDrafter()])  # noqa: E731
    else:
        make = specs[kind]
    prompts = prompts_of_many_lengths(tiny.config.vocab_size)
    # a row-dependent finish: EOS is a token some rows meet early and others never
    eos = specdec.generate(tiny, None, prompts[2], drafter="none", max_new_tokens=6).token_ids[5]
    tiny.generation_config.eos_token_id = eos
    try:
        alone = [specdec.generate(tiny, None, p, drafter=make(), max_new_tokens=24, size_trees=False) for p in prompts]
        for sized, width in ((False, 0), (True, 0), (True, 2)):  # width 2: continuous batching, rows join as others leave
            together = specdec.generate(tiny, None, prompts, drafter=make(), max_new_tokens=24, size_trees=sized, max_batch=width)
            assert [r.token_ids for r in together] == [r.token_ids for r in alone], (kind, sized, width)
            assert [r.finish_reason for r in together] == [r.finish_reason for r in alone]
    finally:
        tiny.generation_config.eos_token_id = None
    assert len({len(r.token_ids) for r in alone}) > 1  # the rows finished at different steps


def test_stop_strings_per_row_and_streams(default_model):
    model, tok = default_model
    prompts = ["Count from one to twenty in words, separated by commas:", "Name three colours.", "Write the alphabet in capitals:"]
    alone = [specdec.generate(model, tok, p, drafter="prompt-lookup", max_new_tokens=30, stop=["ten", "K"]) for p in prompts]
    together = specdec.generate(model, tok, prompts, drafter="prompt-lookup", max_new_tokens=30, stop=["ten", "K"])
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.finish_reason for r in together] == [r.finish_reason for r in alone]
    pieces = {i: "" for i in range(3)}
    for i, piece in specdec.stream(model, tok, prompts, drafter="prompt-lookup", max_new_tokens=30, stop=["ten", "K"]):
        pieces[i] += piece
    assert [pieces[i] for i in range(3)] == [r.text for r in alone]


def test_a_list_of_messages_is_one_chat_and_a_list_of_prompts_a_batch():
    from specdec.engine import is_batch

    assert not is_batch([{"role": "user", "content": "hi"}]) and not is_batch([1, 2, 3]) and not is_batch("hi")
    assert is_batch(["a", "b"]) and is_batch([[{"role": "user", "content": "hi"}]]) and is_batch([[1, 2], [3]])
    assert is_batch([torch.tensor([1, 2])])


def ragged_prompts():
    """Three prompts of different lengths (4, 7, 2 tokens)."""
    return [torch.tensor([5, 9, 2, 7]), torch.tensor([3, 3, 8, 1, 4, 6, 2]), torch.tensor([13, 11])]


def test_ragged_commit_equals_recomputing_each_row():
    """Rows of different lengths commit different paths; afterwards each row's next logits match a plain run."""
    model = tiny_model("llama")
    prompts = ragged_prompts()
    trees = [TokenTree.from_sequences(int(p[-1]), seqs) for p, seqs in
             zip(prompts, ([[1, 2, 3], [4, 5], [1, 6]], [[7, 8]], [[9], [10, 11, 12]]))]
    paths = [trees[0].path_to(int(torch.nonzero(trees[0].tokens == 6))), torch.tensor([0, 1, 2]), torch.tensor([0])]
    with torch.inference_mode(), BatchRunner(model) as runner:
        runner.prefill([p[:-1] for p in prompts])
        assert runner.lengths == [3, 6, 1]
        runner.forward(trees)
        runner.commit(paths)
        assert runner.lengths == [3 + 3, 6 + 3, 1 + 1]
        nxt = runner.forward([TokenTree.root_only(8)] * 3).logits[:, 0]
    for b, (p, t, path) in enumerate(zip(prompts, trees, paths)):
        full = torch.cat([p, t.tokens[path[1:]], torch.tensor([8])])
        with torch.inference_mode():
            ref = model(full[None]).logits[0, -1]
        torch.testing.assert_close(nxt[b], ref, rtol=1e-9, atol=1e-9)


def test_sampling_at_batch_3_reproduces_the_target_distribution():
    """The chi-square test of test_sampling_statistics, three rows per call (vocab 4, real tiny model)."""
    from test_sampling_statistics import chi_square_pvalue

    from specdec.batch import decode_batch
    from specdec.drafters.prompt_lookup import PromptLookupConfig, PromptLookupDrafter
    from specdec.verifiers import SamplingConfig, SpeculativeSampler

    model = tiny_model("llama", vocab_size=4, seed=5)
    prompt = torch.tensor([1, 2, 3, 1, 2])
    probs = {}
    with torch.inference_mode():
        for seq in itertools.product(range(4), repeat=3):
            p = 1.0
            for i in range(3):
                logits = model(torch.cat([prompt, torch.tensor(seq[:i], dtype=torch.long)])[None]).logits[0, -1]
                p *= float(torch.softmax(logits.double(), -1)[seq[i]])
            probs[seq] = p
    counts, g = {}, torch.Generator().manual_seed(3)
    calls = 1200
    for _ in range(calls):
        drafters = [PromptLookupDrafter(PromptLookupConfig(adaptive=False, min_ngram=1, num_tokens=3)) for _ in range(3)]
        outs = {i: [] for i in range(3)}
        for i, ev in decode_batch(model, [prompt] * 3, drafters, SpeculativeSampler(SamplingConfig(temperature=1.0)),
                                  max_new_tokens=3, eos_ids=set(), generator=g):
            outs[i] += ev.new_tokens
        for o in outs.values():
            counts[tuple(o)] = counts.get(tuple(o), 0) + 1
    assert sum(counts.values()) == 3 * calls
    assert chi_square_pvalue(counts, probs, 3 * calls) > 0.001


def test_batch_of_one_is_the_single_path(tiny):
    ids = torch.tensor([4, 5, 6, 4, 5])
    one = specdec.generate(tiny, None, [ids], drafter="prompt-lookup", max_new_tokens=10)
    assert isinstance(one, list) and one[0].token_ids == specdec.generate(tiny, None, ids, drafter="prompt-lookup", max_new_tokens=10).token_ids
    with torch.inference_mode(), TreeRunner(tiny) as r:  # the single runner is untouched by batching
        r.prefill(ids)
        assert r.prefix_len == 5


def test_a_finished_row_leaves_the_batch_and_the_others_go_on_as_alone():
    """keep_rows drops a row (moving only the live entries) and the kept rows' next logits match a plain run."""
    model = tiny_model("llama")
    prompts = ragged_prompts()
    with torch.inference_mode(), BatchRunner(model) as runner:
        runner.prefill([p[:-1] for p in prompts])
        runner.keep([2, 0])
        assert runner.lengths == [1, 3]
        nxt = runner.forward([TokenTree.root_only(int(prompts[2][-1])), TokenTree.root_only(int(prompts[0][-1]))]).logits[:, 0]
    for b, p in enumerate([prompts[2], prompts[0]]):
        with torch.inference_mode():
            ref = model(p[None]).logits[0, -1]
        torch.testing.assert_close(nxt[b], ref, rtol=1e-9, atol=1e-9)


def test_rows_join_a_running_batch_and_each_goes_on_as_alone():
    """add_rows after rows left and grew: the joined rows and the old ones all get their own next logits."""
    model = tiny_model("llama")
    prompts = ragged_prompts()
    with torch.inference_mode(), BatchRunner(model) as runner:
        runner.prefill([p[:-1] for p in prompts[:2]], rows=2)
        runner.forward([TokenTree.root_only(int(prompts[0][-2])), TokenTree.root_only(int(prompts[1][-2]))])
        runner.commit([torch.tensor([0])] * 2)  # each row commits its last prompt token once more
        runner.keep([1])
        runner.join([p[:-1] for p in prompts[1:]])  # more rows than the batch had room for: it grows
        assert runner.lengths == [prompts[1].numel(), prompts[1].numel() - 1, prompts[2].numel() - 1]
        nxt = runner.forward([TokenTree.root_only(int(p[-1])) for p in prompts[1:2] + prompts[1:]]).logits[:, 0]
    refs = [torch.cat([prompts[1][:-1], prompts[1][-2:]]), prompts[1], prompts[2]]
    for b, p in enumerate(refs):
        with torch.inference_mode():
            ref = model(p[None]).logits[0, -1]
        torch.testing.assert_close(nxt[b], ref, rtol=1e-9, atol=1e-9)


def test_fill_holes_moves_only_the_last_rows():
    from specdec.batch import _fill_holes

    assert _fill_holes([0, 2, 3, 4], 5) == [0, 4, 2, 3]
    assert _fill_holes([0, 1, 2], 5) == [0, 1, 2]  # the last rows left: nothing moves
    assert _fill_holes([3, 4], 5) == [3, 4]
    assert _fill_holes([], 3) == []


def _leaves(drafter):
    """A drafter, or the drafters a fused one is made of."""
    return [leaf for d in getattr(drafter, "drafters", [drafter]) for leaf in _leaves(d)] if hasattr(drafter, "drafters") else [drafter]


def _fingerprint(value, depth=0):
    """What changes when an object is changed in place: a tensor's version counter, a container's members, a
    plain object's attributes (one level down)."""
    if isinstance(value, torch.Tensor):
        if value.is_inference():  # no version counter: its storage and contents
            return ("tensor", value.data_ptr(), tuple(value.shape), float(value.double().abs().sum()) if value.numel() else 0.0)
        return ("tensor", value._version)
    if isinstance(value, dict):
        return ("dict", tuple(map(id, value)), tuple(map(id, value.values())))
    if isinstance(value, (list, set, collections.deque)):
        return (type(value).__name__, tuple(map(id, value)))
    if hasattr(value, "__dict__") and depth == 0 and not isinstance(value, (torch.nn.Module, type)) and not callable(value):
        return ("object", tuple((k, _fingerprint(v, 1)) for k, v in vars(value).items()))
    return None


def _private(value) -> bool:
    """A value a session could change in place (so two sessions must not hold the same one)."""
    return _fingerprint(value) is not None and not isinstance(value, torch.nn.Module)


@pytest.mark.parametrize("kind", ["prompt-lookup", "medusa", "clover", "eagle", "ppd", "gad", "rest", "suffix", "iad", "draft-model",
                                  "rapid", "medusa+prompt-lookup"])
def test_sessions_copy_nothing_and_share_no_per_sequence_state(tiny, kind, tmp_path, monkeypatch):
    """``Drafter.open`` copies nothing (a deep copy fails the test), the drafter a session came from is left
    unchanged by the sessions' whole lives (only its ``shared_state`` may learn), and no two sessions running
    side by side hold the same per-sequence object."""
    import copy

    from specdec.batch import BatchEngine, Request
    from specdec.drafters.base import Target, build_drafter
    from specdec.drafters.fused import FusedDrafter
    from specdec.drafters.prompt_lookup import PromptLookupDrafter
    from specdec.verifiers import GreedyVerifier

    specs = drafter_specs(tiny, tmp_path)
    drafter = FusedDrafter([specs["medusa"](), PromptLookupDrafter()]) if kind == "medusa+prompt-lookup" else build_drafter(specs[kind]())
    drafter.bind(Target.of(tiny))
    before = [{k: (id(v), _fingerprint(v)) for k, v in vars(d).items()} for d in _leaves(drafter)]

    def no_deep_copy(*args, **kwargs):
        raise AssertionError("a drafter session deep-copied its drafter's state")

    monkeypatch.setattr(copy, "deepcopy", no_deep_copy)
    sessions = [drafter.open() for _ in range(3)]
    monkeypatch.undo()
    prompts = prompts_of_many_lengths(tiny.config.vocab_size)[1:]
    with BatchEngine(tiny, eos_ids=set()) as engine:
        for i, (p, s) in enumerate(zip(prompts, sessions)):
            engine.add(Request(p, s, GreedyVerifier(), 12, key=i))
        steps = 0
        while not engine.idle:
            engine.step()
            steps += 1
            if steps == 3:  # mid-run, every session has built its own state
                leaves = [_leaves(s) for s in sessions]
                for j, shared in enumerate(_leaves(drafter)):
                    for name, value in vars(leaves[0][j]).items():
                        held = [vars(ls[j]).get(name) for ls in leaves]
                        if value is vars(shared).get(name) or name in shared.shared_state or not _private(value):
                            continue
                        assert len({id(h) for h in held}) == len(held), f"{kind}: sessions share their {name!r}"
    after = [{k: (id(v), _fingerprint(v)) for k, v in vars(d).items()} for d in _leaves(drafter)]
    for d, b, a in zip(_leaves(drafter), before, after):
        changed = sorted(k for k in b if b[k] != a.get(k) and k not in d.shared_state)
        assert not changed, f"{kind}: sessions changed the drafter they came from: {changed}"


def test_cache_memory_never_written_stays_harmless():
    """Rows are read up to the longest row, so a short row's attention sees entries nobody wrote (masked).
    With torch filling uninitialised memory with NaN (deterministic mode), growing the cache and dropping a
    row must still give every row its own logits: masked entries have to be finite."""
    model = tiny_model("llama")
    prompts = ragged_prompts()
    prompts[1] = prompts[1].repeat(40)  # long enough to pass the cache's initial capacity
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.inference_mode(), BatchRunner(model) as runner:
            runner.prefill([p[:-1] for p in prompts])
            runner.keep([0, 2, 1])
            for _ in range(3):  # the long row passes the initial capacity: the buffers grow
                runner.forward([TokenTree.from_sequences(int(p[-1]), [[1, 2] * 40]) for p in (prompts[0], prompts[2], prompts[1])])
                runner.commit([torch.tensor([0])] * 3)  # keep each root only: the row grows by its last token
            nxt = runner.forward([TokenTree.root_only(8)] * 3).logits[:, 0]
    finally:
        torch.use_deterministic_algorithms(old)
    for b, p in enumerate((prompts[0], prompts[2], prompts[1])):
        with torch.inference_mode():  # the prompt, its last token committed twice more, then 8
            ref = model(torch.cat([p, p[-1:].repeat(2), torch.tensor([8])])[None]).logits[0, -1]
        torch.testing.assert_close(nxt[b], ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kinds", [("none", "prompt-lookup", "medusa", "ppd"), ("clover", "suffix", "gad", "rest")])
def test_requests_join_the_open_batch_at_any_step_with_their_own_drafter_and_limit(tiny, kinds, tmp_path):
    """BatchEngine: rows join while others run (not only when one leaves), each with its own drafter, length limit
    and verifier; every row's greedy output equals its prompt alone, and the engine empties."""
    from specdec.batch import BatchEngine, Request
    from specdec.drafters.base import Target, build_drafter
    from specdec.verifiers import GreedyVerifier

    specs = drafter_specs(tiny, tmp_path)
    prompts = prompts_of_many_lengths(tiny.config.vocab_size) * 2
    limits = [24, 9, 17, 30, 5, 21, 12, 26]
    alone = [specdec.generate(tiny, None, p, drafter=specs[kinds[i % len(kinds)]](), max_new_tokens=n, size_trees=False).token_ids
             for i, (p, n) in enumerate(zip(prompts, limits))]
    got = {i: [] for i in range(len(prompts))}
    reasons = {}
    joins = {0: [0, 1], 1: [2], 4: [3, 4], 5: [5], 9: [6, 7]}  # step -> requests that arrive before it
    with BatchEngine(tiny, eos_ids=set(), max_rows=5) as engine:
        step = 0
        while step <= max(joins) or not engine.idle:
            for i in joins.get(step, []):
                d = build_drafter(specs[kinds[i % len(kinds)]]())
                d.bind(Target.of(tiny))
                engine.add(Request(prompts[i], d, GreedyVerifier(), limits[i], key=i))
            for key, event in engine.step():
                got[key] += event.new_tokens
                if event.finish_reason:
                    reasons[key] = event.finish_reason
            step += 1
            assert len(engine.rows) <= 5
    assert [got[i] for i in range(len(prompts))] == alone
    assert reasons == {i: "length" for i in range(len(prompts))}


def test_a_cancelled_request_leaves_and_the_others_go_on(tiny):
    from specdec.batch import BatchEngine, Request
    from specdec.drafters.base import Target, build_drafter
    from specdec.verifiers import GreedyVerifier

    prompts = prompts_of_many_lengths(tiny.config.vocab_size)
    alone = [specdec.generate(tiny, None, p, drafter="prompt-lookup", max_new_tokens=20).token_ids for p in prompts]
    reqs = []
    for i, p in enumerate(prompts):
        d = build_drafter("prompt-lookup")
        d.bind(Target.of(tiny))
        reqs.append(Request(p, d, GreedyVerifier(), 20, key=i))
    got, reasons = {i: [] for i in range(len(prompts))}, {}
    with BatchEngine(tiny, eos_ids=set()) as engine:
        for r in reqs:
            engine.add(r)
        steps = 0
        while not engine.idle:
            for key, event in engine.step():
                got[key] += event.new_tokens
                reasons[key] = event.finish_reason or reasons.get(key)
            steps += 1
            if steps == 3:
                reqs[1].cancelled = True
    assert reasons[1] == "cancelled" and len(got[1]) < 20
    assert [got[i] for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]


def test_ppd_prompt_tokens_work_in_a_batch(tiny, tmp_path):
    """PPD's auxiliary nodes take their trained embeddings in a batched forward too: each row drafts and accepts
    step by step exactly as it does alone (with the embeddings ignored, the drafts, and so the steps, differ)."""
    from test_ppd import random_tokens

    from specdec.drafters.ppd import PPDDrafter

    tokens = random_tokens(tiny)
    prompts = prompts_of_many_lengths(tiny.config.vocab_size)
    alone = [specdec.generate(tiny, None, p, drafter=PPDDrafter(tokens), max_new_tokens=24, size_trees=False) for p in prompts]
    together = specdec.generate(tiny, None, prompts, drafter=PPDDrafter(tokens), max_new_tokens=24, size_trees=False)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.stats.tokens_per_step for r in together] == [r.stats.tokens_per_step for r in alone]
    assert sum(r.stats.drafted_tokens for r in alone) > 0


@pytest.mark.parametrize("scored", [True, False])
def test_max_tree_nodes_caps_every_tree(scored):
    """A cap, not a hint: scored trees keep their best drafts, unscored ones their first nodes; both stay trees."""
    from specdec.sizing import cap

    parents = [-1, 0, 0, 1, 1, 2, 3, 6, 6, 0]
    scores = torch.tensor([1.0, 0.9, 0.2, 0.8, 0.1, 0.15, 0.7, 0.6, 0.05, 0.3]) if scored else None
    tree = TokenTree(torch.arange(10), torch.tensor(parents), scores=scores)
    capped = cap(tree, 5)
    assert len(capped) == 5 and int(capped.parents[0]) == -1
    kept = capped.tokens.tolist()
    assert kept == ([0, 1, 3, 6, 7] if scored else [0, 1, 2, 3, 4])
    assert cap(tree, 64) is tree


def test_generation_never_verifies_more_than_max_tree_nodes(tiny):
    """An unscored drafter's oversized tree is cut to max_tree_nodes in the single and the batched loop."""
    from specdec.drafters.base import Drafter

    sizes = []

    class Wide(Drafter):
        name = "wide"

        def propose(self, state):
            root = state.root
            return TokenTree(torch.tensor([root] + list(range(20))), torch.tensor([-1] + [0] * 20))

        def observe(self, result):
            sizes.append(len(result.tree))

    ids = torch.tensor([3, 4, 5])
    one = specdec.generate(tiny, None, ids, drafter=Wide(), max_new_tokens=6, max_tree_nodes=7, size_trees=False)
    assert sizes and max(sizes) == 7
    sizes.clear()
    two = specdec.generate(tiny, None, [ids, ids[:2]], drafter=Wide(), max_new_tokens=6, max_tree_nodes=7, size_trees=False)
    assert sizes and max(sizes) == 7
    assert two[0].token_ids == one.token_ids == specdec.generate(tiny, None, ids, drafter="none", max_new_tokens=6).token_ids


@pytest.mark.parametrize("kind,fuse", [("prompt-lookup", True), ("medusa", True), ("clover", True), ("ppd", True), ("eagle/prompt-lookup", True),
                                       ("prompt-lookup/eagle", True), ("clover", False), ("ppd", False)])
def test_chunked_prefill_never_stalls_running_rows_and_changes_no_output(tiny, kind, fuse, tmp_path):
    """A long prompt joins while rows decode: it is prefilled 7 tokens a step, the running rows emit tokens at
    every one of those steps, and every output (the long one's too, and its drafter's hidden states) equals
    its prompt alone. Fused (the default), each chunk rides in the rows' decode forward: one model forward per
    step. ``a/b``: the running rows draft with ``a``, the long prompt with ``b`` (other hidden layers)."""
    from specdec.batch import BatchEngine, Request
    from specdec.drafters.base import Target, build_drafter
    from specdec.verifiers import GreedyVerifier

    specs = drafter_specs(tiny, tmp_path)
    kinds = kind.split("/") if "/" in kind else [kind, kind]
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, tiny.config.vocab_size, (n,), generator=g) for n in (4, 6, 60)]
    make = [specs[kinds[0]], specs[kinds[0]], specs[kinds[1]]]
    alone = [specdec.generate(tiny, None, p, drafter=m(), max_new_tokens=30, size_trees=False).token_ids for p, m in zip(prompts, make)]
    got = {i: [] for i in range(3)}
    log = []
    forwards = []
    handle = tiny.register_forward_hook(lambda *a: forwards.append(1))
    try:
        with BatchEngine(tiny, eos_ids=set(), prefill_chunk=7, fuse_prefill=fuse) as engine:
            for step in range(200):
                if step in (0, 2):
                    for i in ((0, 1) if step == 0 else (2,)):
                        d = build_drafter(make[i]())
                        d.bind(Target.of(tiny))
                        engine.add(Request(prompts[i], d, GreedyVerifier(), 30, key=i))
                forwards.clear()
                events = engine.step()
                log.append(({k for k, e in events if e.new_tokens}, [pf.done for pf in engine.prefilling], len(forwards)))
                for key, event in events:
                    got[key] += event.new_tokens
                if engine.idle and step > 2:
                    break
    finally:
        handle.remove()
    assert [got[i] for i in range(3)] == alone
    chunked = [(emitters, calls) for emitters, pending, calls in log if pending]
    assert len(chunked) >= 60 // 7 - 1  # the long prompt took several steps
    assert all({0, 1} & emitters for emitters, _ in chunked)  # and the running rows emitted in each of them
    assert all(calls == (1 if fuse else 2) for _, calls in chunked), [c for _, c in chunked]  # target forwards per step


def test_a_fused_chunk_keeps_every_row_on_the_kernels_row_table(tiny):
    """With fast kernels routed, a fused forward holds at most max(ROW_BUCKETS) rows (past it F.linear would compute
    the decode rows, not the kernel their plain steps use): a 100-token chunk budget is cut to the room left beside
    the trees, still fused (one forward a step), and every output equals its prompt alone."""
    from specdec.batch import BatchEngine, Request
    from specdec.drafters.base import Target, build_drafter
    from specdec.kernels import ROW_BUCKETS, FastLinears, LinearPlan
    from specdec.verifiers import GreedyVerifier

    fast = FastLinears(tiny, LinearPlan({b: "wxt" for b in ROW_BUCKETS}))  # float64: each route runs F.linear itself
    assert fast.routed
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, tiny.config.vocab_size, (n,), generator=g) for n in (4, 6, 150)]
    alone = [specdec.generate(tiny, None, p, drafter="prompt-lookup:adaptive=false", max_new_tokens=24, size_trees=False).token_ids
             for p in prompts]
    rows, forwards = [], []
    hooks = [tiny.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: rows.append(a[0].numel() // a[0].shape[-1])),
             tiny.register_forward_hook(lambda *a: forwards.append(1))]
    got = {i: [] for i in range(3)}
    log = []
    try:
        with BatchEngine(tiny, eos_ids=set(), prefill_chunk=100, fast=fast) as engine:
            for step in range(200):
                if step in (0, 2):
                    for i in ((0, 1) if step == 0 else (2,)):
                        d = build_drafter("prompt-lookup:adaptive=false")
                        d.bind(Target.of(tiny))
                        engine.add(Request(prompts[i], d, GreedyVerifier(), 24, key=i))
                rows.clear()
                forwards.clear()
                prefilling = step == 2 or bool(engine.prefilling)
                for key, event in engine.step():
                    got[key] += event.new_tokens
                log.append((prefilling, max(rows), len(forwards)))
                if engine.idle and step > 2:
                    break
    finally:
        for h in hooks:
            h.remove()
    assert [got[i] for i in range(3)] == alone
    chunked = [(r, f) for p, r, f in log if p]
    assert len(chunked) >= 3 and all(r <= max(ROW_BUCKETS) for r, _ in chunked), chunked
    assert sum(f == 1 for _, f in chunked) >= 2  # fused: the chunk rode in the decode forward


def test_chunk_size_follows_the_cost():
    from specdec.batch import BatchEngine

    model = tiny_model("llama")
    flat = BatchEngine(model, eos_ids=set(), cost=lambda n: max(1.0, n / 256), prefill_chunk=None)  # a step's cost up to 256 rows
    steep = BatchEngine(model, eos_ids=set(), cost=lambda n: max(1.0, n / 16), prefill_chunk=None)
    for e in (flat, steep):
        e._last_forward = (16, 4)
    assert flat.chunk_tokens() == 256 and steep.chunk_tokens() == 64
    assert BatchEngine(model, eos_ids=set(), prefill_chunk=0).chunk_tokens() is None
    with pytest.raises(ValueError, match="prefill_chunk"):
        BatchEngine(model, eos_ids=set(), prefill_chunk=-1)


def test_a_batch_stops_drafting_while_no_tree_pays_and_looks_again(tiny):
    """With stateless drafters and a cost under which no draft pays, the batch proposes for 4 steps, then only
    every 16th step; outputs stay those of plain decoding. A stateful drafter is never gated, and neither is a
    stateless one that proposes nothing (an empty proposal says nothing about what trees cost: prompt lookup
    without a match must keep looking)."""
    from specdec.batch import BatchEngine, Request
    from specdec.drafters.base import Drafter
    from specdec.verifiers import GreedyVerifier

    calls = []

    class Counting(Drafter):
        name = "counting"
        stateless = True

        def propose(self, state):
            calls.append(state.token_ids.numel())
            return TokenTree.from_sequences(state.root, [[1, 2]], scores=[[0.5, 0.25]])

    class Stateful(Counting):
        stateless = False

    class Silent(Counting):
        def propose(self, state):
            calls.append(state.token_ids.numel())
            return TokenTree.root_only(state.root)

    prompts = [torch.tensor([5, 6, 7, 5, 6, 7, 5, 6]), torch.tensor([9, 3, 9, 3, 9])]
    alone = [specdec.generate(tiny, None, p, drafter="none", max_new_tokens=60).token_ids for p in prompts]
    steps = 59  # decode steps of a 60-token answer (the prefill gives the first)
    gated = 2 * (4 + len([s for s in range(5, steps + 1) if s % 16 == 0]))
    for kind, expected in ((Counting, gated), (Stateful, 2 * steps), (Silent, 2 * steps)):
        calls.clear()
        with BatchEngine(tiny, eos_ids=set(), cost=lambda n: float(n), batch_cost=lambda b, n: float(b * n)) as engine:
            got = _answers(engine, [Request(p, kind(), GreedyVerifier(), 60, key=i) for i, p in enumerate(prompts)])
        assert got == alone, kind.__name__
        assert len(calls) == expected, kind.__name__


@pytest.mark.parametrize("tree_s, expect_trees", [(3.0, False), (1.0, True)])
def test_a_batch_drops_trees_whose_measured_yield_is_below_plain_steps(tiny, tree_s, expect_trees):
    """The cost model keeps every tree (a flat cost) of a drafter whose drafts are never right; the step clock says
    a tree step takes ``tree_s`` against 1.0 for a plain one. Slower trees: after 8 tree steps and one plain step
    to compare with, the batch verifies roots only, bar a probe every 16th step. As fast: trees go on. Outputs
    stay those of plain decoding either way."""
    from specdec.batch import BatchEngine, Request
    from specdec.drafters.base import Drafter
    from specdec.verifiers import GreedyVerifier

    class Wrong(Drafter):  # confident and wrong: token 0 never follows here
        name = "wrong"

        def propose(self, state):
            return TokenTree.from_sequences(state.root, [[0, 0, 0]], scores=[[0.9, 0.8, 0.7]])

    prompts = [torch.tensor([5, 6, 7, 8]), torch.tensor([9, 3, 1])]
    alone = [specdec.generate(tiny, None, p, drafter="none", max_new_tokens=50).token_ids for p in prompts]
    assert all(0 not in a for a in alone)
    fake = {"t": 0.0, "tree_steps": 0, "steps": 0}
    with BatchEngine(tiny, eos_ids=set(), cost=lambda n: 1.0, batch_cost=lambda b, n: 1.0) as engine:
        engine.clock = lambda: fake["t"]
        forward = engine.runner.forward

        def timed_forward(trees, **kw):
            with_trees = max(len(t) for t in trees) > 1
            fake["t"] += tree_s if with_trees else 1.0
            fake["tree_steps"] += with_trees
            fake["steps"] += 1
            return forward(trees, **kw)

        engine.runner.forward = timed_forward
        got = _answers(engine, [Request(p, Wrong(), GreedyVerifier(), 50, key=i) for i, p in enumerate(prompts)])
    assert got == alone
    steps = fake["steps"]
    if expect_trees:
        assert fake["tree_steps"] == steps - 1  # one plain step, to compare with
    else:
        assert 8 <= fake["tree_steps"] <= 8 + steps // 16 + 1


def _answers(engine, requests) -> list[list[int]]:
    """Queue ``requests`` (keys 0..n-1) on ``engine``, step it until idle, and return each one's tokens in key order."""
    got = {r.key: [] for r in requests}
    for r in requests:
        engine.add(r)
    while not engine.idle:
        for key, event in engine.step():
            got[key] += event.new_tokens
    return [got[r.key] for r in requests]


class _CostlySkippable(RandomDrafter):
    """A drafter whose drafting is slow and never accepted, reading hidden states: it checks that every propose's
    hidden states start where the last ones ended (the engine keeps the positions of steps it skipped)."""

    name = "costly"
    needs_hidden_states = True
    skippable = True

    def __init__(self, vocab: int) -> None:
        super().__init__(vocab, seed=1)
        self.log: list[tuple[int, int]] = []  # (hidden_start, rows) of each propose

    def propose(self, state):
        if self.log:
            start, rows = self.log[-1]
            assert state.hidden_start == start + rows, (state.hidden_start, self.log[-3:])
        self.log.append((state.hidden_start, state.hidden_states.shape[0]))
        time.sleep(0.004)
        return super().propose(state)


def test_drafting_that_does_not_pay_is_skipped_and_the_drafter_catches_up(tiny):
    """A skippable drafter whose drafted steps yield fewer tokens per second than plain ones (drafting included)
    stops being asked, except every few steps; when asked again its hidden states cover every position since its
    last propose; the output equals plain decoding."""
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 96, (12,), generator=g)
    plain = specdec.generate(tiny, None, ids, drafter="none", max_new_tokens=96)
    drafter = _CostlySkippable(96)
    out = specdec.generate(tiny, None, ids, drafter=drafter, max_new_tokens=96)
    assert out.token_ids == plain.token_ids
    steps = out.stats.target_forwards
    assert steps >= 90 and len(drafter.log) < steps // 2, (len(drafter.log), steps)
    assert drafter.log[0][0] == 0 and len(drafter.log) > 2  # asked from the prompt on, and again after skipped steps


def test_a_fusions_stateless_member_drafts_while_its_costly_member_is_skipped(tiny):
    """In ``costly+prompt-lookup`` the engine skips the costly member while its drafting does not pay, but prompt
    lookup (stateless, nearly free) keeps drafting on those steps; the output equals plain decoding."""
    from specdec.drafters.fused import FusedDrafter
    from specdec.drafters.prompt_lookup import PromptLookupDrafter

    class Counted(PromptLookupDrafter):
        calls = 0

        def propose(self, state):
            Counted.calls += 1
            return super().propose(state)

    ids = torch.tensor([5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7])
    plain = specdec.generate(tiny, None, ids, drafter="none", max_new_tokens=96)
    costly = _CostlySkippable(96)
    out = specdec.generate(tiny, None, ids, drafter=FusedDrafter([costly, Counted()]), max_new_tokens=96)
    assert out.token_ids == plain.token_ids
    steps = out.stats.target_forwards
    assert len(costly.log) < steps // 2  # the costly member was skipped most of the time
    assert Counted.calls >= steps - 1  # prompt lookup drafted on (nearly) every step, skipped ones included
    lookup_only = specdec.generate(tiny, None, ids, drafter="prompt-lookup", max_new_tokens=96)
    accepted = sum(n > 1 for n in out.stats.tokens_per_step)  # the costly member's drafts are never accepted
    assert accepted >= 0.5 * sum(n > 1 for n in lookup_only.stats.tokens_per_step)


def test_probes_of_trees_that_keep_losing_grow_apart_and_reset_once_trees_pay():
    from specdec.batch import _GATE_PROBE, _PROBE_MAX, _Paid

    paid = _Paid()
    paid.record(False, 1, 1, 0.01)  # a plain step: 100 tokens/s
    for _ in range(8):
        paid.record(True, 1, 1, 0.02)  # tree steps: 50 tokens/s
    assert not paid.trees_pay()
    probes = [step for step in range(400) if not paid.skips(step)]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert probes[0] == _GATE_PROBE and gaps[:3] == [2 * _GATE_PROBE, 4 * _GATE_PROBE, _PROBE_MAX]
    assert set(gaps[2:]) == {_PROBE_MAX}
    for _ in range(30):
        paid.record(True, 4, 1, 0.02)  # trees now return 200 tokens/s
    assert paid.trees_pay() and not paid.skips(401)
    paid.record(True, 1, 1, 0.1)
    for _ in range(30):
        paid.record(True, 1, 1, 0.1)  # losing again: probes start from the short gap
    assert [s for s in range(402, 450) if not paid.skips(s)][:1] == [402 + _GATE_PROBE]
