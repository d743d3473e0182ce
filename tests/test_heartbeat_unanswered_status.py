"""A listed agent whose heartbeat goes unanswered says so honestly: `registered` while the platform
surely still lists it, `unreachable` once it may not.

The platform lists an instance offline only after 180 s without a heartbeat (docs/platform-api.md).
A heartbeat answered too late (a loaded gateway) most likely reached it, and is sent again with its
``Idempotency-Key`` anyway; the agent still called itself `unreachable`, and `vramsupply status`
exited 3 ("not listed"), until the next heartbeat got through. Now it stays `registered`, with a note,
until no heartbeat has been answered for half that limit; a platform that refuses connections is
still `unreachable` at once.

A provider's session: the real server on the tiny model, the real lifecycle heartbeating to the
reference platform, which takes each heartbeat but holds its answer until the test releases it, and
`vramsupply status --json` as the provider runs it. The lifecycle's clock is one the test moves, so
"half the silence limit" takes no waiting; nothing here is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from conftest import run_cli
from live_platform import API_KEY, LivePlatform, free_port
from live_server import LiveServer
from test_heartbeat_answered_late import AGENT_TIMEOUT, _Identity
from test_platform_lifecycle import EngineCounters, eventually
from test_platform_ops_review import Clock, said

from vramsupply.config import Settings
from vramsupply.engine.types import EngineStats
from vramsupply.platform import Backoff, Phase, PlatformClient, ProviderLifecycle, build_offer
from vramsupply.platform.api import HEARTBEAT_PATH
from vramsupply.platform.state import default_state_path
from vramsupply.serve.options import market_options


class HeldAnswers:
    """Middleware of the reference platform: once ``hold()`` is called, every heartbeat is taken
    (counted) as the platform takes any, but answered only at ``release()``. ``held``: how many."""

    def __init__(self) -> None:
        self.held = 0
        self._released = threading.Event()
        self._released.set()

    def hold(self) -> None:
        self._released.clear()

    def given_up(self) -> bool:
        """The agent gave up on a held answer: it sent the heartbeat again."""
        return self.held >= 2

    def release(self) -> None:
        self._released.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        answer = await handler(request)
        if request.path != HEARTBEAT_PATH or self._released.is_set():
            return answer
        self.held += 1
        while not self._released.is_set():
            await asyncio.sleep(0.02)
        return answer


@contextlib.asynccontextmanager
async def listed_agent(held: HeldAnswers, clock: Clock, unavailable: str | None = None) -> AsyncIterator[ProviderLifecycle]:
    """The agent serving the tiny model, registered with the reference platform, which ``held`` slows;
    ``unavailable``: why its engine says it cannot serve right now (the agent then heartbeats offline)."""
    platform = LivePlatform()
    platform.platform.app.middlewares.append(held.middleware)
    with platform:
        async with LiveServer(parallel=2) as live:
            assert live.engine is not None
            settings = Settings(endpoint_url="https://gpu.example.com", endpoint_token="tok")
            offer = build_offer(market_options(settings), _Identity(), served_context=live.engine.n_ctx, endpoint_token="tok")
            client = PlatformClient(platform.url, API_KEY, attempts=1, timeout=AGENT_TIMEOUT)
            engine = live.engine

            def stats() -> EngineStats:
                return dataclasses.replace(engine.stats(), unavailable=unavailable)

            lifecycle = ProviderLifecycle(
                client, offer.request, stats, heartbeat_interval=0.2, backoff=Backoff(initial=0.05, cap=0.2),
                state_path=default_state_path(), local_url=live.url, clock=clock,
            )  # fmt: skip
            lifecycle.start()
            await asyncio.wait_for(lifecycle.registered.wait(), 10)
            try:
                yield lifecycle
            finally:
                held.release()
                await lifecycle.stop(timeout=5)


async def status() -> tuple[int, dict[str, Any]]:
    """`vramsupply status --json`: its exit code and the registration it shows."""
    result = await asyncio.to_thread(run_cli, "status", "--json", env={"VRAM_SUPPLY_PORT": str(free_port())})
    return result.returncode, json.loads(result.stdout)["registration"]


async def test_a_heartbeat_answered_too_late_leaves_the_agent_registered(caplog: pytest.LogCaptureFixture) -> None:
    held = HeldAnswers()
    with caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        async with listed_agent(held, Clock()) as lifecycle:
            held.hold()
            await eventually(held.given_up, timeout=10)
            code, registration = await status()
            assert code == 0, "still listed: the platform drops an instance only after 180 s without heartbeats"
            assert registration["phase"] == "registered" and registration["provider_id"] == lifecycle.provider_id
            assert "the last heartbeat went unanswered" in registration["message"] and "resending it" in registration["message"]

            held.release()  # the answer comes, late
            await eventually(lambda: lifecycle.message.startswith("heartbeats accepted"), timeout=10)
            code, registration = await status()
            assert code == 0 and registration["phase"] == "registered"
    assert said(caplog, "unreachable") == [], "never said to be down"
    assert len(said(caplog, "got no answer")) == 1 and len(said(caplog, "sent again with its Idempotency-Key, and answered")) == 1


async def test_heartbeats_unanswered_for_half_the_silence_limit_show_the_platform_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    held, clock = HeldAnswers(), Clock()
    with caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        async with listed_agent(held, clock) as lifecycle:
            held.hold()
            await eventually(held.given_up, timeout=10)
            assert lifecycle.phase is Phase.registered and "went unanswered" in lifecycle.message
            clock.now += 90  # no heartbeat answered for half the platform's 180 s: it may drop the instance within the next beats
            await eventually(lambda: lifecycle.phase is Phase.unreachable, timeout=10)
            code, registration = await status()
            assert code == 3 and registration["phase"] == "unreachable"
            assert "no heartbeat answered for 90 s" in registration["message"]

            held.release()
            await eventually(lambda: lifecycle.phase is Phase.registered, timeout=10)
            code, registration = await status()
            assert code == 0 and registration["phase"] == "registered"
    [down] = said(caplog, "platform unreachable")
    assert "no heartbeat answered for 90 s" in down.getMessage()


async def test_an_agent_listed_offline_stays_offline_for_why_through_an_unanswered_heartbeat(caplog: pytest.LogCaptureFixture) -> None:
    """Its upstream is down, so it told the platform to route nothing to it: still listed, offline.
    One slow answer must not turn that into `unreachable`, nor lose why it is offline."""
    held, clock, down = HeldAnswers(), Clock(), "the upstream is not ready: the upstream server at http://127.0.0.1:8000 does not answer"
    with caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        async with listed_agent(held, clock, unavailable=down) as lifecycle:
            await eventually(lambda: lifecycle.phase is Phase.offline, timeout=10)
            why = lifecycle.message
            assert down in why
            held.hold()
            await eventually(held.given_up, timeout=10)
            clock.now += 30  # the beats after it go unanswered too, each counting the seconds without an answer
            await eventually(lambda: "none answered for 30 s" in lifecycle.message, timeout=10)
            code, registration = await status()
            assert code == 3, "offline: served nothing by the platform, as before the slow answer"
            assert registration["phase"] == "offline" and registration["provider_id"] == lifecycle.provider_id
            assert registration["message"].startswith(why) and "the last heartbeat went unanswered" in registration["message"]
            assert "resending it" in registration["message"]

            held.release()  # the answer comes, late: offline for the same reason, said once
            await eventually(lambda: lifecycle.message == why, timeout=10)
            assert lifecycle.phase is Phase.offline

            held.hold()
            await eventually(lambda: "went unanswered" in lifecycle.message, timeout=10)
            clock.now += 90  # no heartbeat answered for half the platform's 180 s silence limit
            await eventually(lambda: lifecycle.phase is Phase.unreachable, timeout=10)
            assert "no heartbeat answered for 90 s" in lifecycle.message
            assert lifecycle.message.endswith(f"listed offline before that: {why}"), "why it was offline, kept through the outage"
            beats = held.held
            await eventually(lambda: held.held >= beats + 2, timeout=10)  # the outage goes on, beat after beat
            code, registration = await status()
            assert code == 3 and registration["phase"] == "unreachable" and registration["message"].endswith(f"listed offline before that: {why}")
            assert len(said(caplog, down)) == 2, "why it is offline: said when it began (not at every beat nor on the late answer), and with the outage"
            assert len(said(caplog, "got no answer")) == 2, "once per run of unanswered heartbeats"
            assert len(said(caplog, "platform unreachable")) == 1


async def test_a_platform_that_refuses_connections_is_unreachable_at_once() -> None:
    """No doubt there (nothing reached it): the provider hears of it at the first failed heartbeat."""
    counters = EngineCounters()
    with LivePlatform() as platform:
        settings = Settings(endpoint_url="https://gpu.example.com", endpoint_token="tok")
        offer = build_offer(market_options(settings), _Identity(), served_context=2048, endpoint_token="tok")
        client = PlatformClient(platform.url, API_KEY, attempts=1, timeout=AGENT_TIMEOUT)
        lifecycle = ProviderLifecycle(client, offer.request, lambda: counters, heartbeat_interval=0.2, clock=Clock())
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 10)
    await eventually(lambda: lifecycle.phase is Phase.unreachable, timeout=10)  # the clock never moved: no silence at all
    assert "no heartbeat answered" not in lifecycle.message
    assert await lifecycle.stop(timeout=0.5) is False
