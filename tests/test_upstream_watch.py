"""Watching a server the provider runs: /health stays honest whatever the upstream's /metrics
and /v1/models say, an error nobody foresaw never leaves a dead watch behind a /health that says
ok, a wrong --upstream-model is refused at start, and the requests waiting on an upstream that
stopped answering end once the watch gives it up, while a slow one that still answers goes on.

The upstream is ``tests/doubles/hostile_upstream.py``, a small real aiohttp server; the front in
between is ours, served for real on localhost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from doubles.hostile_upstream import CHAT, MODEL, HostileUpstream, chunk, event, fronted, hang, whole

from vramsupply.upstream.front import FrontState

from vramsupply.upstream import UpstreamBackend, UpstreamError, UpstreamOptions


async def eventually(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.05)


async def next_looks(state: FrontState, count: int) -> None:
    """Until the watch has finished ``count`` more looks at the upstream."""
    for _ in range(count):
        before = state.health.checked_at
        await eventually(lambda: state.health.checked_at != before)


async def stream_head(request: web.Request, first: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(event(chunk(first)))
    return response


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_request_waiting_on_an_upstream_that_stopped_answering_ends_once_the_watch_gives_it_up(
    stream: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream froze mid-answer (SIGSTOP: it still takes connections, and answers nothing).
    The buyer's request waited out the 600 s bound for its 504, long after the watch had found
    /health unanswered; it now ends then, saying so, and new requests get 503 meanwhile."""
    monkeypatch.setattr("vramsupply.upstream.client.PROBE_TIMEOUT", aiohttp.ClientTimeout(total=2))  # the watch's wait for /health
    monkeypatch.setattr("vramsupply.upstream.exchange.SETTLE_AFTER_FAILURE_SECONDS", 1.0)  # counting the stream asks the frozen upstream
    upstream = HostileUpstream()

    async def freezes_mid_answer(request: web.Request, body: dict[str, object]) -> web.StreamResponse:
        response = await stream_head(request, "Once") if stream else None
        upstream.stopped = True
        await hang()
        assert response is not None
        return response

    upstream.generation = freezes_mid_answer
    async with fronted(upstream, stall_after=0) as front:
        if stream:
            events = await asyncio.wait_for(front.stream(CHAT), 60)  # well before any bound of the relay's
            assert events[0]["choices"][0]["delta"]["content"] == "Once" and "[DONE]" not in events
            error = events[-1]["error"]
        else:
            status, answer = await asyncio.wait_for(front.post(CHAT), 60)
            assert status == 504
            error = answer["error"]
        assert error["code"] == "upstream_timeout" and error["type"] == "server_error"
        assert "stopped answering (its /health has not answered for" in error["message"]
        status, refused = await front.post(CHAT)
        assert (status, refused["error"]["code"]) == (503, "upstream_unavailable")
        assert "the upstream server does not answer" in refused["error"]["message"]
        upstream.stopped = False  # SIGCONT: what still waits on it ends


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_long_generation_goes_on_while_the_upstream_answers_its_health_checks(stream: bool) -> None:
    """Only silence gives the upstream up: an answer that takes many looks of the watch, with no
    stall window at all, still reaches the buyer whole."""
    upstream = HostileUpstream()
    async with fronted(upstream, stall_after=0) as front:
        assert front.backend.state is not None
        state = front.backend.state

        async def slow(request: web.Request, body: dict[str, object]) -> web.StreamResponse:
            if not stream:
                await next_looks(state, 5)
                return web.json_response(whole("Once upon a time", usage={"prompt_tokens": 5, "completion_tokens": 4}))
            response = await stream_head(request, "Once")
            await next_looks(state, 5)
            await response.write(event(chunk(" upon a time")) + event(chunk(usage={"prompt_tokens": 5, "completion_tokens": 4})) + event("[DONE]"))
            await response.write_eof()
            return response

        upstream.generation = slow
        if stream:
            events = await front.stream(CHAT)
            assert "".join(e["choices"][0]["delta"]["content"] for e in events[:-1] if e["choices"]) == "Once upon a time"
            assert events[-1] == "[DONE]"
        else:
            status, answer = await front.post(CHAT)
            assert (status, answer["choices"][0]["message"]["content"]) == (200, "Once upon a time")


