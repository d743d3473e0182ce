"""A platform that says when to ask again (``Retry-After`` on a 429 or 503) is not asked sooner.

The client waits what it asks within one call's timeout, and gives up at once, saying when the
platform asked to be retried, when that is past it; the lifecycle's endless register and heartbeat
loops wait at least what it asks, at most ten minutes, and shutdown still ends the wait at once. A
``Retry-After`` that is no usable instruction changes nothing: the normal backoff applies.

The waits are observed through the ``sleep`` the client and the lifecycle are given (a recorder
that returns at once, or holds until the test lets it go), or by counting requests: never by how
long something took.
"""

from __future__ import annotations

import asyncio
import logging
import time
from email.utils import formatdate
from typing import Any

import pytest
from aiohttp import web
from live_platform import API_KEY
from test_platform_hostile import PROVIDERS, HostilePlatform, answer, as_documented, client, lifecycle_with
from test_platform_lifecycle import EngineCounters, eventually

from vramsupply.platform import Backoff, Phase, PlatformClient, PlatformUnavailable

QUICK = Backoff(initial=0.01, cap=0.02)
"""The client's own backoff in these tests: far below any wait a platform asks for."""
LIFECYCLE_BACKOFF = Backoff(initial=0.05, cap=0.2)
"""The lifecycle's own backoff here: 50-200 ms between registers when the platform asks nothing."""


class Waits:
    """A ``sleep`` that records each wait asked of it, and is over at once, or, when ``held``,
    once the test calls ``release()``."""

    def __init__(self, *, held: bool = False) -> None:
        self.seconds: list[float] = []
        self._go = asyncio.Event()
        if not held:
            self._go.set()

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)
        await self._go.wait()

    def release(self) -> None:
        self._go.set()


def busy(status: int, retry_after: str) -> Any:
    return answer(status, {"error": {"message": "slow down"}}, headers={"Retry-After": retry_after})


def http_date(seconds_from_now: float) -> str:
    return formatdate(time.time() + seconds_from_now, usegmt=True)


# The client: within one call's timeout --------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
async def test_a_call_asks_again_only_after_the_seconds_the_platform_asked_for(status: int) -> None:
    waits = Waits()
    with HostilePlatform() as platform:
        platform.script("demand", busy(status, "3"), as_documented)
        async with client(platform, attempts=3, backoff=QUICK, timeout=10, sleep=waits) as api:
            assert (await api.demand()).models == []
        assert len(platform.requests("demand")) == 2
    assert waits.seconds == [3.0]


async def test_a_retry_after_given_as_an_http_date_is_waited_out_too() -> None:
    waits = Waits()
    with HostilePlatform() as platform:
        platform.script("demand", busy(503, http_date(6)), as_documented)
        async with client(platform, attempts=3, backoff=QUICK, timeout=10, sleep=waits) as api:
            assert (await api.demand()).models == []
    [waited] = waits.seconds
    # The date's whole seconds, less the moments since it was written, as the answer's own whole-second
    # Date says them: 4 when more than a second passed meanwhile (a loaded machine).
    assert 4 <= waited <= 6


async def test_a_retry_after_date_is_read_against_the_answers_own_date_not_our_clock() -> None:
    """The platform's clock an hour behind ours (or ours an hour ahead): its date six seconds past
    its own Date is still six seconds, not an hour in the past."""
    waits = Waits()
    their_now = time.time() - 3600
    headers = {"Retry-After": formatdate(their_now + 6, usegmt=True), "Date": formatdate(their_now, usegmt=True)}
    with HostilePlatform() as platform:
        platform.script("demand", answer(503, {"error": {"message": "slow down"}}, headers=headers), as_documented)
        async with client(platform, attempts=3, backoff=QUICK, timeout=10, sleep=waits) as api:
            assert (await api.demand()).models == []
    assert waits.seconds == [6.0]


async def test_the_next_try_really_comes_no_sooner_than_asked(aiohttp_server: Any) -> None:
    """With the real clock: the two requests of one call are at least the asked second apart
    (a loaded machine only widens the gap)."""
    seen: list[float] = []

    async def demand(request: web.Request) -> web.Response:
        seen.append(time.monotonic())
        if len(seen) == 1:
            return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "1"})
        return web.json_response({"models": []})

    app = web.Application()
    app.router.add_get("/v1/providers/demand", demand)
    server = await aiohttp_server(app)
    async with PlatformClient(str(server.make_url("")), API_KEY, attempts=3, backoff=QUICK, timeout=10) as api:
        assert (await api.demand()).models == []
    assert len(seen) == 2 and seen[1] - seen[0] >= 0.95


