"""A killed run's instance is deleted even when the platform fails the first DELETE.

A provider's agent is killed (SIGKILL, a crash) and started again while the platform has trouble:
its DELETE of the instance the killed run left listed answers 503, or no answer comes in time.
Before, that id was forgotten: the new run's record replaced the one naming it, so buyers could be
routed to a dead URL. Each test plays that against the reference platform over real HTTP, with the
real agent in a child process; the fault is put into the platform's answers (an aiohttp middleware
of its app), never into the agent. What counts is the platform's list of instances.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
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
from test_platform_lifecycle import EngineCounters, ResolvedGGUF, eventually
from test_platform_ops_review import dead_pid

from vramsupply.config import Settings
from vramsupply.platform import MarketplaceSession, PlatformClient, RegistrationState, build_offer, read_state
from vramsupply.platform.leftovers import MAX_KEPT
from vramsupply.platform.state import KeptLeftover, Phase, default_state_path, write_state
from vramsupply.serve.options import market_options

OTHER_KEY = "sk-other-account-00000000000000"


class DeleteFaults:
    """A fault plan for the platform's DELETE /v1/providers/{id}, put into the reference platform's
    app as a middleware; ``deletes``: the DELETEs that reached it, faulty or not. A subclass's
    ``_fault`` answers one DELETE in its place, or None to let the platform answer as documented."""

    def __init__(self) -> None:
        self.deletes = 0

    def into(self, platform: LivePlatform) -> LivePlatform:
        platform.platform.app.middlewares.append(self._middleware)
        return platform

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "DELETE" or not request.path.startswith("/v1/providers/"):
            return await handler(request)
        self.deletes += 1
        fault = await self._fault()
        return fault if fault is not None else await handler(request)

    async def _fault(self) -> web.StreamResponse | None:
        raise NotImplementedError


class DeleteFault(DeleteFaults):
    """While ``mode`` is set: ``"503"`` answers 503 at once; ``"hang"`` answers nothing until
    ``lift()``, then a 504 (as a gateway that gave up: the instance is not deleted)."""

    def __init__(self) -> None:
        super().__init__()
        self.mode: str | None = None
        self._lifted = threading.Event()

    def lift(self) -> None:
        self.mode = None
        self._lifted.set()

    async def _fault(self) -> web.StreamResponse | None:
        if self.mode == "503":
            return web.json_response({"error": {"message": "service unavailable", "type": "server_error"}}, status=503)
        if self.mode == "hang":
            await asyncio.get_running_loop().run_in_executor(None, self._lifted.wait, 60)
            return web.json_response({"error": {"message": "gateway timeout", "type": "server_error"}}, status=504)
        return None


def listed(platform: LivePlatform) -> set[str]:
    return {provider.id for provider in platform.providers}


def start_agent(platform: LivePlatform) -> AgentProcess:
    port = free_port()
    env = {"VRAM_SUPPLY_PLATFORM_URL": platform.url, "VRAM_SUPPLY_API_KEY": API_KEY, "VRAM_SUPPLY_HEARTBEAT_INTERVAL": "0.2"}
    return AgentProcess("--model", str(TINY_MODEL), "--port", str(port), "--endpoint-url", f"http://127.0.0.1:{port}", env=env)


def registered(agent: AgentProcess, platform: LivePlatform) -> str:
    """The id of the instance ``agent`` registered, once its record names it (what a later run reads)."""
    def record() -> RegistrationState | None:
        found = read_state(default_state_path())
        return found if found is not None and found.pid == agent.process.pid and found.provider_id in listed(platform) else None

    agent.wait_for(lambda: record() is not None, "registration")
    found = record()
    assert found is not None and found.provider_id is not None
    return found.provider_id


def kept_ids(path: Path | None = None) -> list[str]:
    """The ids the agent's record keeps for deletion (`vramsupply status --json` shows them too)."""
    record = read_state(path or default_state_path())
    return [] if record is None else [left.provider_id for left in record.leftovers]


def test_a_leftover_whose_delete_answers_503_is_deleted_by_the_same_run_once_the_platform_recovers() -> None:
    fault = DeleteFault()
    with fault.into(LivePlatform()) as platform:
        first = start_agent(platform)
        try:
            killed = registered(first, platform)
        finally:
            first.kill()  # SIGKILL: no DELETE, the instance stays listed

        fault.mode = "503"
        second = start_agent(platform)
        try:
            current = registered(second, platform)
            second.wait_for(lambda: fault.deletes >= 3, "the failed DELETE retried while serving")
            assert listed(platform) == {killed, current}, "the platform still lists the killed run's instance"
            assert kept_ids() == [killed], "kept, so a run killed now would retry it too"

            fault.lift()
            # The platform lists it no more once it has deleted it; the agent forgets it once the
            # answer is back, an instant later (a loaded machine made that instant a race).
            second.wait_for(lambda: listed(platform) == {current}, "the killed run's instance deleted once the platform recovered")
            second.wait_for(lambda: kept_ids() == [], "the deleted instance forgotten")
            assert second.stop(signal.SIGTERM) == 0
        finally:
            second.kill()
        assert listed(platform) == set()
    assert second.log.count(f"could not deregister {killed}") == 1, "said once, not at every retry"
    assert second.log.count(f"deregistered {killed}, which the agent's previous run (process ") == 1
    assert "Traceback" not in second.log


