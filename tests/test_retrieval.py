"""Retrieval drafters: the suffix-array datastore, REST, the suffix drafter; queries against brute force."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specdec
from conftest import hf_greedy
from specdec.datastore import Datastore, build_datastore
from specdec.drafters.base import DraftState, StepResult
from specdec.drafters.rest import RestConfig, RestDrafter
from specdec.drafters.suffix import SuffixConfig, SuffixDrafter
from specdec.drafters.trie import count_prefixes, scored_tree
from specdec.sizing import AcceptanceRates


def occurrences(tokens, pattern):
    m = len(pattern)
    return [i for i in range(len(tokens) - m + 1) if list(tokens[i : i + m]) == list(pattern)]


docs_strategy = st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=30), min_size=1, max_size=6)


@settings(max_examples=80, deadline=None)
@given(docs_strategy, st.lists(st.integers(0, 4), min_size=1, max_size=4))
def test_find_returns_exactly_the_suffixes_starting_with_the_pattern(docs, pattern):
    ds = Datastore.from_documents(docs, vocab_size=5)
    lo, hi = ds.find(np.array(pattern, dtype=ds.tokens.dtype))
    starts = sorted(int(ds.suffix_array[r]) for r in range(lo, hi))
    assert starts == occurrences(ds.tokens.tolist(), pattern)


@settings(max_examples=80, deadline=None)
@given(docs_strategy, st.lists(st.integers(0, 4), min_size=1, max_size=12), st.integers(1, 3))
def test_longest_match_is_the_longest_context_suffix_in_the_corpus(docs, context, min_span):
    ds = Datastore.from_documents(docs, vocab_size=5)
    span, lo, hi = ds.longest_match(np.array(context), max_span=8, min_span=min_span)
    brute = max((m for m in range(1, min(8, len(context)) + 1) if occurrences(ds.tokens.tolist(), context[-m:])), default=0)
    assert span == (brute if brute >= min_span else 0)
    if span:
        assert hi - lo == len(occurrences(ds.tokens.tolist(), context[-span:]))


def test_continuations_stop_at_document_ends():
    ds = Datastore.from_documents([[1, 2, 3, 4], [1, 2, 9]], vocab_size=10)
    span, lo, hi = ds.longest_match(np.array([7, 1, 2]), max_span=4)
    assert span == 2
    assert sorted(ds.continuations(span, lo, hi, k=8, length=5)) == [[3, 4], [9]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=5), min_size=1, max_size=8), st.integers(2, 12))
def test_scored_tree_keeps_the_most_frequent_prefixes(conts, max_nodes):
    counts = count_prefixes(conts)
    for prefix, n in counts.items():  # counting against brute force
        assert n == sum(1 for c in conts if tuple(c[: len(prefix)]) == prefix)
    rates = AcceptanceRates(prior=lambda key: 0.5)
    tree, keys = scored_tree(99, counts, len(conts), rates, ("s",), max_nodes)
    kept = set(tree.token_paths[1:])
    assert len(kept) <= max_nodes - 1 and kept == set(keys)
    if kept:  # nothing left out is more frequent than something kept
        assert min(counts[p] for p in kept) >= max((n for p, n in counts.items() if p not in kept), default=0)
    for i, p in enumerate(tree.token_paths[1:], start=1):
        assert tree.scores[i] == pytest.approx(0.5 ** len(p))


def test_the_worked_example_of_the_trie_module():
    counts = count_prefixes([[1, 2, 3], [1, 2, 4], [1, 5]])
    assert counts == {(1,): 3, (1, 2): 2, (1, 2, 3): 1, (1, 2, 4): 1, (1, 5): 1}


# --------------------------------------------------------------------------- building
class SlowTokenizer:
    """Wraps a tokenizer and sleeps per document, so a build can be killed mid-way."""

    def __init__(self, tok, delay):
        self.tok, self.delay = tok, delay

    def __call__(self, text, **kw):
        time.sleep(self.delay)
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __len__(self):
        return len(self.tok)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus")
    for i in range(60):
        (path / f"doc{i:03d}.txt").write_text(f"The cat number {i} sat on the mat. The cat number {i} sat on the mat again.")
    return path


def test_build_load_round_trip_and_the_tokenizer_check(corpus, tmp_path, default_tokenizer):
    manifest = build_datastore(default_tokenizer, str(corpus), tmp_path / "ds", progress=False)
    ds = Datastore.load(tmp_path / "ds", default_tokenizer)
    assert manifest["documents"] == 60 and ds.tokens.shape[0] == manifest["tokens"] and ds.tokens.dtype == np.uint16
    assert isinstance(ds.tokens, np.memmap) and isinstance(ds.suffix_array, np.memmap)
    ids = default_tokenizer(" cat number 7 sat on", add_special_tokens=False)["input_ids"]
    span, lo, hi = ds.longest_match(np.array(ids), max_span=16)
    assert span == len(ids) and hi - lo == 2  # twice in document 7
    with pytest.raises(FileExistsError, match="--force"):
        build_datastore(default_tokenizer, str(corpus), tmp_path / "ds", progress=False)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    manifest["tokenizer"] = "someone-else"
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="another tokenizer"):
        Datastore.load(tmp_path / "ds", default_tokenizer)


def test_an_interrupted_build_leaves_nothing_that_loads(corpus, tmp_path, default_tokenizer):
    with pytest.raises(KeyboardInterrupt):
        build_datastore(_Interrupting(default_tokenizer, after=20), str(corpus), tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.tmp-*"))


class _Interrupting(SlowTokenizer):
    def __init__(self, tok, after):
        super().__init__(tok, 0.0)
        self.left = after

    def __call__(self, text, **kw):
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return self.tok(text, **kw)


def test_a_killed_build_process_leaves_no_datastore(corpus, tmp_path, default_tokenizer):
    default_tokenizer.save_pretrained(tmp_path / "tok")
    script = (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from transformers import AutoTokenizer\n"
        "from test_retrieval import SlowTokenizer\n"
        "from specdec.datastore import build_datastore\n"
        "tok = SlowTokenizer(AutoTokenizer.from_pretrained(%r), 0.2)\n"
        "print('started', flush=True)\n"
        "build_datastore(tok, %r, %r, progress=False)\n"
    ) % (os.path.dirname(__file__), str(tmp_path / "tok"), str(corpus), str(tmp_path / "ds"))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    time.sleep(2.0)  # mid-tokenisation: 60 documents at 0.2 s each
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(FileNotFoundError):
        Datastore.load(tmp_path / "ds")


def test_datastore_cli_build(corpus, tmp_path, capsys):
    from specdec.cli import main

    assert main(["datastore", "build", "--model", "default", "--data", str(corpus), "--out", str(tmp_path / "ds")]) == 0
    assert "rest:" in capsys.readouterr().out
    assert main(["datastore", "build", "--model", "default", "--data", str(corpus), "--out", str(tmp_path / "ds")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["datastore", "build", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


# --------------------------------------------------------------------------- drafting
def repetitive(g, vocab, n):
    base = torch.randint(0, vocab, (8,), generator=g)
    return torch.cat([base, torch.randint(0, vocab, (2,), generator=g), base])[:n]


@pytest.mark.parametrize("kind", ["rest", "suffix", "rest+prompt-lookup", "suffix+prompt-lookup"])
def test_retrieval_drafters_equal_hf_greedy(tiny, kind):
    vocab = tiny.config.vocab_size
    g = torch.Generator().manual_seed(3)
    # a corpus that holds the model's own greedy continuations, so drafts are accepted now and then
    seeds = [torch.randint(0, vocab, (6,), generator=g) for _ in range(6)]
    corpus = [s.tolist() + hf_greedy(tiny, s, 20, min_new_tokens=20) for s in seeds]
    store = Datastore.from_documents(corpus, vocab)
    drafted = 0
    for i in range(6):
        ids = seeds[i] if i % 2 else repetitive(g, vocab, 14)
        ref = hf_greedy(tiny, ids, 24, min_new_tokens=24)
        parts = [RestDrafter(store, RestConfig(min_span=1)) if "rest" in kind else SuffixDrafter()]
        if "+" in kind:
            from specdec.drafters.fused import FusedDrafter
            from specdec.drafters.prompt_lookup import PromptLookupDrafter

            drafter = FusedDrafter(parts + [PromptLookupDrafter()])
        else:
            drafter = parts[0]
        for sized in (True, False):
            out = specdec.generate(tiny, None, ids, drafter=drafter, max_new_tokens=24, size_trees=sized)
            assert out.token_ids == ref, (i, kind, sized)
            drafted += out.stats.drafted_tokens
    assert drafted > 0


def test_the_suffix_drafter_learns_a_repeated_workload(tiny):
    """The same prompts twice through one drafter: the second pass drafts from the first pass's outputs."""
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, tiny.config.vocab_size, (5,), generator=g) for _ in range(4)]
    drafter = SuffixDrafter()
    tau = []
    for _ in range(2):
        runs = [specdec.generate(tiny, None, p, drafter=drafter, max_new_tokens=32, size_trees=False) for p in prompts]
        for p, r in zip(prompts, runs):
            assert r.token_ids == hf_greedy(tiny, p, 32, min_new_tokens=32)
        tau.append(sum(r.stats.new_tokens for r in runs) / sum(r.stats.target_forwards for r in runs))
    assert len(drafter.outputs) == 2 * len(prompts)  # every finished generation joined the store
    assert tau[1] > tau[0] + 0.5, tau


