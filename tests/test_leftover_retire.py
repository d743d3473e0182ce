"""An instance retired at an old endpoint URL is deleted even when the platform fails its DELETE.

A provider's quick tunnel restarts with a new URL while the agent serves: the agent registers the
new URL and deletes the instance at the old one. When the platform has trouble just then (its
DELETE answers 503), that id was forgotten after one try, and buyers could be routed to the dead
old URL until health checks caught it. Now it joins the instances killed runs left listed: kept in
the registration record, retried while serving and at the next start, under the same guards.

Played against the reference platform over real HTTP with the real lifecycle in this process; the
endpoint moves where the tunnel supervisor would move it (``move_endpoint``), and the fault is put
into the platform's answers (an aiohttp middleware of its app), never into the agent. What counts
is the platform's list of instances.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from live_platform import API_KEY, LivePlatform
from test_leftover_retry import DeleteFault, kept_ids, listed
from test_platform_lifecycle import EngineCounters, ResolvedGGUF, eventually

from vramsupply.config import Settings
from vramsupply.platform import MarketplaceSession, ProviderLifecycle, api, read_state
from vramsupply.platform.state import Phase
from vramsupply.serve.options import market_options

OLD, NEW = "https://old-url.trycloudflare.com", "https://new-url.trycloudflare.com"


class RegisterRefused:
    """The platform refuses to register an endpoint URL (400) while ``on``: the new URL never lists."""

    def __init__(self) -> None:
        self.on = False

    def into(self, platform: LivePlatform) -> LivePlatform:
        platform.platform.app.middlewares.append(self._middleware)
        return platform

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.on and request.method == "POST" and request.path == api.REGISTER_PATH:
            return web.json_response({"error": {"message": "endpoint not reachable", "type": "invalid_request_error"}}, status=400)
        return await handler(request)


async def serving_at(platform: LivePlatform, state_path: Path, endpoint_url: str) -> ProviderLifecycle:
    """An agent's session with the platform, as `serve` starts it, registered at ``endpoint_url``."""
    settings = Settings(platform_url=platform.url, api_key=API_KEY, endpoint_url=endpoint_url, endpoint_token="tok-secret", heartbeat_interval=0.1)
    session = MarketplaceSession.prepare(market_options(settings), state_path=state_path)
    counters = EngineCounters()
    lifecycle = session.start(session.offer(ResolvedGGUF(), 8192), lambda: counters)
    await eventually(lambda: lifecycle.registered.is_set() and lifecycle.provider_id in listed(platform), timeout=10)
    return lifecycle


def said(caplog: pytest.LogCaptureFixture, start: str) -> int:
    return sum(record.getMessage().startswith(start) for record in caplog.records)


async def test_an_instance_at_the_old_url_whose_delete_answers_503_is_deleted_while_serving_once_the_platform_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vramsupply.platform")
    fault, state_path = DeleteFault(), tmp_path / "registration.json"
    with fault.into(LivePlatform()) as platform:
        lifecycle = await serving_at(platform, state_path, OLD)
        at_old = lifecycle.provider_id

        fault.mode = "503"
        lifecycle.move_endpoint(NEW)  # the tunnel restarted with a new URL
        await eventually(lambda: lifecycle.registered.is_set() and lifecycle.provider_id not in (None, at_old), timeout=10)
        at_new = lifecycle.provider_id
        await eventually(lambda: kept_ids(state_path) == [at_old], timeout=10)
        assert listed(platform) == {at_old, at_new}, "the platform still lists the old URL's instance"
        [kept] = read_state(state_path).leftovers
        assert kept.retired and kept.endpoint_url == OLD, "kept with its URL, so a run killed now leaves it to the next start"

        fault.lift()
        await eventually(lambda: listed(platform) == {at_new}, timeout=20)
        await eventually(lambda: kept_ids(state_path) == [], timeout=10)  # rewritten once the DELETE's answer is back
        assert await lifecycle.stop(timeout=5) is True
        assert listed(platform) == set()
    assert said(caplog, f"could not deregister {at_old}") == 1, "said once, not at every retry"
    assert said(caplog, f"deregistered {at_old}, which the agent (process ") == 1
    assert f"registered at {OLD} and then replaced" in caplog.text


