"""The DELETE that takes a stopped agent off the market gets past a platform's blip.

A provider stops the agent (Ctrl-C, SIGTERM, a systemd restart) at the moment the platform has a
blip: its DELETE answers 503, or the platform restarts and refuses connections for half a second.
Before, that DELETE was sent once: the instance stayed listed and buyers were routed to a dead URL
until the platform's health checks noticed (minutes), or the next start deleted it. Now it is sent
again within the shutdown's budget, while the failure is one that may pass; the platform's outright
refusal is its last word. The phase says how many tries it took, or how many failed.

Played against the reference platform over real HTTP; the fault is put into its answers (an aiohttp
middleware of its app) or its listener, never into the agent. What counts is its list of instances.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from agent_process import AgentProcess
from aiohttp import web
from conftest import TINY_MODEL
from live_platform import API_KEY, LivePlatform, free_port
from test_leftover_retire import NEW, OLD, RegisterRefused, said, serving_at
from test_leftover_retry import DeleteFaults, kept_ids, listed
from test_platform_lifecycle import EngineCounters, eventually, make_lifecycle
from test_platform_ops_review import dead_pid

from vramsupply.platform import Phase, read_state
from vramsupply.platform.state import default_state_path, write_state

UNAVAILABLE = {"error": {"message": "service unavailable", "type": "server_error"}}


class DeleteTrouble(DeleteFaults):
    """Each status in ``statuses`` answers one DELETE with that error, the last one every DELETE
    after it; None answers as documented (the instance is deleted)."""

    def __init__(self, *statuses: int | None) -> None:
        super().__init__()
        self.statuses = list(statuses)

    async def _fault(self) -> web.StreamResponse | None:
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if status == 503:
            return web.json_response(UNAVAILABLE, status=503)
        if status is not None:
            return web.json_response({"error": {"message": "instance is locked", "type": "invalid_request_error"}}, status=status)
        return None


async def registered(platform: LivePlatform, state_path: Path) -> tuple[Any, str]:
    lifecycle = make_lifecycle(platform.url, EngineCounters(), state_path)
    lifecycle.start()
    await eventually(lambda: lifecycle.registered.is_set() and lifecycle.provider_id in listed(platform))
    assert lifecycle.provider_id is not None
    return lifecycle, lifecycle.provider_id


async def test_a_delete_answered_503_once_at_shutdown_is_sent_again_and_the_instance_is_gone(tmp_path: Path) -> None:
    state_path, trouble = tmp_path / "registration.json", DeleteTrouble(503, None)
    with trouble.into(LivePlatform()) as platform:
        lifecycle, provider_id = await registered(platform, state_path)
        assert await lifecycle.stop(timeout=5) is True
        assert listed(platform) == set(), "the platform no longer lists it"
        assert trouble.deletes == 2
    assert lifecycle.phase is Phase.deregistered
    assert lifecycle.message == f"deregistered {provider_id} from {platform.url}, at try 2"
    recorded = read_state(state_path)
    assert recorded is not None and recorded.phase is Phase.deregistered and recorded.provider_id is None


@pytest.mark.filterwarnings("ignore:Changing state of started or joined application:DeprecationWarning")  # the platform's app, started again
async def test_a_platform_that_refuses_connections_for_half_a_second_at_shutdown_still_deletes_the_instance(tmp_path: Path) -> None:
    with LivePlatform() as platform:
        lifecycle, provider_id = await registered(platform, tmp_path / "registration.json")
        platform._run(platform.platform.stop())  # the platform restarts: nothing listens on its port
        back = threading.Timer(0.5, lambda: platform._run(platform.platform.start("127.0.0.1", platform.port)))
        back.start()
        try:
            assert await lifecycle.stop(timeout=5) is True
        finally:
            back.join()
        assert listed(platform) == set(), "deleted once the platform listened again"
    assert lifecycle.phase is Phase.deregistered
    tries = re.fullmatch(rf"deregistered {provider_id} from {re.escape(platform.url)}, at try (\d+)", lifecycle.message)
    assert tries is not None and int(tries.group(1)) >= 2, lifecycle.message


async def test_a_platform_down_past_the_budget_gets_an_honest_line_and_the_next_start_deletes_the_instance(tmp_path: Path) -> None:
    state_path, trouble = tmp_path / "registration.json", DeleteTrouble(503)
    with trouble.into(LivePlatform()) as platform:
        first = await serving_at(platform, state_path, OLD)
        provider_id = first.provider_id
        began = time.monotonic()
        assert await first.stop(timeout=1.5) is False
        took = time.monotonic() - began
        assert took < 1.5 + 1.5, f"stop took {took:.1f}s of a 1.5 s budget"
        assert listed(platform) == {provider_id}
        assert first.phase is Phase.deregister_failed
        failed = rf"could not deregister {provider_id} after (\d+) tries: {re.escape(platform.url)} answered 503: service unavailable; health checks will mark it offline"
        tries = re.fullmatch(failed, first.message)
        assert tries is not None and int(tries.group(1)) == trouble.deletes >= 2, (first.message, trouble.deletes)
        recorded = read_state(state_path)
        assert recorded is not None and recorded.phase is Phase.deregister_failed and recorded.provider_id == provider_id

        write_state(state_path, recorded.model_copy(update={"pid": dead_pid()}))  # the stopped agent's process has exited
        trouble.statuses = [None]  # the platform is back
        second = await serving_at(platform, state_path, NEW)
        assert listed(platform) == {second.provider_id}, "the next start deleted it before registering"
        assert await second.stop(timeout=5) is True
    assert kept_ids(state_path) == []


@pytest.mark.parametrize("status", [400, 401, 403])
async def test_a_delete_the_platform_refuses_outright_is_not_sent_again(tmp_path: Path, status: int) -> None:
    trouble = DeleteTrouble(status)
    with trouble.into(LivePlatform()) as platform:
        lifecycle, provider_id = await registered(platform, tmp_path / "registration.json")
        assert await lifecycle.stop(timeout=5) is False
        assert trouble.deletes == 1, "the platform's last word is not asked again"
        assert listed(platform) == {provider_id}
    assert lifecycle.phase is Phase.deregister_failed
    assert lifecycle.message.startswith(f"could not deregister {provider_id}: ") and "tries" not in lifecycle.message


async def test_a_refusal_after_a_503_ends_the_tries_and_says_how_many_were_made(tmp_path: Path) -> None:
    trouble = DeleteTrouble(503, 403)
    with trouble.into(LivePlatform()) as platform:
        lifecycle, provider_id = await registered(platform, tmp_path / "registration.json")
        assert await lifecycle.stop(timeout=5) is False
        assert trouble.deletes == 2, "sent again after the 503, never after the 403"
    assert lifecycle.message == (
        f"could not deregister {provider_id} after 2 tries: platform rejected DELETE /v1/providers/{provider_id} (403): "
        "instance is locked; health checks will mark it offline"
    )


async def moved_and_refused(platform: LivePlatform, state_path: Path, refused: RegisterRefused) -> tuple[Any, str | None]:
    """Registered at OLD, then the tunnel moved and NEW was refused: the OLD instance is retired
    only at shutdown. The lifecycle and that instance's id."""
    lifecycle = await serving_at(platform, state_path, OLD)
    at_old = lifecycle.provider_id
    refused.on = True
    lifecycle.move_endpoint(NEW)
    await eventually(lambda: lifecycle.phase is Phase.rejected, timeout=10)
    return lifecycle, at_old


