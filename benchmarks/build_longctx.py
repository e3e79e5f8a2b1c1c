"""Build the long-context prompt set ``specdec/data/longctx.jsonl`` (``specdec bench --prompts longctx``).

Every prompt is 3–7K tokens of the default model's tokenizer (its context is 8K), made only of documents that
ship with specdec already (``specdec/data/spec_bench.jsonl``: Spec-Bench's RAG passages, from Natural Questions'
Wikipedia pages, and its summarization articles, from CNN/DailyMail). Four tasks, 6 prompts each:

* ``multi_doc_qa``: numbered passages, one of which answers the question at the end (its position moves from
  the first to the last document across the prompts);
* ``long_doc_qa``: one long news digest (articles run together, no numbering) and a question about the report
  that begins with a quoted sentence;
* ``summarization``: numbered news articles, each to be summarized in one or two sentences;
* ``extraction``: numbered news articles; list every person named, with the articles they appear in.

Deterministic (a fixed seed; documents drawn without replacement within a prompt). Run from the repository root:
``python benchmarks/build_longctx.py`` (rewrites the file and prints the token lengths). What it is for, and the
licences: ``specdec/data/longctx.md``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "specdec" / "data" / "spec_bench.jsonl"
OUT = ROOT / "specdec" / "data" / "longctx.jsonl"
PER_TASK = 6
LOW, HIGH = 3000, 7000  # prompt tokens (the default model's context is 8,192)


def documents():
    rows = [json.loads(line) for line in SOURCE.read_text().splitlines() if line.strip()]
    passages = []  # (context, question) from the RAG items: the question is the last line
    for q in rows:
        if q["category"] == "rag":
            context, _, question = q["turns"][0].rpartition("\n")
            passages.append((context.strip(), question.strip()))
    articles = [q["turns"][0].removeprefix("Summarize: ").strip() for q in rows if q["category"] == "summarization"]
    return passages, articles


def fill(rng: random.Random, pool: list, first, count_tokens, target: int, budget: int) -> list:
    """``first`` (if any) plus documents drawn from ``pool`` until the total reaches ``target`` tokens (never past
    ``budget``)."""
    chosen = [first] if first is not None else []
    total = sum(count_tokens(d) for d in chosen)
    for d in rng.sample(pool, len(pool)):
        if total >= target:
            break
        if d is first or d in chosen:
            continue
        n = count_tokens(d)
        if total + n <= budget:
            chosen.append(d)
            total += n
    return chosen


def build(tokenizer, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    passages, articles = documents()
    size = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    psize = {p: size(p[0]) for p in passages}
    asize = {a: size(a) for a in articles}
    out = []

    def add(category: str, text: str) -> None:
        out.append({"question_id": 9000 + len(out), "category": category, "turns": [text]})

    targets = [LOW + 500 + (HIGH - LOW - 1500) * i // (PER_TASK - 1) for i in range(PER_TASK)]  # 3.5K .. 6.5K
    for i, target in enumerate(targets):  # multi-document QA: the answering passage moves through the list
        key = passages[(7 * i) % len(passages)]
        docs = fill(rng, [p for p in passages if p is not key], None, psize.__getitem__, target - psize[key], HIGH - 400 - psize[key])
        at = round(i * len(docs) / (PER_TASK - 1))
        docs.insert(at, key)
        body = "\n\n".join(f"Document {j + 1}:\n{d[0]}" for j, d in enumerate(docs))
        add("multi_doc_qa", f"{body}\n\nAnswer the question using the documents above. Question: {key[1]}")
    for i, target in enumerate(targets):  # QA over one long digest
        key = articles[(11 * i + 3) % len(articles)]
        docs = fill(rng, [a for a in articles if a is not key], None, asize.__getitem__, target - asize[key], HIGH - 400 - asize[key])
        docs.insert(len(docs) // 2, key)
        opening = key.split(". ")[0][:200]
        add("long_doc_qa", "News digest:\n\n" + " ".join(docs)
            + f"\n\nIn the digest above, what happened in the report that begins \"{opening}\"? Answer in a few sentences.")
    for category, ask in (("summarization", "Summarize each of the articles above in one or two sentences, in order."),
                          ("extraction", "List every person named in the articles above, one per line, with the numbers of "
                                         "the articles each one appears in.")):
        for target in targets:
            docs = fill(rng, articles, None, asize.__getitem__, target, HIGH - 300)
            body = "\n\n".join(f"Article {j + 1}:\n{d}" for j, d in enumerate(docs))
            add(category, f"{body}\n\n{ask}")
    return out


def main() -> None:
    from specdec.models import load_tokenizer

    tokenizer = load_tokenizer("default")
    rows = build(tokenizer)
    lengths = [len(tokenizer(r["turns"][0], add_special_tokens=False)["input_ids"]) for r in rows]
    bad = [(r["question_id"], n) for r, n in zip(rows, lengths) if not LOW <= n <= HIGH]
    if bad:
        raise SystemExit(f"prompts outside {LOW}..{HIGH} tokens: {bad}")
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} prompts written to {OUT}; tokens min {min(lengths)}, median {sorted(lengths)[len(lengths) // 2]}, "
          f"max {max(lengths)}")


if __name__ == "__main__":
    main()
