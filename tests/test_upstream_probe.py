"""Our own looks at the upstream never get in the buyers' way, and buyers never read its internals.

- llama_cpp.server makes ``/v1/models`` wait for the model, and by default a request waiting for it
  stops the stream holding it: the agent's periodic ``/v1/models`` cut every long answer, or, with
  that turned off, waited out the generation and reported a healthy upstream down. The model list
  is now read only while no request is in flight; a prompt 404 on ``/health`` is proof of life.
- Buyers' generations and the health checks shared one pool of 100 connections: 110 long streams
  made a healthy upstream look dead, and a launched vLLM was restarted under its busiest load.
- A failure reached buyers as aiohttp's class names and the upstream's address; it now reads as one
  plain cause, and the provider's log still names the address.

The upstreams are real: llama-cpp-python's own server, and small aiohttp servers playing an
upstream whose generations the test holds open and releases.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from doubles.hostile_upstream import CHAT, MODEL, HostileUpstream, chunk, event, fronted
from llama_cpp_upstream import LlamaCppServer
from live_platform import free_port

from conftest import TINY_MODEL
from vramsupply.upstream import UpstreamBackend, UpstreamOptions
from vramsupply.upstream.client import UpstreamClient
from vramsupply.upstream.front import FrontState, create_front_app
from vramsupply.upstream.supervisor import Supervisor

USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
MANY = 110
"""More streams at once than aiohttp's default pool of 100 connections."""
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
"""The launched engine's process: its HTTP surface is a double in the test's own process."""


async def eventually(condition: Callable[[], object], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.05)


async def next_looks(state: FrontState, count: int = 2) -> None:
    """Until the watch has finished ``count`` more looks at the upstream."""
    for _ in range(count):
        before = state.health.checked_at
        await eventually(lambda: state.health.checked_at != before)


class HeldUpstream(HostileUpstream):
    """An upstream whose streams send one piece and then wait for ``release``, as a long generation
    does. With ``like_llama_cpp``, it plays llama_cpp.server: no ``/health`` (404), and a
    ``/v1/models`` that waits for the generation to end."""

    def __init__(self, like_llama_cpp: bool = False) -> None:
        super().__init__()
        self.like_llama_cpp = like_llama_cpp
        self.release = asyncio.Event()
        self.open = 0
        self.idle = asyncio.Event()
        """Set while no generation runs: llama_cpp.server's model lock is free."""
        self.idle.set()
        self.models_during_generation = 0
        self.models_gate: asyncio.Event | None = None
        """When set, each /v1/models read waits for it (``models_held`` says one is waiting)."""
        self.models_held = asyncio.Event()
        self.generation = self.held_stream

    async def answer(self, request: web.Request) -> web.Response:
        if request.path == "/health" and self.like_llama_cpp:
            return web.Response(status=404)
        if request.path == "/v1/models":
            await self.models_wait()
        return await super().answer(request)

    async def models_wait(self) -> None:
        if self.like_llama_cpp and self.open:
            self.models_during_generation += 1
            await self.idle.wait()  # the model lock
        if self.models_gate is not None:
            self.models_held.set()
            await self.models_gate.wait()

    async def held_stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.open += 1
        self.idle.clear()
        try:
            await response.write(event(chunk("Once")))
            await self.release.wait()
            await response.write(event(chunk(" upon")) + event(chunk(usage=USAGE)) + event("[DONE]"))
        finally:
            self.open -= 1
            if not self.open:
                self.idle.set()
        await response.write_eof()
        return response


async def stream(buyer: aiohttp.ClientSession, url: str, body: dict[str, Any] = CHAT, path: str = "/v1/chat/completions") -> list[Any]:
    """What a buyer reads of a stream: its JSON events, and "[DONE]"."""
    async with buyer.post(url + path, json={**body, "stream": True}) as response:
        assert response.status == 200, await response.text()
        text = (await response.read()).decode()
    blocks = [block.removeprefix("data: ") for block in text.split("\n\n") if block.startswith("data: ")]
    return [b if b == "[DONE]" else json.loads(b) for b in blocks]


def complete(events: list[Any]) -> bool:
    return events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events)


# 1. The model list is never read while a buyer's answer is being generated.


async def test_a_long_answer_from_llama_cpp_server_is_not_cut_by_our_own_checks() -> None:
    """llama_cpp.server as it starts by default (``interrupt_requests``): before, the check every
    5 s cut every stream at the next look; here the watch looks every 0.05 s."""
    with DefaultLlamaCppServer() as upstream:
        async with front_before(upstream.base_url, context_length=512) as (url, backend, buyer):
            body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}
            events = await stream(buyer, url, body, "/v1/completions")
            async with buyer.get(url + "/health") as health:
                assert health.status == 200
    finishes = [choice["finish_reason"] for e in events if isinstance(e, dict) for choice in e.get("choices", []) if choice.get("finish_reason")]
    assert complete(events) and finishes == ["length"], "the whole answer, up to max_tokens"


