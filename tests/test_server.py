"""`specdec serve`: a live server on 127.0.0.1 driven by the official `openai` client.

The in-process tests serve a tiny random Llama (float64, so that batch and single forwards cannot flip an
argmax) with the default model's tokenizer; the end-to-end test starts `specdec serve --model default` as a
process and stops it with SIGTERM.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import specdec
from conftest import tiny_model
from specdec.server import EngineLoop, ServerConfig, build_app

openai = pytest.importorskip("openai")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class LiveServer:
    """uvicorn on a thread over an EngineLoop; stopped (server, then engine) by close()."""

    def __init__(self, model, tokenizer, **config) -> None:
        import uvicorn

        self.model, self.tokenizer = model, tokenizer
        self.engine = EngineLoop(model, tokenizer, ServerConfig(**config))
        self.engine.start()
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(build_app(self.engine, "tiny"), host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.base = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=120)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.stop(10)


@pytest.fixture(scope="module")
def tokenizer():
    from specdec.models import load_tokenizer

    return load_tokenizer("default")


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=5)
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def live(tiny_lm, tokenizer):
    server = LiveServer(tiny_lm, tokenizer, drafters=("prompt-lookup", "none", "suffix"), max_batch=4, max_queue=16)
    yield server
    server.close()


QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "List three prime numbers.",
             "Explain recursion in one sentence.", "Say hello in Spanish.", "How many legs does a spider have?"]


def chat(question):
    return [{"role": "user", "content": question}]


def streamed_text(client, **kwargs) -> tuple[str, str]:
    parts, reason = [], None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            reason = chunk.choices[0].finish_reason or reason
    return "".join(parts), reason


def test_health_models_and_metrics(live):
    assert httpx.get(live.base + "/health").json()["status"] == "ok"
    models = live.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    live.client.chat.completions.create(model="tiny", messages=chat("hi"), max_tokens=4)
    text = httpx.get(live.base + "/metrics").text
    samples = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert samples["specdec_requests_total"] >= 1 and samples["specdec_generation_tokens_total"] >= 4
    assert samples["specdec_mean_accepted_length"] >= 1.0
    for name in ("specdec_queue_depth", "specdec_batch_size", "specdec_step_seconds_count", "specdec_prompt_tokens_total"):
        assert name in samples
    assert "# TYPE specdec_requests_total counter" in text


def test_concurrent_streamed_greedy_answers_equal_each_alone_and_plain_decoding(live, tiny_lm, tokenizer):
    """Requests arrive while others run (rows join mid-batch, more requests than rows), with different drafters
    and lengths; each streamed answer equals the same request alone and specdec's plain greedy decoding."""
    drafters = ["prompt-lookup", "none", "suffix"]
    jobs = [dict(model="tiny", messages=chat(q), max_tokens=40 + 10 * i, extra_body={"drafter": drafters[i % 3]}) for i, q in enumerate(QUESTIONS)]
    plain = [specdec.generate(tiny_lm, tokenizer, j["messages"], drafter="none", max_new_tokens=j["max_tokens"]).text for j in jobs]

    def run(i):
        time.sleep(0.01 * i)  # staggered arrivals
        return streamed_text(live.client, **jobs[i])

    steps, rows = _metric(live, "specdec_step_seconds_count"), _metric(live, "specdec_row_forwards_total")
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, range(len(jobs))))
    steps, rows = _metric(live, "specdec_step_seconds_count") - steps, _metric(live, "specdec_row_forwards_total") - rows
    assert rows > 1.5 * steps  # the requests really ran together: on average more than 1.5 rows per forward
    alone = [live.client.chat.completions.create(**j) for j in jobs]
    assert [t for t, _ in together] == [a.choices[0].message.content for a in alone] == plain
    assert {r for _, r in together} == {"length"}
    assert [a.usage.completion_tokens for a in alone] == [j["max_tokens"] for j in jobs]


def test_completions_endpoint_stop_strings_and_seeded_sampling(live, tiny_lm, tokenizer):
    full = live.client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.prompt_tokens == len(tokenizer("Once upon a time")["input_ids"])
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cut = live.client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.index(stop)]
    streamed = "".join(c.choices[0].text for c in live.client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24,
                                                                                 stop=stop, stream=True) if c.choices)
    assert streamed == cut.choices[0].text
    sample = lambda seed: live.client.chat.completions.create(model="tiny", messages=chat("pick"), max_tokens=16, temperature=1.0,  # noqa: E731
                                                              seed=seed).choices[0].message.content
    assert sample(3) == sample(3)
    assert len({sample(s) for s in range(4)}) > 1


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(live):
    url = live.base + "/v1/chat/completions"
    cases = [
        (b"{not json", 400),
        (json.dumps({"model": "tiny"}).encode(), 400),  # no messages
        (json.dumps({"model": "tiny", "messages": "hello"}).encode(), 400),
        (json.dumps({"model": "tiny", "messages": chat("x"), "max_tokens": -3}).encode(), 400),
        (json.dumps({"model": "tiny", "messages": chat("x"), "temperature": "hot"}).encode(), 400),
        (json.dumps({"model": "tiny", "messages": chat("x"), "stop": 5}).encode(), 400),
        (json.dumps({"model": "tiny", "messages": chat("x"), "n": 2}).encode(), 400),
        (json.dumps({"model": "tiny", "messages": chat("word " * 600)}).encode(), 400),  # beyond the 512-token context
        (json.dumps({"model": "gpt-9", "messages": chat("x")}).encode(), 404),
        (json.dumps({"model": "tiny", "messages": chat("x"), "drafter": "medusa"}).encode(), 404),
        (json.dumps([1, 2]).encode(), 400),
        (json.dumps({"model": "tiny", "messages": chat("x"), "drafter_options": {"no_such": 1}}).encode(), 400),
        (json.dumps({"model": "tiny", "messages": chat("x"), "drafter_options": {"num_tokens": "many"}}).encode(), 400),
        (json.dumps({"model": "tiny", "messages": chat("x"), "drafter_options": [1]}).encode(), 400),
        (json.dumps({"model": "tiny", "messages": chat("x"), "drafter": "none", "drafter_options": {"num_tokens": 2}}).encode(), 400),
    ]
    for body, status in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        live.client.chat.completions.create(model="tiny", messages=chat("x"), max_tokens=-1)
    ok = live.client.chat.completions.create(model="tiny", messages=chat("still there?"), max_tokens=5)
    assert ok.usage.completion_tokens == 5


