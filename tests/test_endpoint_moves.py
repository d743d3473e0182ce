"""The public URL moves (a tunnel restarted) while the agent talks to the platform: whatever the
moment, the platform ends up listing the agent at its current URL only, and at shutdown nothing.

Driven as a provider's session: the real ProviderLifecycle against ``HostilePlatform`` (a fake
that keeps a documented platform's books), with ``move_endpoint`` called where the tunnel
supervisor would call it. Last, ``serve --no-register --tunnel``: a public endpoint all the same.
"""

from __future__ import annotations

import asyncio
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent_process import AgentProcess
from aiohttp import web
from conftest import TINY_MODEL
from test_platform_hostile import PROVIDERS, HostilePlatform, answer, as_documented, committed_then_held, lifecycle_with
from test_platform_lifecycle import EngineCounters, eventually
from test_tunnel import cloudflared, starts  # noqa: F401  (cloudflared: the fixture, a test double on PATH)

from vramsupply.platform import Phase
from vramsupply.platform.token import default_token_path

OLD, NEW = "https://gpu.example.com", "https://new-url.trycloudflare.com"


async def draining_held(platform: HostilePlatform, request: web.Request, body: Any) -> web.StreamResponse:
    """Heartbeats as documented, but the answer to a ``draining`` one waits for ``release()``."""
    if body["status"] == "draining":
        await platform.held()
    return await as_documented(platform, request, body)


async def test_a_move_while_the_register_is_on_its_way_registers_the_new_url_and_removes_the_old_instance() -> None:
    with HostilePlatform() as platform:
        platform.script("register", committed_then_held, as_documented)
        lifecycle = lifecycle_with(platform, EngineCounters())
        lifecycle.start()
        await eventually(lambda: list(platform.listed.values()) == [OLD])
        [at_old] = platform.listed
        lifecycle.move_endpoint(NEW)  # the register for the old URL is still unanswered
        platform.release()
        await eventually(lambda: lifecycle.phase is Phase.registered and lifecycle.provider_id is not None)
        await eventually(lambda: list(platform.listed.values()) == [NEW])
        assert lifecycle.provider_id in platform.listed and lifecycle.endpoint_url == NEW
        assert PROVIDERS + at_old in [seen.raw_path for seen in platform.requests("deregister")]
        assert await lifecycle.stop(timeout=5) is True
        assert platform.listed == {}


async def test_a_move_during_the_drain_is_not_registered_and_the_listed_instance_is_removed() -> None:
    with HostilePlatform() as platform:
        platform.script("heartbeat", draining_held)
        lifecycle = lifecycle_with(platform, EngineCounters())
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        [listed] = platform.listed
        drain = asyncio.create_task(lifecycle.drain(timeout=10))
        await eventually(lambda: any(seen.body["status"] == "draining" for seen in platform.requests("heartbeat")))
        lifecycle.move_endpoint(NEW)  # the tunnel restarts while the agent shuts down
        platform.release()
        await drain
        assert await lifecycle.stop(timeout=5) is True
        assert platform.listed == {}, "the instance is removed, not left draining"
        assert [seen.raw_path for seen in platform.requests("deregister")] == [PROVIDERS + listed]
        assert len(platform.requests("register")) == 1, "nothing is registered during shutdown"
        assert lifecycle.phase is Phase.deregistered and listed in lifecycle.message


async def test_an_instance_at_an_old_url_is_removed_at_shutdown_when_the_new_url_never_registered() -> None:
    with HostilePlatform() as platform:
        lifecycle = lifecycle_with(platform, EngineCounters())
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        [at_old] = platform.listed
        platform.script("register", answer(400, {"error": {"message": "endpoint refused"}}))
        lifecycle.move_endpoint(NEW)
        await eventually(lambda: lifecycle.phase is Phase.rejected)
        assert await lifecycle.stop(timeout=5) is True
        assert platform.listed == {}
        assert [seen.raw_path for seen in platform.requests("deregister")] == [PROVIDERS + at_old]
        assert lifecycle.phase is Phase.deregistered and at_old in lifecycle.message


async def test_a_move_while_a_heartbeat_is_on_its_way_registers_the_new_url_at_once() -> None:
    holding: list[str] = []

    async def held_once(platform: HostilePlatform, request: web.Request, body: Any) -> web.StreamResponse:
        holding.append(body["provider_id"])
        await platform.held()
        return await as_documented(platform, request, body)

    with HostilePlatform() as platform:
        lifecycle = lifecycle_with(platform, EngineCounters())
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        [at_old] = platform.listed
        platform.script("heartbeat", held_once, as_documented)
        await eventually(lambda: holding == [at_old])  # a heartbeat on its way
        lifecycle.move_endpoint(NEW)
        platform.release()
        await eventually(lambda: list(platform.listed.values()) == [NEW] and lifecycle.phase is Phase.registered)
        assert at_old not in platform.listed and lifecycle.provider_id in platform.listed
        assert await lifecycle.stop(timeout=5) is True
        assert platform.listed == {}


# A tunnel without registering: the endpoint is public, so it requires the token ----------------


def status_of(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_tunnel_without_registering_requires_the_endpoint_token_and_says_where_it_is(cloudflared: Path) -> None:  # noqa: F811
    with AgentProcess("--model", str(TINY_MODEL), "--port", "0", "--no-register", "--tunnel", "cloudflared") as agent:
        agent.wait_for(lambda: agent.printed("public URL (cloudflared tunnel): https://double-run-1-"), "the tunnel's URL")
        agent.wait_ready()  # the tunnel may be up before the model is: until then requests get 503 "loading"
        [run] = starts(cloudflared)
        through_tunnel = f"http://127.0.0.1:{run['forward_port']}"
        assert status_of(f"{through_tunnel}/v1/models") == 401
        assert status_of(f"{through_tunnel}/v1/models", "not-the-token") == 401
        token = default_token_path().read_text().strip()
        assert status_of(f"{through_tunnel}/v1/models", token) == 200
        assert status_of(f"{through_tunnel}/health") == 200, "health checks need no token"
        assert agent.printed(f"requests need `Authorization: Bearer <the token in {default_token_path()}>`")
        assert agent.stop(signal.SIGTERM) == 0
    assert token not in agent.output and "Traceback" not in agent.log