@contextlib.asynccontextmanager
async def answering(upstream: HeldUpstream) -> AsyncIterator[tuple[Any, Any, asyncio.Task[Any]]]:
    """The agent in front of ``upstream``, its upstream's state, and a buyer's chat the upstream holds open."""
    async with fronted(upstream) as front:
        state = front.backend.state
        assert state is not None
        answer = asyncio.create_task(front.stream(CHAT))
        await eventually(lambda: upstream.open == 1)
        yield front, state, answer


async def test_a_generation_that_holds_the_model_lock_never_makes_the_upstream_look_down() -> None:
    upstream = HeldUpstream(like_llama_cpp=True)
    async with answering(upstream) as (front, state, answer):
        await next_looks(state, 3)
        assert state.health.ready and (await front.health())[0] == 200, "a 404 on /health is proof of life"
        upstream.release.set()
        events = await answer
    assert complete(events) and upstream.models_during_generation == 0


async def test_a_model_that_leaves_during_a_generation_is_noticed_once_the_upstream_is_idle() -> None:
    upstream = HeldUpstream(like_llama_cpp=True)
    async with answering(upstream) as (front, state, answer):
        upstream.models = ["another-model"]
        await next_looks(state, 3)
        assert state.health.ready, "not read while the answer is generated"
        upstream.release.set()
        assert complete(await answer)
        await eventually(lambda: not state.health.ready)
        status, error = await front.post(CHAT)
    assert status == 503 and "the upstream no longer serves the model this endpoint offers" in error["error"]["message"]


async def test_a_model_list_read_that_fails_once_a_request_began_leaves_the_upstream_ready(caplog: pytest.LogCaptureFixture) -> None:
    """The read began while idle; a buyer's request came before its answer and waits for it: a
    failure then refuses nobody already admitted, and the buyer is served. Once idle again, the
    same failure counts."""
    upstream = HeldUpstream(like_llama_cpp=True)
    async with fronted(upstream) as front:
        state = front.backend.state
        assert state is not None
        upstream.models_held.clear()
        upstream.models_gate = asyncio.Event()
        await asyncio.wait_for(upstream.models_held.wait(), 30)
        answer = asyncio.create_task(front.stream(CHAT))
        await eventually(lambda: state.idle_read.held == 1)
        upstream.models_status = 500
        upstream.models_gate.set()
        await next_looks(state, 3)
        assert state.health.ready and (await front.health())[0] == 200
        upstream.release.set()
        assert complete(await answer)
        await eventually(lambda: not state.health.ready)
        status, health = await front.health()
    message = health["error"]["message"]
    assert status == 503 and "the upstream does not list its models: /v1/models answered 500" in message
    assert "127.0.0.1" not in message
    assert any(f"{front.backend.client.base_url}/models answered 500" in r.getMessage() for r in caplog.records), "the log names the URL"


# 2. The health checks never wait behind buyers' connections, however many.


async def test_more_streams_than_a_connection_pool_holds_leave_the_upstream_ready() -> None:
    upstream = HeldUpstream()
    async with fronted(upstream) as front, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as buyers:
        state = front.backend.state
        assert state is not None
        answers = [asyncio.create_task(stream(buyers, front.url)) for _ in range(MANY)]
        await eventually(lambda: state.counters.in_flight == MANY)
        await next_looks(state)
        assert state.health.ready and (await front.health())[0] == 200
        await eventually(lambda: upstream.open == MANY), "every buyer's stream reaches the upstream, none waits in our pool"
        upstream.release.set()
        results = await asyncio.gather(*answers)
        rows = front.ledger.rows
    assert all(complete(events) for events in results) and len(rows) == MANY