async def test_a_wait_past_the_calls_timeout_gives_up_at_once_saying_when_to_ask_again() -> None:
    with HostilePlatform() as platform:
        platform.script("demand", busy(429, "30"))
        async with client(platform, attempts=3, backoff=QUICK, timeout=10) as api:
            with pytest.raises(PlatformUnavailable) as info:
                await api.demand()
        assert len(platform.requests("demand")) == 1, "not asked again before it said, nor waited for past the timeout"
    assert str(info.value) == f"{platform.url} answered 429: slow down (it asks to be retried in 30 s)"
    assert info.value.retry_after == 30.0


@pytest.mark.parametrize(
    "retry_after",
    [
        "soon", "-5", "1.5", "0x10", "99999999999", "86401", "", "²",
        pytest.param(http_date(-60), id="a date past"),
        pytest.param(http_date(3 * 86_400), id="a date three days off"),
        pytest.param("Mon, 99 Foo 2020 99:99:99 GMT", id="no date"),
    ],
)  # fmt: skip
async def test_a_retry_after_that_is_no_usable_instruction_leaves_the_normal_backoff(retry_after: str) -> None:
    waits = Waits()
    with HostilePlatform() as platform:
        platform.script("demand", busy(503, retry_after))
        async with client(platform, attempts=3, backoff=QUICK, timeout=10, sleep=waits) as api:
            with pytest.raises(PlatformUnavailable) as info:
                await api.demand()
        assert len(platform.requests("demand")) == 3
    assert len(waits.seconds) == 2 and all(wait <= QUICK.cap for wait in waits.seconds)
    assert info.value.retry_after is None and "asks to be retried" not in str(info.value)


async def test_a_retry_after_on_a_gateways_502_is_not_the_platforms_word() -> None:
    waits = Waits()
    with HostilePlatform() as platform:
        platform.script("demand", busy(502, "30"), as_documented)
        async with client(platform, attempts=3, backoff=QUICK, timeout=10, sleep=waits) as api:
            assert (await api.demand()).models == []
    assert len(waits.seconds) == 1 and waits.seconds[0] <= QUICK.cap


# The lifecycle: forever, but never sooner than asked ---------------------------------------------


async def test_a_refused_register_is_tried_again_after_the_wait_the_platform_asked_for(caplog: pytest.LogCaptureFixture) -> None:
    waits = Waits()
    with HostilePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        platform.script("register", busy(503, "120"), as_documented)
        lifecycle = lifecycle_with(platform, EngineCounters(), backoff=LIFECYCLE_BACKOFF, sleep=waits)
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        assert len(platform.requests("register")) == 2
        assert await lifecycle.stop(timeout=5) is True
    assert waits.seconds == [120.0]
    [unreachable] = [r.getMessage() for r in caplog.records if "platform unreachable" in r.getMessage()]
    assert unreachable.endswith("(it asks to be retried in 120 s)); still serving locally, trying again in 120 s as the platform asks")


async def test_a_wait_longer_than_ten_minutes_is_cut_to_ten(caplog: pytest.LogCaptureFixture) -> None:
    waits = Waits()
    with HostilePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        platform.script("register", busy(429, "3600"), as_documented)
        lifecycle = lifecycle_with(platform, EngineCounters(), backoff=LIFECYCLE_BACKOFF, sleep=waits)
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        assert await lifecycle.stop(timeout=5) is True
    assert waits.seconds == [600.0]
    assert any("trying again in 600 s as the platform asks (it asked for 3600 s; 600 s is the most the agent waits)" in r.getMessage() for r in caplog.records)


async def test_a_register_refused_without_a_usable_retry_after_backs_off_as_before() -> None:
    waits = Waits()
    with HostilePlatform() as platform:
        platform.script("register", busy(503, "later, maybe"), busy(503, "-1"), as_documented)
        lifecycle = lifecycle_with(platform, EngineCounters(), backoff=LIFECYCLE_BACKOFF, sleep=waits)
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        assert await lifecycle.stop(timeout=5) is True
    assert waits.seconds == [], "nothing asked: the lifecycle's own backoff, a move or a status change ends the wait"