async def test_an_old_url_instance_whose_shutdown_delete_answers_503_once_is_deleted_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The tunnel moved, the new URL was refused, so the old URL's instance is retired only at
    shutdown: its DELETE gets past the blip too, and nothing is left for the next start."""
    caplog.set_level(logging.INFO, logger="vramsupply.platform")
    state_path, trouble, refused = tmp_path / "registration.json", DeleteTrouble(None), RegisterRefused()
    with trouble.into(refused.into(LivePlatform())) as platform:
        lifecycle, at_old = await moved_and_refused(platform, state_path, refused)
        trouble.statuses = [503, None]
        assert await lifecycle.stop(timeout=5) is True
        assert listed(platform) == set() and trouble.deletes == 2
    assert kept_ids(state_path) == []
    assert lifecycle.phase is Phase.deregistered
    assert lifecycle.message == f"deregistered {at_old} (at try 2), registered at an endpoint URL no longer used, from {platform.url}"
    assert said(caplog, f"deregistered {at_old}, an instance registered before this one, at try 2") == 1


async def test_an_old_url_instance_the_platform_fails_past_the_budget_says_how_many_tries_failed(tmp_path: Path) -> None:
    """The same, with the platform failing every DELETE: the summary gives the try count too, and
    the instance is kept for the next start."""
    state_path, trouble, refused = tmp_path / "registration.json", DeleteTrouble(None), RegisterRefused()
    with trouble.into(refused.into(LivePlatform())) as platform:
        lifecycle, at_old = await moved_and_refused(platform, state_path, refused)
        trouble.statuses = [503]
        assert await lifecycle.stop(timeout=1.5) is False
        assert listed(platform) == {at_old}
    assert lifecycle.phase is Phase.deregister_failed
    failed = (
        rf"could not deregister {at_old} \(after (\d+) tries\), registered at an endpoint URL no longer used; "
        "the next start retries, and until then health checks will mark it offline"
    )
    tries = re.fullmatch(failed, lifecycle.message)
    assert tries is not None and int(tries.group(1)) == trouble.deletes >= 2, (lifecycle.message, trouble.deletes)
    assert kept_ids(state_path) == [at_old]


def test_sigterm_while_the_platform_answers_the_delete_503_twice_leaves_nothing_listed() -> None:
    """`vramsupply serve` stopped as a user stops it, at a platform's blip: exit 0, and gone."""
    trouble = DeleteTrouble(503, 503, None)
    with trouble.into(LivePlatform()) as platform:
        port = free_port()
        env = {"VRAM_SUPPLY_PLATFORM_URL": platform.url, "VRAM_SUPPLY_API_KEY": API_KEY, "VRAM_SUPPLY_HEARTBEAT_INTERVAL": "0.2"}
        agent = AgentProcess("--model", str(TINY_MODEL), "--port", str(port), "--endpoint-url", f"http://127.0.0.1:{port}", env=env)
        try:
            agent.wait_for(lambda: len(listed(platform)) == 1, "registration")
            [provider_id] = listed(platform)
            assert agent.stop(signal.SIGTERM) == 0
        finally:
            agent.kill()
        assert listed(platform) == set() and trouble.deletes == 3
    recorded = read_state(default_state_path())
    assert recorded is not None and recorded.phase is Phase.deregistered
    assert f"deregistered {provider_id} from {platform.url}, at try 3" in agent.log and "Traceback" not in agent.log