class EngineDouble(HeldUpstream):
    """A launched engine's HTTP surface (vLLM's): /health, /metrics, and completions, whose streams
    are held open; the 1-token readiness check is answered at once."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.answer)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/completions", self.complete_or_hold)
        return app

    async def complete_or_hold(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"choices": [{"text": "x", "index": 0, "finish_reason": "length"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
        return await self.held_stream(request, body)


async def test_a_launched_engine_under_more_streams_than_a_pool_holds_is_not_restarted() -> None:
    engine = EngineDouble()
    engine.metrics_text = "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
    async with TestServer(engine.app(), host="127.0.0.1") as http:
        client = UpstreamClient(str(http.make_url("/v1")))
        state = FrontState("org/m", client, "org/m", slots_total=4)
        supervisor = Supervisor(state, "vllm", SLEEPER, ready_timeout=20, check_interval=0.05, stall_after=0.5, stop_timeout=5)
        watch = asyncio.create_task(supervisor.run())
        try:
            async with TestServer(create_front_app(state, max_body_bytes=1 << 16), host="127.0.0.1") as front:
                await asyncio.wait_for(supervisor.ready.wait(), 20)
                assert supervisor.process is not None
                first = supervisor.process.pid
                url = str(front.make_url("")).rstrip("/")
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as buyers:
                    body = {"model": "org/m", "prompt": "Once upon a time"}
                    answers = [asyncio.create_task(stream(buyers, url, body, "/v1/completions")) for _ in range(MANY)]
                    await eventually(lambda: state.counters.in_flight == MANY)
                    await next_looks(state, 3)
                    assert state.health.ready and supervisor.last_failure == ""
                    assert supervisor.process.pid == first, "the engine was not restarted"
                    await eventually(lambda: engine.open == MANY), "every stream reaches the engine, none waits in our pool"
                    engine.release.set()
                    results = await asyncio.gather(*answers)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            await client.close()
    assert all(complete(events) for events in results)


# 3. Buyers read one plain cause; the provider's log names the upstream.

INTERNALS = ("ssl:default", "Cannot connect", "Connect call failed", "TransferEncodingError", "payload", "<", "127.0.0.1")


async def test_a_buyer_is_told_the_upstream_refused_the_connection_without_its_address() -> None:
    async with contextlib.AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(TestServer(HostileUpstream().app(), host="127.0.0.1"))
        url, backend, buyer = await stack.enter_async_context(front_before(str(upstream.make_url("/v1")), check_interval=3600))
        port = str(upstream.port)
        await upstream.close()  # gone since the watch's last look
        async with buyer.post(url + "/v1/chat/completions", json=CHAT) as response:
            status, error = response.status, await response.json()
    message = error["error"]["message"]
    assert status == 502 and message.endswith("the model server refused the connection")
    assert not any(internal in message for internal in (*INTERNALS, port))


async def test_a_stream_cut_mid_way_is_told_in_plain_words() -> None:
    upstream = HostileUpstream()

    async def cut(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(event(chunk("Once")))
        assert request.transport is not None
        request.transport.close()
        raise ConnectionResetError

    upstream.generation = cut
    async with fronted(upstream) as front:
        events = await front.stream(CHAT)
    message = events[-1]["error"]["message"]
    assert "the connection closed before the answer was complete" in message
    assert not any(internal in message for internal in INTERNALS)


async def test_an_upstream_that_stops_answering_is_unavailable_without_its_address_and_logged_with_it(caplog: pytest.LogCaptureFixture) -> None:
    async with contextlib.AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(TestServer(HostileUpstream().app(), host="127.0.0.1"))
        url, backend, buyer = await stack.enter_async_context(front_before(str(upstream.make_url("/v1"))))
        port = upstream.port
        await upstream.close()
        assert backend.state is not None
        await eventually(lambda: not backend.state.health.ready)
        answers = []
        for path in ("/health", "/v1/models"):
            async with buyer.get(url + path) as response:
                answers.append((response.status, (await response.json())["error"]["message"]))
    assert [status for status, _ in answers] == [503, 503]
    for _, message in answers:
        assert "the upstream server does not answer" in message and str(port) not in message and "127.0.0.1" not in message
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"upstream not ready: the upstream server at http://127.0.0.1:{port} does not answer" in logged


class DefaultLlamaCppServer(LlamaCppServer):
    """``python -m llama_cpp.server`` with its default ``interrupt_requests``: a request waiting for
    the model stops the stream that holds it."""

    def __init__(self, n_ctx: int = 512) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(TINY_MODEL), "--host", "127.0.0.1", "--port", str(self.port),
             "--n_ctx", str(n_ctx), "--verbose", "False"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )


@contextlib.asynccontextmanager
async def front_before(upstream_url: str, **options: Any) -> AsyncIterator[tuple[str, UpstreamBackend, aiohttp.ClientSession]]:
    """Our front, served for real on localhost, before the upstream at ``upstream_url``; ready when entered."""
    settings = {"model": MODEL, "upstream_model": None, "url": upstream_url, "check_interval": 0.05, **options}
    backend = UpstreamBackend(UpstreamOptions("upstream", **settings))
    await backend.prepare()
    try:
        app = backend.create_app(None, 1 << 16)
        async with TestServer(app, host="127.0.0.1") as front, aiohttp.ClientSession() as buyer:
            assert await backend.start(asyncio.Event())
            yield str(front.make_url("")).rstrip("/"), backend, buyer
    finally:
        await backend.close()