async def test_a_nan_gauge_leaves_health_honest(caplog: pytest.LogCaptureFixture) -> None:
    upstream = HostileUpstream()
    upstream.metrics_text = "llamacpp:requests_processing NaN\nllamacpp:requests_deferred +Inf\nllamacpp:kv_cache_usage_ratio 0.5\n"
    async with fronted(upstream) as front:
        await asyncio.sleep(0.3)  # several looks at the NaN
        status, health = await front.health()
        assert status == 200 and (health["slots_busy"], health["queue"]) == (0, 0), "a NaN is no load"

        upstream.healthy = False
        await eventually(lambda: front.backend.state is not None and not front.backend.state.health.ready)
        status, health = await front.health()
        assert status == 503 and "/health answers 500" in health["error"]["message"], "the watch is still alive"
    assert not [r for r in caplog.records if r.exc_info]


async def test_an_unforeseen_error_while_looking_marks_the_upstream_not_ready_and_the_watch_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with fronted(HostileUpstream()) as front:

        def broken(*args: object) -> None:
            raise RuntimeError("a bug of ours")

        with monkeypatch.context() as patch:
            patch.setattr("vramsupply.upstream.monitor.read_load", broken)
            await eventually(lambda: front.backend.state is not None and not front.backend.state.health.ready)
            status, health = await front.health()
            assert status == 503 and "cannot tell whether the upstream is ready (RuntimeError: a bug of ours)" in health["error"]["message"]
            status, error = await front.post(CHAT)
            assert (status, error["error"]["code"]) == (503, "upstream_unavailable")
            await asyncio.sleep(0.3)
        await eventually(lambda: front.backend.state is not None and front.backend.state.health.ready)
        assert (await front.health())[0] == 200
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "failed unexpectedly" in tracebacks[0].getMessage(), "logged once, with its traceback"


async def test_a_watch_that_dies_ends_serving_with_its_reason(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async with fronted(HostileUpstream()) as front:

        def broken(*args: object) -> None:
            raise RuntimeError("a bug of ours")

        monkeypatch.setattr("vramsupply.upstream.monitor.set_ready", broken)
        await eventually(lambda: front.backend.stats().failure is not None)
        assert front.backend.stats().failure == "watching the upstream engine failed (RuntimeError: a bug of ours)"
        status, health = await front.health()
        assert status == 503 and "a bug of ours" in health["error"]["message"]
    [died] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert died.exc_info is not None, "logged with its traceback; serve's engine watch then exits 1 naming it"


async def test_a_wrong_upstream_model_is_refused_at_start_naming_what_the_upstream_lists() -> None:
    upstream = HostileUpstream()
    upstream.models = ["qwen3:latest", "llama3.1:8b"]
    async with TestServer(upstream.app(), host="127.0.0.1") as http:
        url = str(http.make_url("/v1"))

        async def upstream_model_of(name: str) -> str:
            backend = UpstreamBackend(UpstreamOptions("upstream", model=MODEL, upstream_model=name, url=url))
            try:
                await backend.prepare()
                return backend.upstream_model
            finally:
                await backend.close()

        with pytest.raises(UpstreamError, match=r"does not serve qwen3:8b: --upstream-model must be one of the models it lists \(qwen3:latest, llama3.1:8b\)"):
            await upstream_model_of("qwen3:8b")
        assert await upstream_model_of("LLAMA3.1:8B") == "llama3.1:8b", "the upstream's own spelling"
        assert await upstream_model_of("qwen3") == "qwen3:latest", "as Ollama names it"


async def test_a_model_that_leaves_the_upstream_makes_the_front_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    upstream = HostileUpstream()
    with caplog.at_level("INFO", logger="vramsupply"):
        async with fronted(upstream) as front:
            upstream.models = ["another-model"]
            await eventually(lambda: front.backend.state is not None and not front.backend.state.health.ready)
            status, error = await front.post(CHAT)
    # buyers read it (and /health): it named the model's file and what else the upstream serves
    assert status == 503 and "the upstream no longer serves the model this endpoint offers" in error["error"]["message"]
    assert "another-model" not in error["error"]["message"] and "gguf" not in error["error"]["message"]
    assert any("does not serve qwen3-8b-q4_k_m.gguf (it lists: another-model)" in r.getMessage() for r in caplog.records), "the provider's log says it"


async def test_an_upstream_that_wants_a_key_points_to_the_key_setting() -> None:
    upstream = HostileUpstream()
    upstream.models_status = 401
    async with TestServer(upstream.app(), host="127.0.0.1") as http:
        backend = UpstreamBackend(UpstreamOptions("upstream", model=None, upstream_model=None, url=str(http.make_url("/v1"))))
        with pytest.raises(UpstreamError, match="refuses our credentials .*: pass its key with --upstream-api-key"):
            await backend.prepare()
