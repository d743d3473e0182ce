"""A heartbeat the platform took but answered only after the agent gave up on it is counted once.

The agent gives each heartbeat a timeout (10 s in `serve`); a platform slow to answer (a loaded
gateway, a long pause) may have taken the heartbeat all the same. The agent used to give that
heartbeat's tokens to the next one, and the platform counted them twice. Now the heartbeat is sent
again as it was, with the same ``Idempotency-Key``, and a platform that took it (the reference one
does) answers without counting it again; only then do other tokens go.

A provider's session: the real server on the tiny model, a buyer through the openai SDK, the real
lifecycle heartbeating to the reference platform, which takes one heartbeat carrying tokens and
holds its answer until after the agent gave up on it. The platform's books, the agent's
``/metrics`` and `vramsupply status --json` must agree. Time is never asserted: the held answer is
released by the test, after the agent has moved on.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import aiohttp
from aiohttp import web
from conftest import run_cli
from live_platform import API_KEY, LivePlatform, free_port
from live_server import MODEL_ID, LiveServer
from openai import AsyncOpenAI
from test_platform_lifecycle import EngineCounters, eventually, make_lifecycle
from test_token_accounting import scrape

from vramsupply.config import Settings
from vramsupply.platform import Backoff, Phase, PlatformClient, ProviderLifecycle, build_offer
from vramsupply.platform.api import HEARTBEAT_PATH, IDEMPOTENCY_KEY_HEADER
from vramsupply.platform.state import default_state_path
from vramsupply.serve.options import market_options

AGENT_TIMEOUT = 1.0
"""How long the agent waits for a heartbeat's answer here (10 s in `serve`): the held one never comes in it."""


class LateAnswers:
    """Middleware of the reference platform: once ``arm()``ed, the next heartbeat carrying tokens
    is taken (counted) as the platform takes any, but answered only at ``release()``. ``beats``:
    every heartbeat it took, with its ``Idempotency-Key``."""

    def __init__(self) -> None:
        self.beats: list[tuple[str | None, dict[str, Any]]] = []
        self.holding = threading.Event()
        self._released = threading.Event()
        self._armed: str | None = None

    def arm(self, status: str = "online") -> None:
        """Hold the answer to the next heartbeat of ``status`` that carries tokens."""
        self._armed = status

    def release(self) -> None:
        self._released.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        answer = await handler(request)
        if request.path != HEARTBEAT_PATH or answer.status != 200:
            return answer
        beat = await request.json()  # the body the platform read, kept by aiohttp
        self.beats.append((request.headers.get(IDEMPOTENCY_KEY_HEADER), beat))
        if self._armed == beat["status"] and (beat["prompt_tokens"] or beat["completion_tokens"]):
            self._armed = None
            self.holding.set()
            while not self._released.is_set():
                await asyncio.sleep(0.02)
        return answer


async def test_a_heartbeat_answered_after_the_agent_gave_up_on_it_is_counted_once() -> None:
    late = LateAnswers()
    platform = LivePlatform()
    platform.platform.app.middlewares.append(late.middleware)
    with platform:
        async with LiveServer(parallel=2) as live, aiohttp.ClientSession() as http, AsyncOpenAI(base_url=live.base_url, api_key="unused", max_retries=0) as buyer:
            engine = live.engine
            assert engine is not None
            before = await scrape(http, live.url)
            settings = Settings(endpoint_url="https://gpu.example.com", endpoint_token="tok")
            offer = build_offer(market_options(settings), _Identity(), served_context=engine.n_ctx, endpoint_token="tok")
            client = PlatformClient(platform.url, API_KEY, attempts=1, timeout=AGENT_TIMEOUT)
            lifecycle = ProviderLifecycle(
                client, offer.request, engine.stats, heartbeat_interval=0.2, backoff=Backoff(initial=0.05, cap=0.2), state_path=default_state_path(), local_url=live.url
            )
            lifecycle.start()
            await asyncio.wait_for(lifecycle.registered.wait(), 10)
            [provider] = platform.providers

            late.arm()
            await buyer.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=8)
            await eventually(late.holding.is_set, timeout=10)  # the platform took the heartbeat with those tokens
            held_key = late.beats[-1][0]
            await eventually(lambda: [key for key, _ in late.beats].count(held_key) >= 2, timeout=10)  # the agent gave up on its answer, sent it again
            await buyer.completions.create(model=MODEL_ID, prompt="The dog ran", max_tokens=6)
            served = await _served(http, live, before)
            await eventually(lambda: provider.reported_completion_tokens >= served[1], timeout=10)
            taken = len(late.beats)
            late.release()  # the answer comes, long after the agent gave up on it
            await eventually(lambda: lifecycle.phase is Phase.registered and len(late.beats) >= taken + 2, timeout=10)

            served = await _served(http, live, before)
            assert (provider.reported_prompt_tokens, provider.reported_completion_tokens) == served, "each token counted once, as /metrics counts it"
            status = await asyncio.to_thread(run_cli, "status", "--json", env={"VRAM_SUPPLY_PORT": str(free_port())})
            await lifecycle.stop(timeout=5)

    keys = [key for key, beat in late.beats if beat["prompt_tokens"] or beat["completion_tokens"]]
    assert keys[0] is not None and keys[1] == keys[0], "the held heartbeat was sent again as it was"
    assert keys[0] not in keys[2:], "the heartbeats after it have keys of their own"
    assert status.returncode == 0, status.stdout + status.stderr
    registration = json.loads(status.stdout)["registration"]
    assert registration["phase"] == "registered" and registration["provider_id"] == provider.id
    assert registration["last_heartbeat_at"] is not None


