"""End-to-end checks on the embedded default model (SmolLM2-135M-Instruct).

Lossless means: every drafter's greedy output equals specdec's own plain
decoding token for token (same forward, no drafts). Against HF ``generate``,
the fast kernels sum in another order, so an output may differ, but only
where the model itself could not decide: HF's own top-1 / top-2 logit margin
at the first difference is a near-tie.
"""

import pytest
import torch

import specdec
from conftest import hf_greedy
from specdec.engine import prepare_input_ids

pytestmark = pytest.mark.default_model

CHAT = [
    "What is the capital of France? Answer in one sentence.",
    "Give me three tips for staying focused while studying.",
    "Correct the grammar: 'She don't like apples and he go to school by bus every days.'",
]

COPY_HEAVY = (
    "Fix the spelling mistakes in this paragraph and return the corrected paragraph:\n\n"
    "The quick brown fox jumpd over the lazy dog. Then the dog woke up and chasd the fox accross the field, "
    "but the fox was to fast and escaped into the forrest."
)
NEAR_TIE = 1e-3  # fp32 summation-order noise in the logits is ~1e-5


def assert_near_tie_if_different(model, ids, ours, ref):
    if ours == ref:
        return
    pos = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    with torch.inference_mode():
        logits = model(torch.cat([ids, torch.tensor(ref[:pos])])[None]).logits[0, -1]
    top = torch.topk(logits, 2).values
    assert float(top[0] - top[1]) < NEAR_TIE, f"differs from HF greedy at {pos} with margin {float(top[0] - top[1])}"


@pytest.mark.parametrize("question", CHAT)
def test_every_drafter_equals_plain_decoding_and_hf_up_to_near_ties(default_model, question):
    model, tok = default_model
    msgs = [{"role": "user", "content": question}]
    ids = prepare_input_ids(tok, msgs)
    plain = specdec.generate(model, tok, msgs, drafter="none", max_new_tokens=48).token_ids
    assert_near_tie_if_different(model, ids, plain, hf_greedy(model, ids, 48))
    for drafter in ("prompt-lookup", "medusa", "medusa+prompt-lookup", "clover", "clover+prompt-lookup", "ppd", "ppd+medusa"):
        out = specdec.generate(model, tok, msgs, drafter=drafter, max_new_tokens=48)
        assert out.token_ids == plain, drafter
        assert out.text == tok.decode(plain, skip_special_tokens=True)


def test_the_reference_path_equals_hf_greedy(default_model):
    """fast=False: the model's own kernels and attention (a 4-D mask), token for token HF greedy."""
    model, tok = default_model
    msgs = [{"role": "user", "content": CHAT[1]}]
    ref = hf_greedy(model, prepare_input_ids(tok, msgs), 40)
    for drafter in ("none", "prompt-lookup"):
        assert specdec.generate(model, tok, msgs, drafter=drafter, max_new_tokens=40, fast=False).token_ids == ref


def test_prompt_lookup_accepts_long_runs_on_copy_heavy_prompts(default_model):
    model, tok = default_model
    msgs = [{"role": "user", "content": COPY_HEAVY}]
    out = specdec.generate(model, tok, msgs, drafter="prompt-lookup", max_new_tokens=64)
    assert out.token_ids == specdec.generate(model, tok, msgs, drafter="none", max_new_tokens=64).token_ids
    assert out.stats.mean_accepted_length > 1.5, out.stats.as_dict()


def test_shipped_medusa_heads_accept_tokens(default_model):
    """The heads themselves, with their whole candidate tree: how much of it the engine keeps depends on this
    machine's measured cost curve (a host with a steep curve keeps one draft or none), not on the heads."""
    model, tok = default_model
    msgs = [{"role": "user", "content": "Explain what a hash table is in two sentences."}]
    plain = specdec.generate(model, tok, msgs, drafter="none", max_new_tokens=48).token_ids
    for drafter in ("medusa", "medusa+prompt-lookup"):
        out = specdec.generate(model, tok, msgs, drafter=drafter, max_new_tokens=48, size_trees=False)
        assert out.token_ids == plain, drafter
        assert out.stats.mean_accepted_length > 1.2, out.stats.as_dict()


def whole_tree_tau(model, tok, drafters, max_new_tokens=48) -> dict:
    """Each drafter's new tokens per target forward at its whole candidate tree (sizing off), over two prompts,
    checking every output against plain decoding."""
    prompts = [[{"role": "user", "content": q}] for q in ("Explain what a hash table is in two sentences.", CHAT[1])]
    plain = [specdec.generate(model, tok, m, drafter="none", max_new_tokens=max_new_tokens).token_ids for m in prompts]
    tau = {}
    for drafter in drafters:
        steps = tokens = 0
        for msgs, ref in zip(prompts, plain):
            out = specdec.generate(model, tok, msgs, drafter=drafter, max_new_tokens=max_new_tokens, size_trees=False)
            assert out.token_ids == ref, drafter
            steps, tokens = steps + out.stats.target_forwards, tokens + out.stats.new_tokens
        tau[drafter] = tokens / steps
    return tau


