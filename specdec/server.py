"""``specdec serve``: an OpenAI-compatible HTTP server over the open batch (:class:`specdec.batch.BatchEngine`).

One engine thread owns the model. HTTP handlers (Starlette on uvicorn) validate a request, turn it into a
:class:`~specdec.batch.Request` and queue it; the engine thread runs batch steps while any row is running or
waiting, so a request that arrives mid-batch joins at the next step (continuous batching), and hands each
step's tokens back to the handler's event loop. Every row has its own sampling settings, generator, limit,
stop strings and drafter (one of those the server loaded, named by the request's ``drafter`` field).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as server-sent events ending with
``data: [DONE]``, or not), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

Decisions (the API leaves them open):

* ``max_tokens`` defaults to :attr:`ServerConfig.default_max_tokens` and is cut to what the model's context
  leaves after the prompt (the answer then ends with ``finish_reason: "length"``); a prompt that fills the
  context is a 400.
* Stop strings end the answer, and the returned text stops before the first one (as OpenAI's API does).
* ``usage`` carries ``prompt_tokens``, ``completion_tokens``, ``total_tokens`` and specdec's own
  ``mean_accepted_length`` (τ: tokens per target forward for this request).
* Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for malformed JSON and
  wrong or missing fields, 404 for an unknown model or drafter, 429 with ``Retry-After`` when the queue of
  waiting requests is full, 503 while shutting down.
* A client that disconnects: its row leaves the batch at the next step; the others are unaffected.
* SIGTERM: uvicorn stops accepting, the requests in flight finish (up to ``grace_s``), the process exits 0.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ServerConfig", "EngineLoop", "build_app", "serve"]


@dataclass
class ServerConfig:
    """How the server runs.

    Attributes:
        model_name: the id ``/v1/models`` lists and requests may name (None: the ``--model`` argument).
        drafters: drafter specs to load; a request picks one by its ``drafter`` field (default: the first).
        max_batch: the most requests decoded together; the rest wait in the queue.
        max_queue: the most requests waiting to join; past it a request gets 429.
        default_max_tokens: ``max_tokens`` when a request gives none.
        grace_s: on SIGTERM, how long the requests in flight may take to finish.
        dtype: load the model in this dtype (None: float32).
        prefill_chunk: prompt tokens prefilled per step while other requests decode (None: sized from the measured
            cost; 0: whole prompts, which stalls the running requests for each join).
    """

    model_name: str | None = None
    drafters: tuple[str, ...] = ("prompt-lookup",)
    max_batch: int = 16
    max_queue: int = 64
    default_max_tokens: int = 256
    grace_s: float = 30.0
    dtype: str | None = None
    fast: bool = True
    size_trees: bool = True
    max_tree_nodes: int = 64
    prefill_chunk: int | None = None

    def __post_init__(self) -> None:
        if not self.drafters:
            raise ValueError("give at least one drafter (e.g. --drafter prompt-lookup, or --drafter none)")
        if self.max_batch < 1 or self.max_queue < 0 or self.default_max_tokens < 1:
            raise ValueError("max_batch and default_max_tokens must be >= 1, max_queue >= 0")


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code, self.headers = status, message, param, kind, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- the engine thread
@dataclass
class Metrics:
    """Counters the engine thread and the handlers update; :meth:`render` writes them as Prometheus text."""

    requests: int = 0
    rejected: int = 0
    errors: int = 0
    finished: dict = field(default_factory=dict)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    row_forwards: int = 0
    steps: int = 0
    step_seconds: float = 0.0

    def render(self, queue_depth: int, batch_size: int) -> str:
        tau = self.generation_tokens / self.row_forwards if self.row_forwards else 0.0
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP specdec_{name} {help_}", f"# TYPE specdec_{name} {kind}"])
            lines.extend(f"specdec_{name}{labels} {value}" for labels, value in samples)

        metric("requests_total", "counter", "Requests accepted into the queue.", [("", self.requests)])
        metric("requests_rejected_total", "counter", "Requests refused because the queue was full (429).", [("", self.rejected)])
        metric("requests_failed_total", "counter", "Requests that ended with an engine error.", [("", self.errors)])
        metric("requests_finished_total", "counter", "Requests finished, by finish reason.",
               [(f'{{reason="{k}"}}', v) for k, v in sorted(self.finished.items())] or [('{reason="stop"}', 0)])
        metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", self.prompt_tokens)])
        metric("generation_tokens_total", "counter", "Tokens generated.", [("", self.generation_tokens)])
        metric("row_forwards_total", "counter", "Target forwards summed over rows (a step over B rows counts B).", [("", self.row_forwards)])
        metric("mean_accepted_length", "gauge", "Tokens generated per row forward since start (tau).", [("", round(tau, 4))])
        metric("queue_depth", "gauge", "Requests waiting to join the batch.", [("", queue_depth)])
        metric("batch_size", "gauge", "Requests in the running batch (decoding or being prefilled).", [("", batch_size)])
        metric("step_seconds", "summary", "Wall time of engine steps.", [("_sum", round(self.step_seconds, 6)), ("_count", self.steps)])
        return "\n".join(lines) + "\n"


class _Handle:
    """The handler's side of one request: events arrive on its asyncio queue from the engine thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request) -> None:
        self.loop, self.request, self.queue = loop, request, asyncio.Queue()

    def push(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def cancel(self) -> None:
        self.request.cancelled = True


class EngineLoop:
    """Owns the model and one :class:`~specdec.batch.BatchEngine`; runs it on its own thread.

    :meth:`submit` (from any thread) queues a request and returns a handle whose queue receives each
    :class:`~specdec.engine.StepEvent` of the request, then ``None`` when it ended (or an exception).
    """

    def __init__(self, model, tokenizer, config: ServerConfig) -> None:
        from specdec.batch import BatchEngine
        from specdec.config import GenerationConfig
        from specdec.drafters.base import Target, build_drafter
        from specdec.engine import _eos_ids, _hardware
        from specdec.tree_attention.hf import resolve_backend

        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.drafters = {}
        gen = GenerationConfig(fast=config.fast, size_trees=config.size_trees, max_tree_nodes=config.max_tree_nodes)
        attn = resolve_backend(gen.attn, torch.device(getattr(model, "device", "cpu")))
        fast, profile = _hardware(model, gen, attn)
        cost = profile.cost if profile is not None and gen.size_trees else None
        batch_cost = None
        if cost is not None and isinstance(model, torch.nn.Module):
            from specdec.profile import get_batch_profile

            batch_cost = get_batch_profile(model, fast=gen.fast, attn=attn, linears=fast).cost
        for spec in config.drafters:
            drafter = build_drafter(spec)
            target = Target.of(model, tokenizer, seed=0)
            target.cost, target.step_ms = cost, (profile.step_ms if profile is not None else None)
            target.max_nodes = gen.max_tree_nodes
            drafter.bind(target)
            self.drafters[spec] = drafter
        self._engine_args = dict(eos_ids=_eos_ids(model, tokenizer), max_rows=config.max_batch, attn=attn, fast=fast, route=gen.fast,
                                 cost=cost, max_nodes=gen.max_tree_nodes, prefill_chunk=config.prefill_chunk, batch_cost=batch_cost)
        self.engine = BatchEngine(model, **self._engine_args)
        self.metrics = Metrics()
        self.context = getattr(model.config, "max_position_embeddings", None)
        self._handles: dict[int, _Handle] = {}
        self._wake = threading.Event()
        self._stop = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="specdec-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the current step; requests still queued or running end with an error event."""
        self._stop = True
        self._wake.set()
        if self._thread.ident is not None:  # started on its own thread (not run by the caller)
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self.engine.waiting)

    @property
    def batch_size(self) -> int:
        """Requests in the batch: decoding, or being prefilled."""
        return len(self.engine.rows) + len(self.engine.prefilling)

    def submit(self, loop: asyncio.AbstractEventLoop, request) -> _Handle:
        """Queue ``request`` (a :class:`~specdec.batch.Request` whose key is unset); 429 when the queue is full."""
        with self._lock:
            if self._stop:
                raise APIError(503, "the server is shutting down", kind="server_error")
            if self.queue_depth >= self.config.max_queue + max(0, self.config.max_batch - self.batch_size):
                self.metrics.rejected += 1
                raise APIError(429, f"the server is at capacity ({self.batch_size} running, {self.queue_depth} waiting); "
                               "retry after a moment", kind="rate_limit_error", headers={"Retry-After": "1"})
            handle = _Handle(loop, request)
            request.key = id(handle)
            self._handles[request.key] = handle
            self.metrics.requests += 1
            self.metrics.prompt_tokens += int(request.ids.numel())
            self.engine.add(request)
        self._wake.set()
        return handle

    def run(self, until=None) -> None:
        """Run the engine on the calling thread until :meth:`stop` (or ``until()`` is true), then end what is left
        with an error. ``specdec serve`` runs it on the main thread: on a CPU build of torch, OpenMP's worker
        threads belong to the thread that first ran parallel work, and the same forward from another thread
        was measured ~35% slower (AMD EPYC Zen 5: 35 ms against 22 ms a step)."""
        self._run(until)

    def _run(self, until=None) -> None:
        with torch.no_grad():  # scoped: serve() runs this on the caller's (main) thread
            self._loop(until)
        self._fail_all(APIError(503, "the server stopped before this request finished", kind="server_error"))

    def _loop(self, until) -> None:
        while not self._stop and not (until is not None and until()):
            if self.engine.idle:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                events = self.engine.step()
            except Exception as exc:  # a failed step ends every request in it; the engine starts afresh
                self._fail_all(exc)
                continue
            m = self.metrics
            m.steps += 1
            m.step_seconds += time.perf_counter() - t0
            m.row_forwards += len(self.engine.rows)
            for key, event in events:
                handle = self._handles.get(key)
                m.generation_tokens += len(event.new_tokens)
                if event.finish_reason:
                    m.finished[event.finish_reason] = m.finished.get(event.finish_reason, 0) + 1
                    self._handles.pop(key, None)
                if handle is not None:
                    handle.push(event)

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
            self.metrics.errors += len(handles)
            self.engine.close()
            from specdec.batch import BatchEngine

            self.engine = BatchEngine(self.model, **self._engine_args)
        for h in handles:
            h.push(exc)