async def test_a_draining_notice_answered_after_the_drain_gave_up_on_it_is_sent_again_not_counted_twice() -> None:
    """At SIGTERM the notice carries what was served; the platform takes it but answers after the
    drain's wait. It is sent again as it was before the last heartbeat, which carries only what
    the drain served (it used to carry the notice's tokens again)."""
    late = LateAnswers()
    platform = LivePlatform()
    platform.platform.app.middlewares.append(late.middleware)
    counters = EngineCounters()
    with platform:
        lifecycle = make_lifecycle(platform.url, counters, interval=60)  # no regular heartbeat before the drain
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 10)
        [provider] = platform.providers
        counters.prompt_tokens_total, counters.completion_tokens_total = 10, 100
        late.arm("draining")
        await lifecycle.drain(timeout=3)  # as in `serve`: the notice's answer does not come within it
        assert late.holding.is_set() and lifecycle.phase is Phase.draining
        counters.prompt_tokens_total, counters.completion_tokens_total = 14, 130  # served during the drain
        late.release()
        assert await lifecycle.stop(timeout=5) is True
    assert (provider.reported_prompt_tokens, provider.reported_completion_tokens) == (14, 130), "each token counted once"
    notice, again, last = [(key, beat["prompt_tokens"], beat["completion_tokens"]) for key, beat in late.beats]
    assert notice == again and last[1:] == (4, 30)


async def test_the_reference_platform_counts_a_heartbeat_sent_again_with_its_key_once() -> None:
    with LivePlatform() as platform:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            offer = build_offer(market_options(Settings(endpoint_url="https://gpu.example.com", endpoint_token="tok")), _Identity(), 2048, "tok")
            async with http.post(platform.url + "/v1/providers/register", json=offer.request.model_dump(mode="json", exclude_none=True)) as response:
                provider_id = (await response.json())["provider_id"]
            beat = {"provider_id": provider_id, "status": "online", "slots_total": 2, "slots_busy": 0, "queue_depth": 0, "prompt_tokens": 5, "completion_tokens": 9}
            answers = []
            for body, key in [(beat, "k1"), (beat, "k1"), (beat, None), ({**beat, "completion_tokens": 10}, "k1")]:
                headers = {IDEMPOTENCY_KEY_HEADER: key} if key else {}
                async with http.post(platform.url + HEARTBEAT_PATH, json=body, headers=headers) as response:
                    answers.append((response.status, await response.json()))
    [provider] = platform.providers
    assert [status for status, _ in answers] == [200, 200, 200, 422]
    assert answers[1][1] == answers[0][1] == {"provider_id": provider_id, "status": "online"}
    assert answers[3][1]["error"]["code"] == "idempotency_key_reused"
    assert (provider.reported_prompt_tokens, provider.reported_completion_tokens) == (10, 18), "the one sent again with its key counted once; the one without a key counted"


async def _served(http: aiohttp.ClientSession, live: LiveServer, before: tuple[float, float]) -> tuple[int, int]:
    after = await scrape(http, live.url)
    return int(after[0] - before[0]), int(after[1] - before[1])


class _Identity:
    model_id = "stories260k"
    repo_id = None
    filename = "stories260K.gguf"
    sha256 = None
    quant = None
