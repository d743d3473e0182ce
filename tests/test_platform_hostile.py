"""A platform (or whatever answers at its address) that misbehaves: the agent's lifecycle must
stay honest and readable whatever it sends (the client's side: tests/test_platform_client_hostile.py).

``HostilePlatform`` keeps a correct platform's books (docs/platform-api.md) on a localhost port, in
a thread with its own event loop (so that async tests and a real `vramsupply serve` child process
can both use it), until a test scripts other answers for a route.
"""

from __future__ import annotations

import asyncio
import os
import itertools
import json
import logging
import re
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from agent_process import AgentProcess
from aiohttp import web
from conftest import TINY_MODEL
from live_platform import API_KEY, free_port
from test_platform_lifecycle import EngineCounters, ResolvedGGUF, eventually

from vramsupply.config import Settings
from vramsupply.platform import Backoff, Phase, PlatformClient, ProviderLifecycle, build_offer, read_state
from vramsupply.platform.state import default_state_path
from vramsupply.serve.options import market_options

Answer = Callable[["HostilePlatform", web.Request, Any], Awaitable[web.StreamResponse]]
PROVIDERS = "/v1/providers/"
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Seen:
    route: str
    method: str
    raw_path: str
    body: Any


class HostilePlatform:
    """``script(route, *answers)``: each answer serves one request, the last one all that follow.
    Routes: register, heartbeat, deregister, demand, rails, other. ``listed``: the instances it
    lists; ``seen``: every request; ``release()`` lets every held answer go on."""

    def __init__(self) -> None:
        self.port = free_port()
        self.listed: dict[str, str] = {}  # provider id -> endpoint URL
        self.seen: list[Seen] = []
        self._scripts: dict[str, list[Answer]] = {}
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hostile-platform", daemon=True)
        self._released: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None

    def __enter__(self) -> HostilePlatform:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, route: str, *answers: Answer) -> None:
        self._scripts[route] = list(answers)

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self._released.set)  # type: ignore[union-attr]

    @property
    def released(self) -> bool:
        return self._released is not None and self._released.is_set()

    def requests(self, route: str) -> list[Seen]:
        return [seen for seen in list(self.seen) if seen.route == route]

    async def _start(self) -> None:
        self._released = asyncio.Event()
        app = web.Application(client_max_size=1 << 24)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        assert self._released is not None and self._runner is not None
        self._released.set()
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        route = _route(request.method, request.raw_path)
        self.seen.append(Seen(route, request.method, request.raw_path, body))
        script = self._scripts.get(route)
        answer = (script.pop(0) if len(script) > 1 else script[0]) if script else as_documented
        return await answer(self, request, body)

    async def held(self) -> None:
        assert self._released is not None
        await self._released.wait()


def _route(method: str, raw_path: str) -> str:
    routes = {("POST", "/v1/providers/register"): "register", ("POST", "/v1/providers/heartbeat"): "heartbeat", ("GET", "/v1/providers/demand"): "demand"}
    if (method, raw_path) in routes:
        return routes[(method, raw_path)]
    if raw_path == "/v1/settings/provider/rails":
        return "rails"
    return "deregister" if method == "DELETE" and raw_path.startswith(PROVIDERS) else "other"


async def as_documented(platform: HostilePlatform, request: web.Request, body: Any) -> web.StreamResponse:
    """What docs/platform-api.md says the platform answers (registering again at the same
    endpoint URL replaces the earlier instance); a heartbeat echoes the status it was sent."""
    route = _route(request.method, request.raw_path)
    if route == "register":
        for stale in [pid for pid, url in platform.listed.items() if url == body["endpoint_url"]]:
            del platform.listed[stale]
        provider_id = f"prov_{next(platform._ids):016x}"
        platform.listed[provider_id] = body["endpoint_url"]
        return web.json_response({"provider_id": provider_id, "status": "online"}, status=201)
    if route == "heartbeat":
        if body["provider_id"] not in platform.listed:
            return web.json_response({"error": {"message": "unknown provider", "type": "not_found"}}, status=404)
        return web.json_response({"provider_id": body["provider_id"], "status": body["status"]})
    if route == "deregister":
        provider_id = unquote(request.raw_path[len(PROVIDERS) :])
        if platform.listed.pop(provider_id, None) is None:
            return web.json_response({"error": {"message": "unknown provider", "type": "not_found"}}, status=404)
        return web.json_response({"provider_id": provider_id, "status": "deregistered"})
    if route == "demand":
        return web.json_response({"models": []})
    if route == "rails":
        return web.json_response({"accepts_stripe": True, "accepts_tempo": True})
    return web.json_response({"error": {"message": "no such route"}}, status=404)