async def test_a_heartbeat_held_back_past_the_offline_threshold_is_honoured_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The platform asked for 15 minutes of quiet: the agent keeps quiet for ten (the cap), though
    the platform lists an instance silent for 180 s offline, says so, and heartbeats again after."""
    waits = Waits()
    counters = EngineCounters()
    with HostilePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        platform.script("heartbeat", busy(429, "900"), as_documented)
        lifecycle = lifecycle_with(platform, counters, backoff=LIFECYCLE_BACKOFF, sleep=waits)
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        provider_id = lifecycle.provider_id
        counters.completion_tokens_total += 4
        await eventually(lambda: any(seen.body["completion_tokens"] == 4 for seen in platform.requests("heartbeat")[1:]))
        await eventually(lambda: lifecycle.phase is Phase.registered)
        assert lifecycle.provider_id == provider_id, "still listed as the same instance"
        assert await lifecycle.stop(timeout=5) is True
    assert waits.seconds == [600.0]
    [warning] = [r for r in caplog.records if "holding heartbeats" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().startswith(f"holding heartbeats for {provider_id} back 600 s as the platform asks, longer than the 180 s")


async def test_a_short_heartbeat_retry_after_warns_of_nothing(caplog: pytest.LogCaptureFixture) -> None:
    waits = Waits()
    with HostilePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        platform.script("heartbeat", busy(503, "20"), as_documented)
        lifecycle = lifecycle_with(platform, EngineCounters(), backoff=LIFECYCLE_BACKOFF, sleep=waits)
        lifecycle.start()
        await eventually(lambda: len(platform.requests("heartbeat")) >= 3)
        assert await lifecycle.stop(timeout=5) is True
    assert waits.seconds == [20.0]
    assert not any("holding heartbeats" in r.getMessage() for r in caplog.records)


async def test_a_move_during_the_asked_wait_is_registered_the_moment_it_ends() -> None:
    """Only shutdown cuts the platform's wait short; a new endpoint URL is registered right after it."""
    waits = Waits(held=True)
    with HostilePlatform() as platform:
        platform.script("register", busy(503, "60"), as_documented)
        lifecycle = lifecycle_with(platform, EngineCounters(), backoff=LIFECYCLE_BACKOFF, sleep=waits)
        lifecycle.start()
        await eventually(lambda: waits.seconds == [60.0])
        lifecycle.move_endpoint("https://moved.example.com")
        await asyncio.sleep(0.3)  # six backoffs: none of them registers the new URL
        assert len(platform.requests("register")) == 1
        waits.release()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        assert list(platform.listed.values()) == ["https://moved.example.com"]
        assert await lifecycle.stop(timeout=5) is True


async def test_the_platform_is_not_asked_again_during_its_wait_and_shutdown_ends_it_at_once() -> None:
    """With the real clock: asked for ten minutes, the agent registers once, and stopping it
    neither waits them out nor leaves anything listed."""
    with HostilePlatform() as platform:
        platform.script("register", busy(503, "600"))
        lifecycle = lifecycle_with(platform, EngineCounters(), backoff=LIFECYCLE_BACKOFF)
        lifecycle.start()
        await eventually(lambda: lifecycle.phase is Phase.unreachable)
        await asyncio.sleep(0.5)  # ten of the lifecycle's own backoffs
        assert len(platform.requests("register")) == 1
        assert await asyncio.wait_for(lifecycle.stop(timeout=5), 60) is True
    assert lifecycle.phase is Phase.deregistered and platform.requests("deregister") == []


async def test_a_draining_shutdown_during_the_wait_still_tells_the_platform() -> None:
    """The heartbeat wait the platform asked for does not hold back the draining notice and the DELETE."""
    waits = Waits(held=True)
    with HostilePlatform() as platform:
        platform.script("heartbeat", busy(429, "300"), as_documented)
        lifecycle = lifecycle_with(platform, EngineCounters(), backoff=LIFECYCLE_BACKOFF, sleep=waits)
        lifecycle.start()
        await eventually(lambda: waits.seconds == [300.0])
        provider_id = lifecycle.provider_id
        await asyncio.wait_for(lifecycle.drain(timeout=2), 30)
        assert platform.requests("heartbeat")[-1].body["status"] == "draining"
        assert await asyncio.wait_for(lifecycle.stop(timeout=5), 30) is True
        assert [seen.raw_path for seen in platform.requests("deregister")] == [PROVIDERS + str(provider_id)]
