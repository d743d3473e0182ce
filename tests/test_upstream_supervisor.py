"""Watching an upstream without a model behind it: a launched engine whose /health stalls is
stopped and started again (the requests waiting on it ended first), and a llama-server's own
context, slots and load are read.

The "engine" here is two test doubles side by side: a process that only sleeps (what is started,
watched and stopped) and an in-process aiohttp app playing its HTTP surface, whose /health the
test turns bad and good again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from llama_server_surface import LlamaServerSurface
from vramsupply.platform import Backoff
from vramsupply.upstream import UpstreamBackend, UpstreamOptions
from vramsupply.upstream.client import UpstreamClient
from vramsupply.upstream.front import FrontState, create_front_app
from vramsupply.upstream.supervisor import EngineProcess, Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


class EngineSurface:
    def __init__(self) -> None:
        self.healthy = True
        self.completions = 0
        self.metrics_text = "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\n"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/completions", self.complete)
        return app

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 500)

    async def complete(self, request: web.Request) -> web.Response:
        self.completions += 1
        return web.json_response({"choices": [{"text": "x"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})


async def eventually(condition, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_stalled_engine_is_restarted_and_ready_only_after_a_real_completion() -> None:
    surface = EngineSurface()
    async with TestServer(surface.app(), host="127.0.0.1") as http:
        client = UpstreamClient(str(http.make_url("/v1")))
        state = FrontState("org/m", client, "org/m", slots_total=4)
        supervisor = Supervisor(state, "vllm", SLEEPER, ready_timeout=20, check_interval=0.1, stall_after=0.5, stop_timeout=5, backoff=Backoff(initial=0.05, cap=0.1))
        task = asyncio.create_task(supervisor.run())
        try:
            await asyncio.wait_for(supervisor.ready.wait(), 20)
            assert state.health.ready and surface.completions == 1, "ready after /health 200 and one real completion"
            assert supervisor.process is not None and supervisor.process.pid is not None
            first = supervisor.process.pid

            surface.healthy = False
            await eventually(lambda: not state.health.ready)
            await eventually(lambda: supervisor.process is not None and supervisor.process.pid != first)
            assert not alive(first), "the stalled engine's process is stopped"
            assert "health stalled for 0.5s" in supervisor.last_failure

            surface.healthy = True
            await eventually(lambda: state.health.ready)
            assert surface.completions == 2
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.close()
        assert supervisor.process is not None and supervisor.process.pid is not None
        assert not alive(supervisor.process.pid), "cancelling the supervisor stops the engine"


class FreezingEngine(EngineSurface):
    """An engine that freezes (SIGSTOP) in a buyer's generation: that generation and every look at
    its /health from then on get no answer. Its readiness completion is answered."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False

    async def health(self, request: web.Request) -> web.Response:
        while self.frozen:
            await asyncio.sleep(0.05)
        return await super().health(request)

    async def complete(self, request: web.Request) -> web.Response:
        if self.completions:  # past the readiness check: a buyer's
            self.frozen = True
            await asyncio.sleep(3600)
        return await super().complete(request)


async def test_a_request_waiting_on_a_stalled_engine_ends_as_the_engine_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen engine dies only at its stop timeout after the stall (SIGTERM waits while it is
    stopped), and the buyer's request with it; with an engine whose connections outlive its
    process, as here, it waited out the 600 s bound. It now ends when the stall is declared."""
    monkeypatch.setattr("vramsupply.upstream.client.PROBE_TIMEOUT", aiohttp.ClientTimeout(total=1))  # the watch's wait for /health
    surface = FreezingEngine()
    async with TestServer(surface.app(), host="127.0.0.1") as http:
        client = UpstreamClient(str(http.make_url("/v1")))
        state = FrontState("org/m", client, "org/m", slots_total=4)
        supervisor = Supervisor(state, "vllm", SLEEPER, ready_timeout=20, check_interval=0.05, stall_after=0.5, stop_timeout=5, backoff=Backoff(initial=0.05, cap=0.1))
        task = asyncio.create_task(supervisor.run())
        try:
            async with TestServer(create_front_app(state, max_body_bytes=1 << 16), host="127.0.0.1") as front, aiohttp.ClientSession() as buyer:
                await asyncio.wait_for(supervisor.ready.wait(), 20)
                assert supervisor.process is not None
                first = supervisor.process.pid
                answer = buyer.post(front.make_url("/v1/completions"), json={"model": "org/m", "prompt": "Once upon a time"})
                async with await asyncio.wait_for(answer, 60) as response:  # well before the 600 s bound
                    status, error = response.status, (await response.json())["error"]
                await eventually(lambda: supervisor.process is not None and supervisor.process.pid not in (None, first))  # restarted
        finally:
            surface.frozen = False
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.close()
    assert (status, error["code"]) == (504, "upstream_timeout")
    assert "it is being restarted (vllm's health stalled for 0.5s: the vllm server does not answer)" in error["message"]
    assert "health stalled for 0.5s" in supervisor.last_failure


async def test_a_llama_server_upstream_states_its_context_slots_and_load() -> None:
    async with TestServer(LlamaServerSurface().app(), host="127.0.0.1") as http:
        backend = UpstreamBackend(UpstreamOptions("upstream", model="qwen/qwen3-8b", upstream_model=None, url=str(http.make_url("/v1"))))
        model = await backend.prepare()
        backend.create_app("token", 1024)
        try:
            assert await backend.start(asyncio.Event())
            assert (model.model_id, backend.upstream_model, backend.n_ctx, backend.slots) == ("qwen/qwen3-8b", "qwen3-8b-q4_k_m.gguf", 8192, 8)
            stats = backend.stats()
            assert (stats.slots_total, stats.slots_busy, stats.queue_depth) == (8, 3, 2), "heartbeats read the upstream's own gauges"
        finally:
            await backend.close()


def copied_lines_now(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("[fake]")]


async def copied_lines(caplog: pytest.LogCaptureFixture, count: int) -> None:
    """Until the copy of the engine's output logged ``count`` lines (it reads on after the exit)."""
    for _ in range(200):
        if len(copied_lines_now(caplog)) >= count:
            return
        await asyncio.sleep(0.05)