def answer(status: int, body: Any = None, *, text: str | None = None, headers: dict[str, str] | None = None) -> Answer:
    async def respond(platform: HostilePlatform, request: web.Request, _: Any) -> web.StreamResponse:
        if text is not None:
            return web.Response(status=status, text=text, content_type="text/html", headers=headers)
        return web.json_response(body, status=status, headers=headers)

    return respond


async def committed_then_held(platform: HostilePlatform, request: web.Request, body: Any) -> web.StreamResponse:
    """The platform lists the instance, then its answer does not come until ``release()``."""
    documented = await as_documented(platform, request, body)
    await platform.held()
    return documented


def client(platform: HostilePlatform, **options: Any) -> PlatformClient:
    return PlatformClient(platform.url, API_KEY, **{"attempts": 1, **options})


def lifecycle_with(platform: HostilePlatform, counters: EngineCounters, *, timeout: float = 10.0, **options: Any) -> ProviderLifecycle:
    settings = Settings(endpoint_url="https://gpu.example.com", endpoint_token="tok-secret")
    offer = build_offer(market_options(settings), ResolvedGGUF(), served_context=8192, endpoint_token="tok-secret")
    return ProviderLifecycle(
        client(platform, timeout=timeout), offer.request, lambda: counters, **{"heartbeat_interval": 0.05, "backoff": Backoff(initial=0.05, cap=0.2), **options}
    )


# The lifecycle: the platform's word is checked -------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ({"status": "draining"}, "as draining: it routes nothing new there"),
        ({"status": "deregistered"}, "as 'deregistered', not online"),
        ({"status": "online", "provider_id": "prov_someone_else"}, "for another instance, prov_someone_else"),
    ],
)
async def test_a_heartbeat_answer_that_no_longer_lists_us_registers_again(caplog: pytest.LogCaptureFixture, reply: dict[str, str], why: str) -> None:
    async def once(platform: HostilePlatform, request: web.Request, body: Any) -> web.StreamResponse:
        return web.json_response({"provider_id": body["provider_id"], **reply})

    with HostilePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        platform.script("heartbeat", once, as_documented)
        lifecycle = lifecycle_with(platform, EngineCounters())
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        first = lifecycle.provider_id
        await eventually(lambda: lifecycle.provider_id not in (None, first) and lifecycle.phase is Phase.registered)
        await eventually(lambda: list(platform.listed) == [lifecycle.provider_id])
        assert await lifecycle.stop(timeout=5) is True
        assert platform.listed == {}
    [warning] = [r for r in caplog.records if why in r.getMessage()]
    assert warning.levelno == logging.WARNING and warning.getMessage().endswith("; registering again")


async def test_draining_heartbeats_of_a_failed_engine_are_no_reason_to_register_again() -> None:
    counters = EngineCounters()
    with HostilePlatform() as platform:
        lifecycle = lifecycle_with(platform, counters)
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        counters.failure = "the engine failed"
        await eventually(lambda: sum(seen.body["status"] == "draining" for seen in platform.requests("heartbeat")) >= 3)
        assert len(platform.requests("register")) == 1
        await lifecycle.stop(timeout=5)


async def test_tokens_are_reported_once_when_the_heartbeat_answers_are_unreadable(caplog: pytest.LogCaptureFixture) -> None:
    """Four heartbeats answered 200 "OK": the platform took each, so the 5 tokens are told once."""
    counters = EngineCounters()
    with HostilePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        platform.script("heartbeat", answer(200, text="OK"))
        lifecycle = lifecycle_with(platform, counters)
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        counters.completion_tokens_total += 5
        await eventually(lambda: any(seen.body["completion_tokens"] for seen in platform.requests("heartbeat")))
        told = len(platform.requests("heartbeat"))
        await eventually(lambda: len(platform.requests("heartbeat")) >= told + 3)
        assert sum(seen.body["completion_tokens"] for seen in platform.requests("heartbeat")) == 5
        assert lifecycle.phase is Phase.registered and "unreadable" in lifecycle.message
        await lifecycle.stop(timeout=5)
    unreadable = [r for r in caplog.records if "unexpected answer to POST /v1/providers/heartbeat" in r.getMessage()]
    assert len(unreadable) == 1 and unreadable[0].levelno == logging.WARNING