def test_per_request_drafter_options_shape_that_request_only(live, tiny_lm, tokenizer):
    """``drafter_options`` set one request's session (prompt lookup drafting at most one token per step): its
    answer still equals plain greedy, and the loaded drafter keeps its own settings for the next request
    (what the options do to proposals: test_prompt_lookup's session test)."""
    question = chat("Repeat after me: one two three, one two three, one two three.")
    plain = specdec.generate(tiny_lm, tokenizer, question, drafter="none", max_new_tokens=48).text
    one = live.client.chat.completions.create(model="tiny", messages=question, max_tokens=48,
                                              extra_body={"drafter_options": {"num_tokens": 1, "max_candidates": 1, "adaptive": False}})
    assert one.choices[0].message.content == plain
    assert one.usage.mean_accepted_length <= 2.0  # at most one draft and the bonus token per step
    assert live.engine.drafters["prompt-lookup"].config.num_tokens == 10


def test_a_client_that_drops_mid_stream_leaves_the_batch_and_others_are_unchanged(live):
    other = dict(model="tiny", messages=chat(QUESTIONS[1]), max_tokens=40)
    expected = live.client.chat.completions.create(**other).choices[0].message.content
    before = _metric(live, 'specdec_requests_finished_total{reason="cancelled"}')
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(lambda: (time.sleep(0.1), streamed_text(live.client, **other))[1])
        with httpx.stream("POST", live.base + "/v1/chat/completions", json={"model": "tiny", "messages": chat(QUESTIONS[0]),
                                                                              "max_tokens": 400, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
        # the response is closed here, long before its 400 tokens
        assert fut.result()[0] == expected
    deadline = time.time() + 20
    while _metric(live, 'specdec_requests_finished_total{reason="cancelled"}') <= before:
        assert time.time() < deadline, "the dropped request never left the batch"
        time.sleep(0.1)
    assert httpx.get(live.base + "/health").json()["batch_size"] == 0


def _metric(live, name: str) -> float:
    for line in httpx.get(live.base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_full_queue_answers_429_with_retry_after(tiny_lm, tokenizer):
    server = LiveServer(tiny_lm, tokenizer, drafters=("none",), max_batch=1, max_queue=0)
    try:
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(server.client.chat.completions.create, model="tiny", messages=chat("a long one"), max_tokens=300)
            deadline = time.time() + 20
            while httpx.get(server.base + "/health").json()["batch_size"] < 1:
                assert time.time() < deadline
                time.sleep(0.01)
            r = httpx.post(server.base + "/v1/chat/completions", json={"model": "tiny", "messages": chat("me too"), "max_tokens": 3})
            assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error"
            assert long.result().usage.completion_tokens == 300  # the running request was not disturbed
        assert server.client.chat.completions.create(model="tiny", messages=chat("now"), max_tokens=3).usage.completion_tokens == 3
    finally:
        server.close()


@pytest.mark.default_model
def test_specdec_serve_default_model_concurrent_equals_alone_and_sigterm_drains(tmp_path):
    """The real command: 8 concurrent streamed greedy chats equal the same prompts sent one at a time, and SIGTERM
    with a request in flight lets it finish, then the process exits 0."""
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "specdec.cli", "serve", "--model", "default", "--drafter", "prompt-lookup",
                             "--port", str(port), "--max-batch", "8", "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline
            time.sleep(0.5)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
        questions = QUESTIONS + ["Repeat after me: the cat sat on the mat.", "Name a color."]
        jobs = [dict(model="default", messages=chat(q), max_tokens=24) for q in questions]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda j: streamed_text(client, **j)[0], jobs))
        alone = [client.chat.completions.create(**j).choices[0].message.content for j in jobs]
        assert together == alone
        with ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(lambda: client.chat.completions.create(model="default", messages=chat(QUESTIONS[3]), max_tokens=64))
            deadline = time.time() + 60
            while httpx.get(base + "/health").json()["batch_size"] < 1:
                assert time.time() < deadline
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            answer = inflight.result()
        assert answer.usage.completion_tokens == 64 or answer.choices[0].finish_reason == "stop"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
