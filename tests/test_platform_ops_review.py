"""What an operations review of a long-running agent found in its marketplace session.

A provider runs the agent for weeks: they log in again while it runs, bench it while it serves,
restart it behind a quick tunnel (a new URL every run), pause it in a debugger or a container, and
lose the platform for an hour. Each test plays one of those against the reference platform (or a
scripted one) over real HTTP. Time the agent measures (pauses, an outage's length) is driven by a
clock the test moves, never waited for; waits are for something the platform or the agent does.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from live_platform import API_KEY, LivePlatform, free_port
from test_platform_hostile import HostilePlatform, answer, client
from test_platform_lifecycle import EngineCounters, ResolvedGGUF, eventually

from vramsupply.config import Settings
from vramsupply.platform import Backoff, MarketplaceSession, Phase, PlatformClient, ProviderLifecycle, build_offer
from vramsupply.platform import pauses
from vramsupply.platform.state import RegistrationState, write_state
from vramsupply.serve.options import market_options
from vramsupply.serve.provider import ProviderSide
from vramsupply.throughput import store

WRONG_KEY = "sk-revoked-0000000000000000"
PUBLIC = "https://gpu.example.com"


class Clock:
    """A monotonic clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def session_for(platform_url: str, tmp_path: Path, key: str, endpoint_url: str = PUBLIC) -> MarketplaceSession:
    settings = Settings(platform_url=platform_url, api_key=key, endpoint_url=endpoint_url, endpoint_token="tok-secret", heartbeat_interval=0.1)
    return MarketplaceSession.prepare(market_options(settings), state_path=tmp_path / "registration.json")


def start(session: MarketplaceSession, counters: EngineCounters | None = None) -> ProviderLifecycle:
    stats = counters or EngineCounters()
    return session.start(session.offer(ResolvedGGUF(), 8192), lambda: stats)


def said(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if text in record.getMessage()]


# Finding 1: "run `vramsupply login`" could not be acted on while the agent ran ---------------------


async def test_a_key_stored_by_login_while_the_agent_is_rejected_is_used_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert run_cli("login", "--api-key", WRONG_KEY).returncode == 0
    with LivePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        lifecycle = start(session_for(platform.url, tmp_path, WRONG_KEY))
        await eventually(lambda: lifecycle.phase is Phase.rejected)
        rejected = lifecycle.message

        assert run_cli("login", "--api-key", API_KEY).returncode == 0
        await asyncio.wait_for(lifecycle.registered.wait(), 10)
        assert [provider.id for provider in platform.providers] == [lifecycle.provider_id]
        assert await lifecycle.stop(timeout=5) is True
    assert rejected.startswith("API key rejected — run `vramsupply login`; the running agent picks the new key up within 5 s")
    [changed] = said(caplog, "changed: trying the new key")
    assert "config.toml" in changed.getMessage() and API_KEY not in caplog.text