# --------------------------------------------------------------------------- request parsing
@dataclass
class _Parsed:
    prompt: Any  # str, token ids, or chat messages
    max_tokens: int | None
    temperature: float
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    drafter: str | None
    model: str | None
    drafter_options: dict | None = None


def _check(cond: bool, message: str, param: str) -> None:
    if not cond:
        raise APIError(400, message, param)


def _number(body: dict, name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    _check(isinstance(v, (int, float)) and not isinstance(v, bool), f"'{name}' must be a number", name)
    _check(lo <= v <= hi, f"'{name}' must lie in [{lo}, {hi}], got {v}", name)
    return float(v)


def _integer(body: dict, name: str, lo: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    _check(isinstance(v, int) and not isinstance(v, bool), f"'{name}' must be an integer", name)
    _check(v >= lo, f"'{name}' must be >= {lo}, got {v}", name)
    return v


def _content_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    _check(isinstance(content, list), f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
    parts = []
    for part in content:
        _check(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str),
               f"messages[{i}].content parts must be {{'type': 'text', 'text': ...}} (this model reads text only)",
               f"messages[{i}].content")
        parts.append(part["text"])
    return "".join(parts)


def parse_request(body, chat: bool) -> _Parsed:
    """Validate a (chat) completion request body; raises :class:`APIError` (400) naming the bad field."""
    _check(isinstance(body, dict), "the request body must be a JSON object", None)
    if chat:
        msgs = body.get("messages")
        _check(isinstance(msgs, list) and len(msgs) > 0, "'messages' must be a non-empty list of {role, content} objects", "messages")
        prompt = []
        for i, m in enumerate(msgs):
            _check(isinstance(m, dict) and isinstance(m.get("role"), str), f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
            _check(m["role"] in ("system", "user", "assistant", "developer", "tool"), f"messages[{i}].role {m['role']!r} is not a chat role", f"messages[{i}].role")
            prompt.append({"role": "system" if m["role"] == "developer" else m["role"], "content": _content_text(m.get("content"), i)})
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        ok = (isinstance(prompt, str) and prompt != "") or (
            isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt))
        _check(ok, "'prompt' must be a non-empty string or a list of token ids (one prompt per request)", "prompt")
    n = _integer(body, "n", 1)
    _check(n in (None, 1), "'n' must be 1 (one choice per request)", "n")
    max_tokens = _integer(body, "max_completion_tokens", 1) if body.get("max_completion_tokens") is not None else _integer(body, "max_tokens", 1)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    _check(top_p is None or top_p > 0, "'top_p' must be > 0", "top_p")
    seed = _integer(body, "seed", -(2**63))
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    else:
        _check(isinstance(stop, list) and all(isinstance(s, str) for s in stop), "'stop' must be a string or a list of strings", "stop")
        stop = tuple(stop)
    _check(all(stop) and len(stop) <= 4, "'stop' takes at most 4 non-empty strings", "stop")
    stream = body.get("stream", False)
    _check(isinstance(stream, bool), "'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    _check(isinstance(opts, dict), "'stream_options' must be an object", "stream_options")
    include_usage = opts.get("include_usage", False)
    _check(isinstance(include_usage, bool), "'stream_options.include_usage' must be true or false", "stream_options")
    drafter = body.get("drafter")
    _check(drafter is None or isinstance(drafter, str), "'drafter' must be a string naming one of the server's drafters", "drafter")
    model = body.get("model")
    _check(model is None or isinstance(model, str), "'model' must be a string", "model")
    drafter_options = body.get("drafter_options")
    _check(drafter_options is None or (isinstance(drafter_options, dict)
                                       and all(isinstance(v, (str, int, float, bool)) for v in drafter_options.values())),
           "'drafter_options' must be an object of option names to strings, numbers or booleans", "drafter_options")
    return _Parsed(prompt, max_tokens, 0.0 if temperature is None else temperature, top_p, seed, stop, stream, include_usage, drafter, model,
                   drafter_options or None)


# --------------------------------------------------------------------------- the app
class _Answer:
    """Collects a request's tokens and yields its text as it grows, holding back what may begin a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop, self.ids, self.sent = tokenizer, stop, [], 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stop if s in text]
        return text[: min(cuts)] if cuts else text

    def piece(self, tokens: list[int], final: bool) -> str:
        self.ids.extend(tokens)
        text = self.text()
        if not final:
            if text.endswith("\ufffd"):
                return ""
            text = text[: max(self.sent, len(text) - self.hold)]
        out, self.sent = text[self.sent :], max(self.sent, len(text))
        return out


def _finish(reason: str) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


def build_app(loop_: EngineLoop, model_id: str):
    """The Starlette application over a started :class:`EngineLoop`."""
    from starlette.applications import Starlette
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    from specdec.batch import Request
    from specdec.config import GenerationConfig
    from specdec.engine import GenerationStats, _input_ids, _StopStrings
    from specdec.verifiers import make_verifier

    tokenizer = loop_.tokenizer
    default_drafter = next(iter(loop_.drafters))
    created = int(time.time())

    def error(exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def health(_request) -> JSONResponse:
        return JSONResponse({"status": "ok", "batch_size": loop_.batch_size, "queue_depth": loop_.queue_depth})

    async def models(_request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "specdec",
                                                          "drafters": list(loop_.drafters)}]})

    async def metrics(_request) -> PlainTextResponse:
        return PlainTextResponse(loop_.metrics.render(loop_.queue_depth, loop_.batch_size), media_type="text/plain; version=0.0.4")

    def make_request(p: _Parsed):
        if p.model is not None and p.model != model_id:
            raise APIError(404, f"model {p.model!r} is not served here; this server serves {model_id!r}", "model", code="model_not_found")
        name = p.drafter or default_drafter
        if name not in loop_.drafters:
            raise APIError(404, f"drafter {name!r} is not loaded; this server has {sorted(loop_.drafters)} "
                           "(start it with --drafter SPEC for each)", "drafter")
        try:
            ids = _input_ids(loop_.model, tokenizer, p.prompt)
        except ValueError as exc:
            raise APIError(400, str(exc), "messages" if isinstance(p.prompt, list) and p.prompt and isinstance(p.prompt[0], dict) else "prompt",
                           code="context_length_exceeded" if "context" in str(exc) else None) from None
        room = (loop_.context - ids.numel()) if loop_.context else None
        max_tokens = p.max_tokens or loop_.config.default_max_tokens
        if room is not None:
            max_tokens = min(max_tokens, room)
        config = GenerationConfig(temperature=p.temperature, top_p=p.top_p)
        generator = None
        if p.temperature > 0:
            generator = torch.Generator().manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, ())))
        stop = _StopStrings(tokenizer, p.stop) if p.stop else None
        stats = GenerationStats(prompt_tokens=ids.numel())
        try:
            session = loop_.drafters[name].open(p.drafter_options)
        except (ValueError, TypeError) as exc:
            raise APIError(400, str(exc), "drafter_options") from None
        return Request(ids, session, make_verifier(config), max_tokens, generator, stop, stats)

    async def parse(http: HTTPRequest, chat: bool) -> _Parsed:
        raw = await http.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc})") from None
        return parse_request(body, chat)

    def usage(req) -> dict:
        s = req.stats
        return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens, "total_tokens": s.prompt_tokens + s.new_tokens,
                "mean_accepted_length": round(s.mean_accepted_length, 4)}

    async def next_event(handle: _Handle, http: HTTPRequest | None):
        """The next event of the request, or None when the client has gone (checked while waiting when ``http``
        is given; a streamed response learns it from Starlette, which cancels its generator)."""
        while True:
            try:
                item = await asyncio.wait_for(handle.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if http is not None and await http.is_disconnected():
                    handle.cancel()
                    return None
                continue
            if isinstance(item, Exception):
                raise item
            return item

    async def completion(http: HTTPRequest, chat: bool):
        try:
            p = await parse(http, chat)
            req = make_request(p)
            handle = loop_.submit(asyncio.get_running_loop(), req)
        except APIError as exc:
            return error(exc)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        kind = "chat.completion" if chat else "text_completion"
        answer = _Answer(tokenizer, p.stop)

        def choice(text: str, reason: str | None, delta: bool) -> dict:
            if chat:
                key = "delta" if delta else "message"
                return {"index": 0, key: ({"content": text} if delta else {"role": "assistant", "content": text}), "finish_reason": reason,
                        **({} if delta else {"logprobs": None})}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}

        if not p.stream:
            try:
                while True:
                    event = await next_event(handle, http)
                    if event is None:  # nobody is listening any more
                        return error(APIError(499, "the client closed the request"))
                    answer.ids.extend(event.new_tokens)
                    if event.finish_reason:
                        break
            except APIError as exc:
                return error(exc)
            finally:
                handle.cancel()
            return JSONResponse({"id": rid, "object": kind, "created": int(time.time()), "model": model_id,
                                 "choices": [choice(answer.text(), _finish(event.finish_reason), False)], "usage": usage(req)})

        async def events():
            chunk_kind = kind + ".chunk" if chat else kind

            def sse(choices: list, extra: dict | None = None) -> str:
                payload = {"id": rid, "object": chunk_kind, "created": int(time.time()), "model": model_id, "choices": choices, **(extra or {})}
                return f"data: {json.dumps(payload)}\n\n"

            try:
                if chat:
                    yield sse([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                while True:
                    try:
                        event = await next_event(handle, None)
                    except APIError as exc:
                        yield f"data: {json.dumps(exc.body())}\n\n"
                        break
                    final = event.finish_reason is not None
                    text = answer.piece(event.new_tokens, final)
                    if text:
                        yield sse([choice(text, None, True)])
                    if final:
                        yield sse([choice("", _finish(event.finish_reason), True)])
                        if p.include_usage:
                            yield sse([], {"usage": usage(req)})
                        break
                yield "data: [DONE]\n\n"
            finally:  # the client went away (the task is cancelled) or we are done: the row leaves either way
                handle.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def chat_completions(http: HTTPRequest):
        return await completion(http, True)

    async def completions(http: HTTPRequest):
        return await completion(http, False)

    return Starlette(routes=[
        Route("/health", health), Route("/v1/models", models), Route("/metrics", metrics),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]), Route("/v1/completions", completions, methods=["POST"]),
    ])


def serve(model: str, config: ServerConfig, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Load the model and drafters and serve until SIGINT/SIGTERM (returns 0 after the drain).

    The engine runs on the main thread (see :meth:`EngineLoop.run`) and uvicorn on a second one; SIGTERM or
    SIGINT tells uvicorn to stop accepting and to wait for the requests in flight (up to ``grace_s``), which
    the engine keeps serving until uvicorn has closed its last connection.
    """
    import uvicorn

    from specdec.drafters.base import build_drafter
    from specdec.models import load_model

    for spec in config.drafters:  # a bad spec fails before the model loads
        build_drafter(spec)
    lm, tokenizer = load_model(model, dtype=config.dtype)
    engine = EngineLoop(lm, tokenizer, config)
    app = build_app(engine, config.model_name or model)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=max(1, int(config.grace_s))))
    failed: list[BaseException] = []

    def run_server() -> None:
        try:
            server.run()  # off the main thread uvicorn installs no signal handlers: ours below stop it
        except BaseException as exc:  # e.g. the port is taken
            failed.append(exc)

    def on_signal(sig, frame) -> None:
        if server.should_exit and sig == signal.SIGINT:
            server.force_exit = True  # a second Ctrl-C: stop without waiting
        server.should_exit = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=run_server, name="specdec-http", daemon=True)
    thread.start()
    try:
        engine.run(until=lambda: not thread.is_alive())
    finally:
        engine.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed or not server.started:
        raise ValueError(f"the HTTP server on {host}:{port} could not run ({failed[0] if failed else 'it did not start'}); "
                         "is the port in use? pick another with --port")
    return 0