async def test_an_engine_line_longer_than_the_reader_limit_is_skipped_and_its_output_still_read(caplog: pytest.LogCaptureFixture) -> None:
    """asyncio's line reader refuses lines over 64 KiB. Before, that ended the copy of the
    engine's output, and an engine that went on logging blocked once the pipe was full."""
    script = "import sys; print('x' * 200_000); print('after the long line'); print('y' * 100_000, flush=True); print('z' * 70_000)"
    engine = EngineProcess("fake", [sys.executable, "-c", script])
    with caplog.at_level(logging.INFO, logger="vramsupply.upstream"):
        await engine.start()
        assert await asyncio.wait_for(engine.wait(), 20) == 0
        await copied_lines(caplog, 1)  # the copy reads what the process wrote before it exited
    assert copied_lines_now(caplog) == ["[fake] after the long line"]


async def test_a_nan_gauge_does_not_end_the_supervision_of_a_launched_engine() -> None:
    """Before, ``int(NaN)`` killed the supervisor: the engine was stopped, /health stayed ok, and
    every buyer got a 502 with nothing in the log."""
    surface = EngineSurface()
    surface.metrics_text = "vllm:num_requests_running NaN\nvllm:num_requests_waiting +Inf\n"
    async with TestServer(surface.app(), host="127.0.0.1") as http:
        client = UpstreamClient(str(http.make_url("/v1")))
        state = FrontState("org/m", client, "org/m", slots_total=4)
        supervisor = Supervisor(state, "vllm", SLEEPER, ready_timeout=20, check_interval=0.05, stop_timeout=5)
        task = asyncio.create_task(supervisor.run())
        try:
            await asyncio.wait_for(supervisor.ready.wait(), 20)
            await asyncio.sleep(0.3)  # several looks at the NaN
            assert not task.done() and state.health.ready
            assert supervisor.process is not None and supervisor.process.returncode is None, "the engine still runs"
            surface.healthy = False
            await eventually(lambda: not state.health.ready)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.close()


class CountingBackoff(Backoff):
    def delay(self, attempt: int, rng: object = None) -> float:
        ATTEMPTS.append(attempt)
        return 0.01


ATTEMPTS: list[int] = []


async def test_an_engine_that_crashes_soon_after_each_start_is_restarted_ever_more_slowly() -> None:
    surface = EngineSurface()
    crashing = [sys.executable, "-c", "import time; time.sleep(0.3)"]
    ATTEMPTS.clear()
    async with TestServer(surface.app(), host="127.0.0.1") as http:
        client = UpstreamClient(str(http.make_url("/v1")))
        state = FrontState("org/m", client, "org/m", slots_total=4)
        supervisor = Supervisor(state, "vllm", crashing, ready_timeout=20, check_interval=0.05, stop_timeout=5, backoff=CountingBackoff())
        task = asyncio.create_task(supervisor.run())
        try:
            await eventually(lambda: len(ATTEMPTS) >= 3)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.close()
    assert ATTEMPTS[:3] == [0, 1, 2], "the backoff doubles: a short-lived ready does not reset it"


async def test_binary_engine_output_is_escaped_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    script = "import sys; sys.stdout.buffer.write(b'\\x1b[31mred\\x00 bell\\x07\\n'); sys.stdout.flush()"
    engine = EngineProcess("fake", [sys.executable, "-c", script])
    with caplog.at_level(logging.INFO, logger="vramsupply.upstream"):
        await engine.start()
        assert await asyncio.wait_for(engine.wait(), 20) == 0
        await copied_lines(caplog, 1)
    assert copied_lines_now(caplog) == ["[fake] \\x1b[31mred\\x00 bell\\x07"]