def test_shipped_clover_heads_draft_further_than_medusa_and_ppd_tokens_accept(default_model):
    """Shipped drafters at their whole candidate trees (sizing off, as for Medusa above): Clover's regressive heads
    get more tokens per step than Medusa's independent heads on the same prompts, and PPD's prompt tokens draft
    tokens that are accepted; every output equals plain decoding."""
    tau = whole_tree_tau(*default_model, ("medusa", "clover", "ppd", "ppd+prompt-lookup"))
    assert tau["clover"] > 1.1 * tau["medusa"], tau
    assert tau["ppd"] > 1.1 and tau["ppd+prompt-lookup"] > 1.1, tau


def test_bf16_speculation_differs_from_bf16_plain_decoding_only_at_near_ties(default_model):
    """With specdec's row-invariant bf16 linear kernel and attention (AVX-512 and a compiler), bf16 speculation
    equals plain decoding exactly. Without them, bfloat16 rounds every activation to 8 bits, so a tree forward's
    logits differ from a plain step's by up to ~0.5; speculation may then change a token only where the bf16
    model's own top-2 margin is within that noise."""
    model32, tok = default_model
    import copy

    model = copy.deepcopy(model32).to(torch.bfloat16)
    msgs = [{"role": "user", "content": COPY_HEAVY}]
    ids = prepare_input_ids(tok, msgs)
    plain = specdec.generate(model, tok, msgs, drafter="none", max_new_tokens=40, dtype="bfloat16").token_ids
    out = specdec.generate(model, tok, msgs, drafter="prompt-lookup", max_new_tokens=40, dtype="bfloat16").token_ids
    from specdec import native

    if native.rows_half_lib() is not None and native.attention_lib() is not None:  # row-invariant kernels: exact
        assert out == plain
    elif out != plain:
        pos = next(i for i, (a, b) in enumerate(zip(out, plain)) if a != b)
        with torch.inference_mode():
            top = torch.topk(model(torch.tensor([ids.tolist() + plain[:pos]])).logits[0, -1].float(), 2).values
        assert float(top[0] - top[1]) < 1.0, f"bf16 outputs part at {pos} with margin {float(top[0] - top[1])}"
    with pytest.raises(ValueError, match="never converts"):
        specdec.generate(model32, tok, msgs, drafter="none", max_new_tokens=4, dtype="bfloat16")


def test_retrieval_and_copy_drafters_equal_plain_decoding(default_model):
    """REST over a datastore of the model's own earlier answers, the suffix drafter across two passes, and IAD on a
    rewriting prompt: every output equals plain decoding, and each drafter gets tokens accepted."""
    from specdec.datastore import Datastore
    from specdec.drafters.rest import RestDrafter
    from specdec.drafters.suffix import SuffixDrafter

    model, tok = default_model
    msgs = [[{"role": "user", "content": q}] for q in CHAT[:2]]
    plain = [specdec.generate(model, tok, m, drafter="none", max_new_tokens=40).token_ids for m in msgs]
    store = Datastore.from_documents(plain, vocab_size=len(tok))
    for m, ref in zip(msgs, plain):
        out = specdec.generate(model, tok, m, drafter=RestDrafter(store), max_new_tokens=40)
        assert out.token_ids == ref
        assert out.stats.mean_accepted_length > 2.0, out.stats.as_dict()  # the answers themselves are in the store
    suffix = SuffixDrafter()
    for _ in range(2):
        runs = [specdec.generate(model, tok, m, drafter=suffix, max_new_tokens=40) for m in msgs]
        assert [r.token_ids for r in runs] == plain
    assert min(r.stats.mean_accepted_length for r in runs) > 2.0  # the second pass drafts from the first
    rewrite = [{"role": "user", "content": COPY_HEAVY}]
    ref = specdec.generate(model, tok, rewrite, drafter="none", max_new_tokens=48).token_ids
    for drafter in ("iad", "iad+prompt-lookup"):
        out = specdec.generate(model, tok, rewrite, drafter=drafter, max_new_tokens=48)
        assert out.token_ids == ref, drafter
        assert out.stats.mean_accepted_length > 1.5, (drafter, out.stats.as_dict())


