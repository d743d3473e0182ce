"""`vramsupply status` and the agent's log say only what the agent knows.

A provider's monitoring reads `status`'s exit code: 0 must mean serving and listed, never "serving
and listed, the last time the agent could write that down". And the agent's log must not send a
provider to their router when the platform marked the agent offline only because its heartbeats
could not get through, nor tell them the platform routes nothing new when the platform never heard
the draining notice.

The agent's /health is played by ``OneAnswerPlatform`` and the registration record written as the
agent writes it; the lifecycle talks to a ``HostilePlatform`` over real HTTP. Time is never
asserted: a silence the platform could have seen is made of failed heartbeats, each of which the
lifecycle follows with a full heartbeat interval.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import run_cli
from live_platform import free_port
from test_platform_cli import OneAnswerPlatform, write_raw_state
from test_platform_hostile import HostilePlatform, answer, as_documented, client
from test_platform_lifecycle import EngineCounters, ResolvedGGUF, eventually

from vramsupply.config import Settings
from vramsupply.platform import Backoff, Phase, ProviderLifecycle, build_offer, read_state
from vramsupply.serve.options import market_options

LEDGER_BROKEN = "earnings are not being recorded: the ledger cannot be written (No space left on device)"


def status_of(agent: OneAnswerPlatform, **env: str) -> tuple[Any, dict[str, Any]]:
    """`status` as a table (wide) and as parsed JSON, for the agent the record points at."""
    env = {"VRAM_SUPPLY_PORT": str(free_port()), **env}
    table = run_cli("status", env={**env, "COLUMNS": "400"})
    as_json = run_cli("status", "--json", env=env)
    assert table.returncode == as_json.returncode and "Traceback" not in table.stderr + as_json.stderr, table.stderr
    return table, json.loads(as_json.stdout)


def healthy_agent(status: str = "ok", **extra: Any) -> OneAnswerPlatform:
    return OneAnswerPlatform(200, json.dumps({"status": status, "model": "stories260k", "slots_idle": 1, **extra}).encode())


# Finding: status trusted a registration record the agent had stopped rewriting -----------------


def test_status_does_not_call_an_agent_listed_on_a_record_it_stopped_rewriting() -> None:
    """The disk filled up ten minutes ago: the record still says registered, as it did then."""
    with healthy_agent() as agent:
        write_raw_state(local_url=agent.url, updated_at=time.time() - 600, last_heartbeat_at=time.time() - 600)
        table, report = status_of(agent)

    assert table.returncode == 3, table.stdout
    [row] = [line for line in table.stdout.splitlines() if "registration" in line]
    assert re.search(r"registered \(stale: not rewritten for 60\ds, while the agent rewrites it at every heartbeat \(stale after 100s\)", row)
    assert "the platform may no longer list it" in row
    assert report["registration"]["phase"] == "registered" and report["registration"]["stale"] is True


def test_a_record_rewritten_at_the_last_heartbeat_still_means_listed() -> None:
    with healthy_agent() as agent:
        write_raw_state(local_url=agent.url)
        table, report = status_of(agent)

    assert table.returncode == 0, table.stdout
    assert "stale" not in table.stdout and report["registration"]["stale"] is False


def test_how_old_is_too_old_follows_the_heartbeat_interval_the_agent_is_configured_with() -> None:
    """40 s without a rewrite: ordinary for an agent heartbeating every 30 s (a beat or so late),
    stale for one heartbeating every 2 s (the audit's agent)."""
    with healthy_agent() as agent:
        write_raw_state(local_url=agent.url, updated_at=time.time() - 40)
        every_30s, _ = status_of(agent)
        every_2s, report = status_of(agent, VRAM_SUPPLY_HEARTBEAT_INTERVAL="2")

    assert every_30s.returncode == 0, every_30s.stdout
    assert every_2s.returncode == 3 and "(stale after 16s)" in every_2s.stdout
    assert report["registration"]["stale"] is True


def test_the_interval_the_agent_recorded_wins_over_the_one_status_would_read() -> None:
    """An agent started with `serve --heartbeat-interval 50`: status, run without that flag, reads
    30 s (stale after 100 s), but a record 120 s old is only two of that agent's beats late."""
    with healthy_agent() as agent:
        write_raw_state(local_url=agent.url, updated_at=time.time() - 120, heartbeat_interval=50)
        table, report = status_of(agent)

    assert table.returncode == 0, table.stdout
    assert report["registration"]["stale"] is False and report["registration"]["heartbeat_interval"] == 50


def test_a_record_from_before_the_clock_was_set_back_is_not_trusted_either() -> None:
    with healthy_agent() as agent:
        write_raw_state(local_url=agent.url, updated_at=time.time() + 3600)
        table, _ = status_of(agent)

    assert table.returncode == 3
    assert "recorded in the future: not rewritten since the clock was set back" in table.stdout


@pytest.mark.parametrize(
    ("phase", "code"),
    [("not_registering", 0), ("rejected", 3), ("unreachable", 3)],
    ids=["no-register-written-once", "rejected-waits-out-backoff", "unreachable-waits-out-retry-after"],
)
def test_a_record_that_is_not_rewritten_at_every_heartbeat_is_never_called_stale(phase: str, code: int) -> None:
    """`serve --no-register` writes its record once; a refused or unreachable agent waits out
    backoffs (or a Retry-After of up to ten minutes) between rewrites."""
    with healthy_agent() as agent:
        write_raw_state(local_url=agent.url, phase=phase, updated_at=time.time() - 3600)
        table, report = status_of(agent)

    assert table.returncode == code, table.stdout
    assert "stale" not in table.stdout and report["registration"]["stale"] is False


# Finding: a degraded agent serves, yet status said no agent serves -----------------------------


def test_a_degraded_agent_that_is_listed_exits_as_serving_and_shows_why_it_is_degraded() -> None:
    with healthy_agent("degraded", warnings=[LEDGER_BROKEN]) as agent:
        write_raw_state(local_url=agent.url)
        table, report = status_of(agent)

    assert table.returncode == 0, table.stdout
    [state] = [line for line in table.stdout.splitlines() if "agent" in line and agent.url in line]
    assert "degraded" in state
    assert any("WARNING" in line and LEDGER_BROKEN in line for line in table.stdout.splitlines())
    assert report["agent"]["serving"] is True and report["agent"]["healthy"] is False


def test_a_degraded_agent_that_is_not_listed_exits_3_not_1() -> None:
    with healthy_agent("degraded", warnings=[LEDGER_BROKEN]) as agent:
        write_raw_state(local_url=agent.url, phase="rejected", message="API key rejected — run `vramsupply login`")
        table, _ = status_of(agent)

    assert table.returncode == 3, table.stdout


# Finding: the lifecycle warned about the state file once, ever --------------------------------


async def test_the_state_file_failing_and_recovering_is_logged_each_time_it_changes(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """The disk fills, space is freed, it fills again: three changes, three lines, not one."""
    state_path = tmp_path / "registration.json"
    cannot, again = "cannot record the registration state", "the registration state is written again"

    def logged(words: str) -> int:
        return sum(words in record.getMessage() for record in caplog.records)

    def block() -> None:  # between two awaits: the lifecycle (on this loop) cannot write in between
        state_path.unlink()
        state_path.mkdir()  # a folder where the file goes: every write fails

    with HostilePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        lifecycle = lifecycle_at(platform, "https://gpu.example.com", state_path=state_path)
        lifecycle.start()
        await eventually(lambda: len(platform.requests("heartbeat")) >= 2)
        block()
        await eventually(lambda: logged(cannot) == 1)
        state_path.rmdir()
        await eventually(lambda: logged(again) == 1)
        assert (recorded := read_state(state_path)) is not None and recorded.phase is Phase.registered
        block()
        await eventually(lambda: logged(cannot) == 2)
        beats = len(platform.requests("heartbeat"))
        await eventually(lambda: len(platform.requests("heartbeat")) >= beats + 3)
        state_path.rmdir()
        assert await lifecycle.stop(timeout=5) is True
    assert (logged(cannot), logged(again)) == (2, 2), "once per change, not once per heartbeat"
    [warning, *_] = [r for r in caplog.records if cannot in r.getMessage()]
    assert warning.levelno == logging.WARNING and "`vramsupply status` cannot show it until it is written again" in warning.getMessage()


# Finding: an offline listing after missed heartbeats was blamed on port forwarding ------------


def lifecycle_at(platform: HostilePlatform, endpoint_url: str, **options: Any) -> ProviderLifecycle:
    settings = Settings(endpoint_url=endpoint_url, endpoint_token="tok-secret")
    offer = build_offer(market_options(settings, local_ok=True), ResolvedGGUF(), served_context=8192, endpoint_token="tok-secret")
    return ProviderLifecycle(
        client(platform), offer.request, EngineCounters, local_url="http://127.0.0.1:8080",
        **{"heartbeat_interval": 0.05, "backoff": Backoff(initial=0.05, cap=0.2), **options},
    )  # fmt: skip


async def listed_offline(platform: HostilePlatform, request: web.Request, body: Any) -> web.StreamResponse:
    """The platform takes the heartbeat and says how it lists the instance: offline."""
    return web.json_response({"provider_id": body["provider_id"], "status": "offline"})


FAILED_BEATS = [answer(500, {"error": {"message": "internal error"}})] * 12
"""Twelve heartbeats the platform fails, each followed by a 50 ms interval: 0.6 s of silence at least."""
SILENCE_MESSAGE = re.compile(
    r"the platform marked (prov_\w+) offline after \d+ s without a heartbeat from this agent; "
    r"still serving, it lists it again at its next health check"
)


async def test_an_offline_listing_after_missed_heartbeats_is_put_down_to_them_not_to_port_forwarding(caplog: pytest.LogCaptureFixture) -> None:
    """The platform failed every heartbeat for longer than its silence limit (0.5 s here, 180 s
    documented), then lists the agent offline: nothing is wrong with the agent's reachability."""
    dead = f"http://127.0.0.1:{free_port()}"
    with HostilePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        platform.script("heartbeat", as_documented, *FAILED_BEATS, listed_offline)
        lifecycle = lifecycle_at(platform, dead, silence_limit=0.5)
        lifecycle.start()
        await eventually(lambda: lifecycle.phase is Phase.offline)
        beats = len(platform.requests("heartbeat"))
        await eventually(lambda: len(platform.requests("heartbeat")) >= beats + 5)  # still listed offline
        message = lifecycle.message
        assert await lifecycle.stop(timeout=5) is True
    assert (match := SILENCE_MESSAGE.fullmatch(message)) and match[1] == platform.requests("heartbeat")[0].body["provider_id"]
    assert sum(bool(SILENCE_MESSAGE.fullmatch(r.getMessage())) for r in caplog.records) == 1, "once per outage"
    assert "forward port" not in caplog.text and "reachability of" not in caplog.text


async def test_still_listed_offline_after_its_health_checks_the_agent_names_the_hop_that_fails(caplog: pytest.LogCaptureFixture) -> None:
    """Heartbeats got through again, yet the platform keeps it offline past two health checks
    (0.1 s apart here, 60 s documented): its checks of /health fail, and that is said then."""
    dead = f"http://127.0.0.1:{free_port()}"
    with HostilePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        platform.script("heartbeat", as_documented, *FAILED_BEATS, listed_offline)
        lifecycle = lifecycle_at(platform, dead, silence_limit=0.5, health_check_every=0.1)
        lifecycle.start()
        await eventually(lambda: "forward port" in lifecycle.message)
        await eventually(lambda: "reachability of" in caplog.text, timeout=10)
        assert await lifecycle.stop(timeout=5) is True
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("the platform")]
    assert SILENCE_MESSAGE.fullmatch(said[0]) and f"the platform cannot reach {dead}/health" in said[1]
    assert caplog.text.count("reachability of") == 1


# Finding: shutdown said the platform routes nothing new before (and without) telling it ------


async def held_then_documented(platform: HostilePlatform, request: web.Request, body: Any) -> web.StreamResponse:
    await platform.held()
    return await as_documented(platform, request, body)


@pytest.mark.parametrize(
    ("refusal", "reason"),
    [(answer(503, {"error": {"message": "maintenance"}}), r"http://127\.0\.0\.1:\d+ answered 503: maintenance"), (held_then_documented, r"no answer within 0\.\d s")],
    ids=["refused", "never-answered"],
)
async def test_a_draining_notice_the_platform_never_took_is_not_reported_as_taken(caplog: pytest.LogCaptureFixture, refusal: Any, reason: str) -> None:
    with HostilePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        lifecycle = lifecycle_at(platform, "https://gpu.example.com")
        lifecycle.start()
        await eventually(lambda: len(platform.requests("heartbeat")) >= 2)
        platform.script("heartbeat", refusal)
        await lifecycle.drain(timeout=0.2)
        platform.release()
        assert platform.requests("heartbeat")[-1].body["status"] == "draining"
        assert lifecycle.phase is Phase.draining
        assert await lifecycle.stop(timeout=5) is True
    assert "routes no new requests here" not in caplog.text
    [said] = [r for r in caplog.records if r.getMessage().startswith("draining")]
    assert said.levelno == logging.WARNING
    assert re.fullmatch(rf"draining, but could not tell the platform \({reason}\): it may route requests here until it is deregistered", said.getMessage())


async def test_a_draining_notice_is_reported_once_the_platform_took_it(caplog: pytest.LogCaptureFixture) -> None:
    with HostilePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        lifecycle = lifecycle_at(platform, "https://gpu.example.com")
        lifecycle.start()
        await eventually(lambda: len(platform.requests("heartbeat")) >= 2)
        await lifecycle.drain(timeout=5)
        seen_when_said = [seen.body["status"] for seen in platform.requests("heartbeat")]
        assert lifecycle.message == "draining: the platform routes no new requests here"
        assert await lifecycle.stop(timeout=5) is True
    assert seen_when_said[-1] == "draining"
    assert caplog.text.count("draining: the platform routes no new requests here") == 1


async def test_a_deregistration_that_times_out_says_so_in_whole_or_tenths_of_seconds() -> None:
    with HostilePlatform() as platform:
        lifecycle = lifecycle_at(platform, "https://gpu.example.com")
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        provider_id = lifecycle.provider_id
        platform.script("deregister", held_then_documented)
        assert await lifecycle.stop(timeout=0.7) is False
        platform.release()
    assert re.fullmatch(rf"could not deregister {provider_id}: no answer within 0\.\ds; health checks will mark it offline", lifecycle.message)