async def test_an_old_url_instance_whose_delete_fails_at_shutdown_is_deleted_at_the_next_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vramsupply.platform")
    fault, refused, state_path = DeleteFault(), RegisterRefused(), tmp_path / "registration.json"
    with fault.into(refused.into(LivePlatform())) as platform:
        first = await serving_at(platform, state_path, OLD)
        at_old = first.provider_id

        refused.on = True  # the new URL is not registered: the old instance is retired only at shutdown
        first.move_endpoint(NEW)
        await eventually(lambda: first.phase is Phase.rejected, timeout=10)
        fault.mode = "503"
        assert await first.stop(timeout=2) is False
        assert listed(platform) == {at_old}
        assert kept_ids(state_path) == [at_old], "kept for the next start"
        assert first.phase is Phase.deregister_failed and "the next start retries" in first.message

        fault.lift()
        refused.on = False
        second = await serving_at(platform, state_path, NEW)
        assert listed(platform) == {second.provider_id}, "deleted before the next run registered"
        assert kept_ids(state_path) == []
        assert await second.stop(timeout=5) is True
        assert listed(platform) == set()
    assert said(caplog, f"deregistered {at_old}, which the agent (process ") == 1


async def test_an_instance_retired_under_another_api_key_is_kept_for_that_account_only(tmp_path: Path) -> None:
    """The guard killed runs' ids have: a DELETE sent with another account's key could only remove
    a stranger's instance, so an agent started with another key leaves the kept id alone."""
    fault, state_path = DeleteFault(), tmp_path / "registration.json"
    other_key = "sk-other-account-00000000000000"
    with fault.into(LivePlatform()) as platform:
        platform.platform.store.add_account(other_key)
        first = await serving_at(platform, state_path, OLD)
        at_old = first.provider_id
        fault.mode = "503"
        first.move_endpoint(NEW)
        await eventually(lambda: kept_ids(state_path) == [at_old], timeout=10)
        await first.stop(timeout=2)  # its own instance stays listed too: the platform still fails DELETEs
        fault.lift()
        deletes = fault.deletes

        settings = Settings(platform_url=platform.url, api_key=other_key, endpoint_url="https://other.example.com", endpoint_token="tok-secret", heartbeat_interval=0.1)
        session = MarketplaceSession.prepare(market_options(settings), state_path=state_path)
        counters = EngineCounters()
        other = session.start(session.offer(ResolvedGGUF(), 8192), lambda: counters)
        await eventually(lambda: other.registered.is_set(), timeout=10)
        assert await other.stop(timeout=5) is True
        assert fault.deletes == deletes + 1, "only its own instance, at shutdown"
        assert at_old in listed(platform)
    assert kept_ids(state_path) == [at_old]


async def test_an_old_url_instance_whose_delete_the_platform_refuses_is_given_up_with_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 400 to the DELETE is the platform's final word, as for a killed run's instance: not kept, said once."""
    refused_deletes: list[str] = []

    @web.middleware
    async def refuse_deletes(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "DELETE" and refused_deletes == []:
            refused_deletes.append(request.path)
            return web.json_response({"error": {"message": "instance is locked", "type": "invalid_request_error"}}, status=400)
        return await handler(request)

    caplog.set_level(logging.INFO, logger="vramsupply.platform")
    state_path = tmp_path / "registration.json"
    live = LivePlatform()
    live.platform.app.middlewares.append(refuse_deletes)
    with live as platform:
        lifecycle = await serving_at(platform, state_path, OLD)
        at_old = lifecycle.provider_id
        lifecycle.move_endpoint(NEW)
        gave_up = f"could not deregister {at_old}, an instance registered before this one: the platform refused the DELETE"
        await eventually(lambda: said(caplog, gave_up) == 1, timeout=10)
        assert kept_ids(state_path) == []
        assert await lifecycle.stop(timeout=5) is True
        assert listed(platform) == {at_old}, "left to the platform's health checks"
    assert said(caplog, gave_up) == 1 and said(caplog, f"could not deregister {at_old}") == 1