def test_shipped_eagle_drafter_accepts_tokens_and_equals_plain_decoding(default_model):
    """The shipped EAGLE drafter (trained on the self-distilled data) at its whole dynamic tree, alone and fused
    with prompt lookup: every output equals plain decoding, and it gets more than one token per target forward."""
    tau = whole_tree_tau(*default_model, ("eagle", "eagle+prompt-lookup"))
    assert min(tau.values()) > 1.2, tau


def test_an_eagle_drafter_reading_three_layers_equals_plain_decoding(default_model):
    """An EAGLE drafter (random weights, so its drafts are mostly wrong) on the default model's layers 2, 15 and
    27, alone and fused with Clover (which reads the last layer: each gets its own slice)."""
    from test_eagle import random_eagle

    from specdec.drafters.clover import CloverDrafter
    from specdec.drafters.eagle import EagleDrafter
    from specdec.drafters.fused import FusedDrafter

    model, tok = default_model
    eagle = EagleDrafter(random_eagle(model, layers=(2, 15, 27), draft=4096))
    msgs = [{"role": "user", "content": CHAT[1]}]
    plain = specdec.generate(model, tok, msgs, drafter="none", max_new_tokens=40).token_ids
    for drafter in (eagle, FusedDrafter([CloverDrafter.from_spec([], {}), eagle])):
        out = specdec.generate(model, tok, msgs, drafter=drafter, max_new_tokens=40, size_trees=False)
        assert out.token_ids == plain and out.stats.drafted_tokens > 0


def test_rapid_on_a_long_prompt_equals_plain_decoding_and_retrieves_the_answer(default_model):
    """RAPID with the target's own weights over a shortened ~1.4K-token prompt of notes: its context holds the
    note the question asks about, its output equals plain decoding, and its drafts are accepted. (Sized by this
    CPU's costs, self-drafting rarely pays: a draft token costs about a target step at these lengths.)"""
    from test_rapid import _documents

    from specdec.drafters.rapid import RapidConfig, RapidDrafter

    model, tok = default_model
    names, notes = _documents(tok, 7)
    notes = [f"Note {i + 1}. {n} " + "This note was filed with the others in the town archive last spring." * 2
             for i, n in enumerate(notes * 2)]
    msgs = [{"role": "user", "content": "Notes:\n\n" + "\n\n".join(notes) + f"\n\nWhat is {names[7]}'s secret passphrase? "
             "Answer with the passphrase only."}]
    ids = prepare_input_ids(tok, msgs)
    assert ids.numel() > 700
    plain = specdec.generate(model, tok, msgs, drafter="none", max_new_tokens=24).token_ids
    d = RapidDrafter(None, config=RapidConfig(chunk=96, top_chunks=2, head=16, tail=64, period=8))
    out = specdec.generate(model, tok, msgs, drafter=d, max_new_tokens=24, size_trees=False)  # (untrimmed: it drafts)
    assert out.token_ids == plain
    assert "marmalade-quartz-seventeen" in tok.decode(d.short_context()) and len(d.short_context()) < ids.numel() / 2
    assert out.stats.mean_accepted_length > 1.5, out.stats.as_dict()
    # a draft token's measured cost leaves out the draft cache's one-off prefill of the short context
    assert d._draft_ms < out.stats.prefill_time_s * 1e3 / 4, (d._draft_ms, out.stats.prefill_time_s)


def test_gguf_linear_weights_stay_on_disk_and_the_lean_forward_runs(default_model):
    """The default model (a GGUF) multiplies its quantized blocks; its fp32 linear weights are pages of the
    converted file (mapped, read only where something reads them), not memory of the process's own; where the
    native kernels exist, the engine's decode forward is the lean one."""
    import re
    from pathlib import Path

    from specdec.quant import quant_of

    model, _ = default_model
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps on this system")
    ranges = []
    for line in maps.read_text().splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s+(\S+)", line)
        if m and m.group(3).endswith("model.safetensors"):
            ranges.append((int(m.group(1), 16), int(m.group(2), 16)))
    linears = [mod for mod in model.modules() if isinstance(mod, torch.nn.Linear)]
    blocked = [mod for mod in linears if quant_of(mod.weight) is not None]
    if not blocked:
        pytest.skip("no quantized blocks kept on this machine (no quantized kernel)")
    for mod in linears:
        ptr = mod.weight.data_ptr()
        assert any(lo <= ptr < hi for lo, hi in ranges), "a linear weight is not a mapped page of the model file"
    from specdec.profile import fast_linears_for, get_profile

    fast = fast_linears_for(model, get_profile(model, fast=True, progress=False))
    if fast.plan.for_rows(1) == "gguf-avx512":
        from specdec.lean import lean_unavailable_reason

        assert fast.lean is not None and fast.lean.serves(1), lean_unavailable_reason()