async def test_a_rejected_key_from_the_environment_says_where_to_set_it_and_to_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment of a running process cannot change: a new key there needs a restart."""
    monkeypatch.setenv("VRAM_SUPPLY_API_KEY", WRONG_KEY)
    with LivePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        lifecycle = start(session_for(platform.url, tmp_path, WRONG_KEY))
        await eventually(lambda: lifecycle.phase is Phase.rejected)
        await lifecycle.stop(timeout=1)
    [rejected] = said(caplog, "API key rejected")
    message = rejected.getMessage()
    assert message.startswith("API key rejected — set VRAM_SUPPLY_API_KEY in the agent's environment (/etc/vramsupply/env for the system service")
    assert "and restart the agent (service: systemctl restart vramsupply" in message and "vramsupply login" not in message
    assert rejected.levelno == logging.ERROR


# Finding 2: a pause of the agent itself was diagnosed as a port-forwarding problem ---------------


def paused_lifecycle(platform: LivePlatform, clock: Clock, endpoint_url: str) -> ProviderLifecycle:
    settings = Settings(endpoint_url=endpoint_url, endpoint_token="tok-secret")
    offer = build_offer(market_options(settings, local_ok=True), ResolvedGGUF(), served_context=8192, endpoint_token="tok-secret")
    return ProviderLifecycle(
        PlatformClient(platform.url, API_KEY, attempts=1), offer.request, EngineCounters, heartbeat_interval=0.05,
        local_url="http://127.0.0.1:8080", clock=clock,
    )  # fmt: skip


PAUSED = re.compile(
    r"the platform lists prov_\w+ as offline: this agent was paused for 6\d s until \d\d:\d\d:\d\d \(SIGSTOP, docker pause, a debugger, "
    r"or a host too busy to run it\), so the platform's health check found it not answering; still serving, it lists it again at its next health check"
)


async def test_an_offline_listing_while_the_agent_was_paused_is_put_down_to_the_pause(caplog: pytest.LogCaptureFixture) -> None:
    """The agent was frozen for 70 s (its monotonic clock jumps, as across SIGSTOP and SIGCONT),
    and the platform's health check meanwhile found nothing answering."""
    clock, endpoint = Clock(), f"http://127.0.0.1:{free_port()}"
    with LivePlatform(health_interval=3600) as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        lifecycle = paused_lifecycle(platform, clock, endpoint)
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        clock.now += 70  # frozen, then resumed
        platform.check_health_now()  # the check that ran while it was frozen
        await eventually(lambda: lifecycle.phase is Phase.offline)
        beats = platform.providers[0].last_seen_at
        await eventually(lambda: platform.providers[0].last_seen_at > beats)  # still listed offline
        message = lifecycle.message
        assert await lifecycle.stop(timeout=5) is True
    assert PAUSED.fullmatch(message), message
    assert len(said(caplog, "this agent was paused")) == 1, "once, not at every heartbeat"
    assert "forward port" not in caplog.text and "reachability of" not in caplog.text


def test_a_pause_asked_about_again_a_second_later_is_the_same_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """The offline diagnosis may ask about a pause before the watch's own task has woken from it,
    and again after a wall-clock second has turned: the pause, and so the line logged once for it,
    must not change (it did: its end was stamped anew at every question, and logged twice)."""
    clock, wall = Clock(), [1_700_000_000.2]
    monkeypatch.setattr(pauses.time, "time", lambda: wall[0])
    watch = pauses.PauseWatch(clock)
    watch.woke()
    clock.now += 70  # frozen, then resumed
    first = watch.overlapping(0, clock.now)
    wall[0] += 1
    assert first is not None and watch.overlapping(0, clock.now) == first
    assert watch.woke() is None, "the watch's task, waking at last, finds the pause already recorded"


async def test_a_pause_the_platform_listed_the_agent_online_after_is_not_blamed(caplog: pytest.LogCaptureFixture) -> None:
    """Heartbeats after the pause were answered "online": the health check that fails later does
    not fail for the pause."""
    clock, endpoint = Clock(), f"http://127.0.0.1:{free_port()}"
    with LivePlatform(health_interval=3600) as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        lifecycle = paused_lifecycle(platform, clock, endpoint)
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        clock.now += 70
        beats = platform.providers[0].last_seen_at
        await eventually(lambda: platform.providers[0].last_seen_at > beats)
        beats = platform.providers[0].last_seen_at
        await eventually(lambda: platform.providers[0].last_seen_at > beats)  # the answer to the one before was read
        platform.check_health_now()
        await eventually(lambda: lifecycle.phase is Phase.offline)
        message = lifecycle.message
        assert await lifecycle.stop(timeout=5) is True
    assert f"the platform cannot reach {endpoint}/health: forward port" in message
    assert "this agent was paused" not in caplog.text