async def listed_then_garbled(platform: HostilePlatform, request: web.Request, body: Any) -> web.StreamResponse:
    """The platform does what was asked (201, 200), but the body that says so arrives as bytes
    that are not the gzip its header claims (a broken proxy, a truncated transfer)."""
    documented = await as_documented(platform, request, body)
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    return web.Response(status=documented.status, body=b"\x1f\x8b not gzip at all", headers=headers)


async def test_tokens_are_reported_once_when_an_accepted_heartbeat_is_not_the_gzip_it_claims() -> None:
    counters = EngineCounters()
    with HostilePlatform() as platform:
        lifecycle = lifecycle_with(platform, counters)
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        platform.script("heartbeat", listed_then_garbled, as_documented)
        counters.completion_tokens_total += 100
        await eventually(lambda: any(seen.body["completion_tokens"] for seen in platform.requests("heartbeat")))
        told = len(platform.requests("heartbeat"))
        await eventually(lambda: len(platform.requests("heartbeat")) >= told + 3)
        assert sum(seen.body["completion_tokens"] for seen in platform.requests("heartbeat")) == 100
        await lifecycle.stop(timeout=5)


async def test_a_register_whose_answer_cannot_be_read_is_never_reported_as_nothing_listed(tmp_path: Path) -> None:
    """201, then a body that is not the gzip it claims: the platform lists us, we cannot know as what."""
    state_path = tmp_path / "registration.json"
    with HostilePlatform() as platform:
        platform.script("register", listed_then_garbled)
        lifecycle = lifecycle_with(platform, EngineCounters(), state_path=state_path, backoff=Backoff(initial=30.0, cap=60.0))
        lifecycle.start()
        await eventually(lambda: len(platform.listed) == 1 and lifecycle.phase is not Phase.registering)
        assert await lifecycle.stop(timeout=1) is False
    recorded = read_state(state_path)
    assert recorded is not None and recorded.phase is Phase.deregister_failed
    assert "may list" in recorded.message and "nothing to remove" not in recorded.message