def test_leftovers_of_two_runs_killed_while_deletes_time_out_are_deleted_by_the_third_run() -> None:
    fault = DeleteFault()
    with fault.into(LivePlatform()) as platform:
        first = start_agent(platform)
        try:
            one = registered(first, platform)
        finally:
            first.kill()

        fault.mode = "hang"  # the DELETE gets no answer: the agent gives up on it after its 3 s
        second = start_agent(platform)
        try:
            two = registered(second, platform)
            second.wait_for(lambda: fault.deletes >= 1 and kept_ids() == [one], "the timed-out DELETE's id kept")
        finally:
            second.kill()  # killed again before the platform recovers
        assert listed(platform) == {one, two}

        fault.lift()
        third = start_agent(platform)
        try:
            three = registered(third, platform)
            third.wait_for(lambda: listed(platform) == {three}, "both killed runs' instances deleted")
            third.wait_for(lambda: kept_ids() == [], "both forgotten once their answers are back")
            assert third.stop(signal.SIGTERM) == 0
        finally:
            third.kill()
        assert listed(platform) == set()
    assert third.log.count(f"deregistered {one}, which an earlier run of the agent (process ") == 1
    assert third.log.count(f"deregistered {two}, which the agent's previous run (process ") == 1
    assert "Traceback" not in third.log


def account_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


async def test_a_kept_instance_of_another_account_or_platform_is_never_deleted(tmp_path: Path) -> None:
    fault = DeleteFault()
    with fault.into(LivePlatform()) as platform:
        platform.platform.store.add_account(OTHER_KEY)
        settings = Settings(endpoint_url="https://other.example.com", endpoint_token="tok-secret")
        offer = build_offer(market_options(settings), ResolvedGGUF(), served_context=8192, endpoint_token="tok-secret")
        async with PlatformClient(platform.url, OTHER_KEY) as other:
            theirs = (await other.register(offer.request)).provider_id
        state_path = tmp_path / "registration.json"
        kept = [
            KeptLeftover(provider_id=theirs, platform_url=platform.url, account=account_of(OTHER_KEY), pid=1, noted_at=time.time()),
            KeptLeftover(provider_id="prov_elsewhere", platform_url="https://elsewhere.example.com", account=account_of(API_KEY), pid=1, noted_at=time.time()),
        ]  # fmt: skip
        earlier = RegistrationState(
            phase=Phase.deregistered, platform_url=platform.url, model="qwen/qwen3.5-9b", endpoint_url="https://gpu.example.com", pid=1,
            updated_at=time.time(), leftovers=kept,
        )  # fmt: skip
        write_state(state_path, earlier)

        mine = Settings(platform_url=platform.url, api_key=API_KEY, endpoint_url="https://gpu.example.com", endpoint_token="tok-secret", heartbeat_interval=0.1)
        session = MarketplaceSession.prepare(market_options(mine), state_path=state_path)
        counters = EngineCounters()
        lifecycle = session.start(session.offer(ResolvedGGUF(), 8192), lambda: counters)
        await eventually(lambda: lifecycle.registered.is_set())
        [provider] = [p for p in platform.providers if p.id == lifecycle.provider_id]
        await eventually(lambda: provider.slots_total == counters.slots_total, timeout=10)  # heartbeats: the platform answers
        assert await lifecycle.stop(timeout=5) is True
        assert fault.deletes == 1, "only its own instance, at shutdown"
        assert listed(platform) == {theirs}
    assert kept_ids(state_path) == [theirs, "prov_elsewhere"], "kept for an agent of that account, on that platform"


def test_ids_kept_too_long_or_too_many_are_given_up_with_one_line_each(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    now = time.time()
    week_old = KeptLeftover(provider_id="prov_week_old", platform_url="http://127.0.0.1:1", account=account_of(API_KEY), pid=7, noted_at=now - 8 * 86_400)
    recent = [
        KeptLeftover(provider_id=f"prov_{n:02d}", platform_url="http://127.0.0.1:1", account=account_of(API_KEY), pid=7, noted_at=now - 60 + n)
        for n in range(MAX_KEPT)
    ]  # fmt: skip
    state_path = tmp_path / "registration.json"
    killed = RegistrationState(
        phase=Phase.registered, platform_url="http://127.0.0.1:1", model="qwen/qwen3.5-9b", endpoint_url="https://gpu.example.com",
        provider_id="prov_just_killed", pid=dead_pid(), updated_at=now, account=account_of(API_KEY), leftovers=[week_old, *recent],
    )  # fmt: skip
    write_state(state_path, killed)

    settings = Settings(platform_url="http://127.0.0.1:1", api_key=API_KEY, endpoint_url="https://gpu.example.com", endpoint_token="tok-secret")
    with caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        MarketplaceSession.prepare(market_options(settings), state_path=state_path)
    assert kept_ids(state_path) == [f"prov_{n:02d}" for n in range(1, MAX_KEPT)] + ["prov_just_killed"]
    given_up = [record.getMessage() for record in caplog.records if record.getMessage().startswith("giving up deleting")]
    assert len(given_up) == 2
    assert given_up[0].startswith("giving up deleting prov_week_old, which an earlier run of the agent (process 7)") and "within 8 days" in given_up[0]
    assert given_up[1].startswith("giving up deleting prov_00,") and f"more than {MAX_KEPT} instances" in given_up[1]