async def test_a_pause_during_an_outage_of_reachability_is_not_blamed_for_it(caplog: pytest.LogCaptureFixture) -> None:
    """Listed offline for a port nobody forwards, then paused: the listing was lost before the
    pause, and the pause was named its cause, while nothing would list it again."""
    clock, endpoint = Clock(), f"http://127.0.0.1:{free_port()}"
    with LivePlatform(health_interval=3600) as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        lifecycle = paused_lifecycle(platform, clock, endpoint)
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        platform.check_health_now()
        await eventually(lambda: lifecycle.phase is Phase.offline)
        clock.now += 70  # frozen, then resumed, while listed offline
        platform.check_health_now()
        for _ in range(2):
            beats = platform.providers[0].last_seen_at
            await eventually(lambda: platform.providers[0].last_seen_at > beats)
        message = lifecycle.message
        assert await lifecycle.stop(timeout=5) is True
    assert f"the platform cannot reach {endpoint}/health: forward port" in message
    assert "this agent was paused" not in caplog.text


# Finding 3: a killed run's instance stayed listed next to the new one --------------------------


def account_of(key: str) -> str:
    """The fingerprint of a key the agent records (never the key): which account registered."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def previous_run_left(path: Path, platform_url: str, provider_id: str, endpoint_url: str, **fields: Any) -> None:
    """The record a run killed with SIGKILL leaves: registered, by a process that no longer runs."""
    record = {
        "phase": "registered", "platform_url": platform_url, "model": "qwen/qwen3.5-9b", "endpoint_url": endpoint_url,
        "provider_id": provider_id, "pid": dead_pid(), "updated_at": time.time(), "account": account_of(API_KEY), **fields,
    }  # fmt: skip
    write_state(path, RegistrationState(**record))


async def register_directly(platform_url: str, endpoint_url: str) -> str:
    settings = Settings(endpoint_url=endpoint_url, endpoint_token="tok-secret")
    offer = build_offer(market_options(settings), ResolvedGGUF(), served_context=8192, endpoint_token="tok-secret")
    async with PlatformClient(platform_url, API_KEY) as platform_client:
        return (await platform_client.register(offer.request)).provider_id


async def test_the_instance_a_killed_run_left_at_its_old_tunnel_url_is_deleted_before_registering(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old_url, new_url = "https://old-words.trycloudflare.com", "https://new-words.trycloudflare.com"
    with LivePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        ghost = await register_directly(platform.url, old_url)
        previous_run_left(tmp_path / "registration.json", platform.url, ghost, old_url)
        lifecycle = start(session_for(platform.url, tmp_path, API_KEY, endpoint_url=new_url))
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        assert [provider.offer.endpoint_url for provider in platform.providers] == [new_url]
        assert await lifecycle.stop(timeout=5) is True
    [removed] = said(caplog, f"deregistered {ghost}")
    assert re.fullmatch(rf"deregistered {ghost}, which the agent's previous run \(process \d+\) left listed at {old_url}", removed.getMessage())


@pytest.mark.parametrize(
    ("record", "deletes"),
    [({}, True), ({"account": account_of("sk-another-account-000000")}, False), ({"phase": "deregistered"}, False), ({"pid": "self"}, False)],
    ids=["left-listed", "another-account", "deregistered-cleanly", "process-still-runs"],
)
async def test_only_a_dead_run_of_this_account_on_this_platform_has_its_instance_deleted(tmp_path: Path, record: dict[str, Any], deletes: bool) -> None:
    import os

    fields = {**record, "pid": os.getpid()} if record.get("pid") == "self" else record
    with HostilePlatform() as platform:
        previous_run_left(tmp_path / "registration.json", platform.url, "prov_left_behind", "https://old.example.com", **fields)
        settings = Settings(platform_url=platform.url, api_key=API_KEY, endpoint_url=PUBLIC, endpoint_token="tok-secret", heartbeat_interval=0.1)
        session = MarketplaceSession.prepare(market_options(settings), state_path=tmp_path / "registration.json")
        lifecycle = start(session)
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        deleted = [seen.raw_path for seen in platform.requests("deregister")]
        await lifecycle.stop(timeout=5)
    assert (deleted == ["/v1/providers/prov_left_behind"]) is deletes, deleted


async def test_a_platform_that_fails_the_delete_of_the_old_instance_still_gets_the_new_registration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with HostilePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        platform.script("deregister", answer(500, {"error": {"message": "internal error"}}))
        previous_run_left(tmp_path / "registration.json", platform.url, "prov_left_behind", "https://old.example.com")
        lifecycle = start(session_for(platform.url, tmp_path, API_KEY))
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        await lifecycle.stop(timeout=1)
    [warning] = said(caplog, "could not deregister prov_left_behind")
    assert warning.levelno == logging.WARNING and warning.getMessage().endswith("the platform's health checks will mark it offline")


# Finding 4: a `vramsupply bench` run while the agent served never reached the heartbeats --------


def measured(model: str, all_slots: float, quant: str | None = "Q4_K_M") -> store.Capacity:
    return store.Capacity(
        model=model, quant=quant, parallel=4, single_stream_tokens_per_second=all_slots / 3, all_slots_tokens_per_second=all_slots,
        measured_at=time.time(), seconds=12.0, agent_version="test",
    )  # fmt: skip


async def test_a_bench_result_saved_while_serving_goes_with_the_next_heartbeat(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bench = store.default_bench_path()
    store.save(bench, measured("qwen/qwen3.5-9b", 100.0))
    with LivePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        settings = Settings(platform_url=platform.url, api_key=API_KEY, endpoint_url=PUBLIC, endpoint_token="tok-secret", heartbeat_interval=0.1)
        session = MarketplaceSession.prepare(market_options(settings), state_path=tmp_path / "registration.json")
        ProviderSide(settings, session, local_platform=False).model_known(ResolvedGGUF())
        lifecycle = start(session)
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        [provider] = platform.providers
        assert provider.capacity is not None and provider.capacity.all_slots_tokens_per_second == 100.0

        store.save(bench, measured("another/model", 999.0))  # another model's result: nothing changes
        store.save(bench, measured("qwen/qwen3.5-9b", 250.0))  # `vramsupply bench` while serving
        await eventually(lambda: provider.capacity is not None and provider.capacity.all_slots_tokens_per_second == 250.0)
        beats = provider.last_seen_at
        await eventually(lambda: provider.last_seen_at > beats)
        assert await lifecycle.stop(timeout=5) is True
    [changed] = said(caplog, "the measured capacity in")
    assert "250.0 tok/s with 4 slots busy" in changed.getMessage() and "was 33.3 tok/s for one request, 100.0 tok/s" in changed.getMessage()


# Finding 5: a long outage was said once, then never again ---------------------------------------


async def test_a_long_outage_is_recalled_every_fifteen_minutes_and_no_more_often(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    with HostilePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        platform.script("register", answer(502, {"error": {"message": "bad gateway"}}))
        settings = Settings(endpoint_url=PUBLIC, endpoint_token="tok-secret")
        offer = build_offer(market_options(settings), ResolvedGGUF(), served_context=8192, endpoint_token="tok-secret")
        lifecycle = ProviderLifecycle(
            client(platform), offer.request, EngineCounters, heartbeat_interval=0.05, backoff=Backoff(initial=0.02, cap=0.05), clock=clock
        )
        lifecycle.start()

        async def tries(more: int) -> None:
            seen = len(platform.requests("register"))
            await eventually(lambda: len(platform.requests("register")) >= seen + more)

        await eventually(lambda: lifecycle.phase is Phase.unreachable)
        clock.now += 15 * 60 - 1
        await tries(3)
        assert said(caplog, "still unreachable") == []
        clock.now += 1
        await tries(1)
        await tries(3)
        clock.now += 15 * 60 - 1
        await tries(3)
        reminders = [record.getMessage() for record in said(caplog, "still unreachable")]
        clock.now += 1
        # said once the try's answer is read, a moment after the platform saw the try (a flake, under load)
        await eventually(lambda: len(said(caplog, "still unreachable")) >= 2)
        await tries(3)
        await lifecycle.stop(timeout=1)
    assert len(reminders) == 1 and len(said(caplog, "still unreachable")) == 2
    assert re.fullmatch(r"the platform is still unreachable since (\d{4}-\d\d-\d\d )?\d\d:\d\d: http://127\.0\.0\.1:\d+ answered 502: bad gateway, serving continues", reminders[0])
    assert len(said(caplog, "platform unreachable (")) == 1, "the outage itself is said once"