async def test_heartbeats_never_wait_for_the_disk_on_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state file is rewritten on the loop that streams tokens, every heartbeat: an fsync there
    can stall every stream for seconds while a download fills the page cache."""
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    state_path = tmp_path / "registration.json"
    with HostilePlatform() as platform:
        lifecycle = lifecycle_with(platform, EngineCounters(), state_path=state_path)
        lifecycle.start()
        await eventually(lambda: len(platform.requests("heartbeat")) >= 3)
        await lifecycle.stop(timeout=5)
    assert read_state(state_path) is not None and synced == []


async def test_a_platform_that_keeps_forgetting_us_is_asked_again_with_backoff() -> None:
    """Registered, then 404 to every heartbeat: once at once, then after the backoff (15-30 s here)."""
    with HostilePlatform() as platform:
        platform.script("heartbeat", answer(404, {"error": {"message": "unknown provider"}}))
        lifecycle = lifecycle_with(platform, EngineCounters(), backoff=Backoff(initial=30.0, cap=60.0))
        lifecycle.start()
        await eventually(lambda: len(platform.requests("heartbeat")) == 2)
        await asyncio.sleep(0.5)  # ten heartbeat intervals: none of them registers again
        assert len(platform.requests("register")) == 2 and lifecycle.phase is Phase.registering
        await lifecycle.stop(timeout=5)


async def test_a_hostile_refusal_reaches_the_log_and_the_state_file_escaped_and_short(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    state_path = tmp_path / "registration.json"
    with HostilePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        platform.script("register", answer(400, {"error": {"message": "\x1b[2J\x1b]0;owned\x07" + "y" * 2_000_000}}))
        lifecycle = lifecycle_with(platform, EngineCounters(), state_path=state_path)
        lifecycle.start()
        await eventually(lambda: lifecycle.phase is Phase.rejected)
        recorded = read_state(state_path)
        await lifecycle.stop(timeout=5)
    assert recorded is not None and recorded.phase is Phase.rejected
    assert recorded.message.startswith(r"platform rejected POST /v1/providers/register (400): \x1b[2J\x1b]0;owned\x07yyy")
    assert len(recorded.message) < 500
    for text in [recorded.message, *(r.getMessage() for r in caplog.records if r.name.startswith("vramsupply"))]:
        assert not CONTROL.search(text) and len(text) < 600


# Shutdown while a register is on its way -------------------------------------------------------


async def test_shutdown_during_a_register_waits_for_it_and_removes_the_instance_it_made(tmp_path: Path) -> None:
    state_path = tmp_path / "registration.json"
    with HostilePlatform() as platform:
        platform.script("register", committed_then_held)
        lifecycle = lifecycle_with(platform, EngineCounters(), state_path=state_path)
        lifecycle.start()
        await eventually(lambda: len(platform.listed) == 1)
        [made] = platform.listed
        await lifecycle.drain(timeout=0.1)  # serve drains first: the register is still unanswered
        platform.release()
        assert await lifecycle.stop(timeout=5) is True
        assert platform.listed == {}
        assert [seen.raw_path for seen in platform.requests("deregister")] == [PROVIDERS + made]
    recorded = read_state(state_path)
    assert recorded is not None and recorded.phase is Phase.deregistered and made in recorded.message


async def test_a_register_unanswered_at_shutdown_is_not_reported_as_deregistered(tmp_path: Path) -> None:
    state_path = tmp_path / "registration.json"
    with HostilePlatform() as platform:
        platform.script("register", committed_then_held)
        lifecycle = lifecycle_with(platform, EngineCounters(), state_path=state_path)
        lifecycle.start()
        await eventually(lambda: len(platform.listed) == 1)
        await lifecycle.drain(timeout=0.1)
        assert await lifecycle.stop(timeout=0.2) is False
    recorded = read_state(state_path)
    assert recorded is not None and recorded.phase is Phase.deregister_failed
    assert recorded.message == (
        f"the registration sent to {platform.url} was still unanswered at shutdown: "
        "the platform may list qwen/qwen3.5-9b at https://gpu.example.com until its health checks fail"
    )


async def test_a_register_that_timed_out_is_not_reported_as_deregistered_at_shutdown() -> None:
    """The platform made the instance but its answer came after our timeout: no id to DELETE."""
    with HostilePlatform() as platform:
        platform.script("register", committed_then_held)
        lifecycle = lifecycle_with(platform, EngineCounters(), timeout=0.2, backoff=Backoff(initial=30.0, cap=60.0))
        lifecycle.start()
        await eventually(lambda: lifecycle.phase is Phase.unreachable)
        assert await lifecycle.stop(timeout=1) is False
        assert lifecycle.phase is Phase.deregister_failed
        assert lifecycle.message.startswith(f"a registration sent to {platform.url} got no usable answer: the platform may list")


def test_sigterm_during_a_slow_register_removes_the_instance_it_made() -> None:
    """`vramsupply serve` stopped while the platform holds its register answer: once the answer
    comes, the instance is deleted, and the agent records that it is."""
    with HostilePlatform() as platform:
        platform.script("register", committed_then_held)
        env = {"VRAM_SUPPLY_PLATFORM_URL": platform.url, "VRAM_SUPPLY_API_KEY": API_KEY, "VRAM_SUPPLY_HEARTBEAT_INTERVAL": "0.2"}
        agent = AgentProcess("--model", str(TINY_MODEL), "--port", str(free_port()), "--endpoint-url", "https://gpu.example.com", env=env)
        try:
            agent.wait_for(lambda: len(platform.listed) == 1, "the register reaching the platform")
            [made] = platform.listed
            agent.send_signal(signal.SIGTERM)
            agent.wait_for(lambda: "stopping" in agent.log, "the drain, with the register still unanswered")
            platform.release()
            assert agent.wait() == 0
        finally:
            agent.kill()
        assert platform.listed == {}, "the instance the register made is deleted"
        assert [seen.raw_path for seen in platform.requests("deregister")] == [PROVIDERS + made]
    recorded = read_state(default_state_path())
    assert recorded is not None and recorded.phase is Phase.deregistered
    assert f"deregistered {made}" in agent.log and "Traceback" not in agent.log
