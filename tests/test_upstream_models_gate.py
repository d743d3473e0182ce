"""The watch's idle-time ``/v1/models`` read never meets a buyer's request at the upstream.

llama_cpp.server makes ``/v1/models`` take the lock generation holds, and by default a request
waiting for that lock stops the stream that holds it. The watch already read the list only while
nothing was in flight, but a buyer's request that came during the read went straight on to the
upstream: there it could be cut by the read, or hold the read up until a healthy server looked
slow. Now the read claims a gate in the same step as it finds the front idle, and a request that
comes meanwhile waits at the gate, in the agent, until the read has ended; a read that hangs holds
it no longer than the read's own timeout.

The upstream is ``tests/doubles/hostile_upstream.py``'s small real aiohttp server, whose
``/v1/models`` the test holds open; the front in between is ours, served for real on localhost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from doubles.hostile_upstream import CHAT, Front, HostileUpstream, fronted

from vramsupply.upstream import monitor
from vramsupply.upstream.front import FrontState

SAFETY = 30.0
"""How long a test waits for what must happen before it calls it a failure (never a pass)."""


class ListingUpstream(HostileUpstream):
    """An upstream whose ``/v1/models`` reads the test can hold open (``hold``), and which notes,
    for each generation request it receives, how many of those reads were then under way."""

    def __init__(self) -> None:
        super().__init__()
        self.release: asyncio.Event | None = None
        self.reading = asyncio.Event()
        """Set once a held read has come in."""
        self.reads_open = 0
        self.generations: list[int] = []
        """Per generation request received: the ``/v1/models`` reads under way as it arrived."""

    def hold(self) -> asyncio.Event:
        """From now on, each ``/v1/models`` read waits for the event returned (``release``)."""
        self.release = asyncio.Event()
        self.reading.clear()
        return self.release

    async def answer(self, request: web.Request) -> web.Response:
        if request.path == "/v1/models" and self.release is not None:
            self.reads_open += 1
            self.reading.set()
            try:
                await self.release.wait()
            finally:
                self.reads_open -= 1
        return await super().answer(request)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.generations.append(self.reads_open)
        return await super().generate(request)


async def eventually(condition: Callable[[], object]) -> None:
    deadline = time.monotonic() + SAFETY
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.01)


async def read_under_way(upstream: ListingUpstream) -> asyncio.Event:
    """Until the watch's next ``/v1/models`` read is held open at the upstream; what releases it."""
    release = upstream.hold()
    await asyncio.wait_for(upstream.reading.wait(), SAFETY)
    return release


def skip_ahead(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Move the event loop's clock on by ``seconds``: the timers due by then fire now, as they would
    had the upstream hung that long (a test that waits on events, not on the wall clock)."""
    loop = asyncio.get_running_loop()
    now = loop.time
    monkeypatch.setattr(loop, "time", lambda: now() + seconds)


@contextlib.asynccontextmanager
async def buyer_held_at_the_gate(
    upstream: ListingUpstream,
) -> AsyncIterator[tuple[Front, FrontState, asyncio.Event, asyncio.Task[tuple[int, Any]]]]:
    """Our front before ``upstream``, its idle-time ``/v1/models`` read held open there, and a
    buyer's chat request waiting at the gate: the front, its state, what releases the read, the answer."""
    async with fronted(upstream) as front:
        state = front.backend.state
        assert isinstance(state, FrontState)
        release = await read_under_way(upstream)
        answer = asyncio.create_task(front.post(CHAT))
        await eventually(lambda: state.idle_read.held == 1)
        yield front, state, release, answer


async def test_a_buyer_who_comes_during_the_idle_models_read_is_forwarded_only_once_it_ends() -> None:
    upstream = ListingUpstream()
    async with buyer_held_at_the_gate(upstream) as (front, state, release, answer):
        assert upstream.generations == [], "a buyer's request reached the upstream during its /v1/models read"

        release.set()
        status, body = await answer
    assert status == 200 and body["choices"][0]["message"]["content"] == "hi there", body
    assert upstream.generations == [0], "forwarded once, after the read had ended"
    assert state.idle_read.held == 0 and state.counters.in_flight == 0


async def test_a_models_read_that_hangs_past_its_timeout_lets_the_waiting_buyer_through(monkeypatch: pytest.MonkeyPatch) -> None:
    upstream = ListingUpstream()
    async with buyer_held_at_the_gate(upstream) as (front, state, release, answer):
        assert upstream.generations == []

        skip_ahead(monkeypatch, monitor.MODELS_READ_SECONDS + 1)  # the read hangs on, past its timeout
        status, body = await asyncio.wait_for(answer, SAFETY)
        assert status == 200, body
        assert len(upstream.generations) == 1
        assert state.health.ready and (await front.health())[0] == 200, "one hung read while a buyer waited refuses nobody"
        release.set()  # the double's own handler may now end


async def test_a_models_read_that_fails_while_a_buyer_waits_leaves_the_buyer_served_and_the_next_idle_look_tells() -> None:
    upstream = ListingUpstream()
    async with buyer_held_at_the_gate(upstream) as (front, state, release, answer):

        upstream.models_status = 500
        release.set()
        status, _ = await answer
        assert status == 200 and upstream.generations == [0]
        await eventually(lambda: not state.health.ready)
        status, health = await front.health()
    assert status == 503 and "the upstream does not list its models: /v1/models answered 500" in health["error"]["message"]