def test_the_suffix_store_file_persists_and_evicts(tmp_path):
    path = tmp_path / "store.npz"
    d = SuffixDrafter(SuffixConfig(store=str(path), max_tokens=10))
    for out in ([1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11]):
        d.add_output(out)
    assert d.outputs == [[5, 6, 7], [8, 9, 10, 11]]  # the oldest left to keep <= 10 tokens
    again = SuffixDrafter(SuffixConfig(store=str(path), max_tokens=10))
    assert again.outputs == d.outputs
    path.write_bytes(b"broken")
    with pytest.raises(ValueError, match="suffix store"):
        SuffixDrafter(SuffixConfig(store=str(path)))


def test_rest_refuses_a_datastore_for_a_bigger_vocabulary(tiny):
    store = Datastore.from_documents([[1, 2, 3]], vocab_size=50_000)
    with pytest.raises(ValueError, match="vocabulary"):
        specdec.generate(tiny, None, torch.tensor([1, 2]), drafter=RestDrafter(store), max_new_tokens=2)


def test_rest_spec_needs_a_datastore(tmp_path):
    from specdec.drafters import build_drafter

    with pytest.raises(ValueError, match="datastore"):
        build_drafter("rest")
    with pytest.raises(FileNotFoundError, match="datastore build"):
        build_drafter(f"rest:{tmp_path}")


def test_suffix_sessions_share_what_they_learn(tiny):
    """Each row of a batch is a session of one drafter: every finished row's output joins the one store."""
    d = SuffixDrafter()
    a, b = d.spawn(), d.spawn()
    a.reset(torch.tensor([1, 2]))
    a.close([3, 4, 5])
    assert d.outputs == b.outputs == [[3, 4, 5]] and a.store is b.store is d.store
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, tiny.config.vocab_size, (6,), generator=g) for _ in range(3)]
    drafter = SuffixDrafter()
    outs = specdec.generate(tiny, None, prompts, drafter=drafter, max_new_tokens=12)
    assert sorted(drafter.outputs) == sorted(r.token_ids for r in outs)
