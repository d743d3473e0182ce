"""One number for tokens served: what buyers are told, what heartbeats report, what /metrics shows.

A mixed run (plain and streamed requests, ``n`` > 1, chat, streams cut mid-way) goes through the
real HTTP server while the real lifecycle heartbeats to the reference platform. The engine's
``submit`` is watched (not replaced) so that the usage of every request is known, even of the
streams whose buyer hung up before the usage chunk.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from live_platform import API_KEY, LivePlatform
from live_server import LiveServer
from test_server_ops import metric_samples

from vramsupply.config import Settings
from vramsupply.engine import Generation
from vramsupply.platform import PlatformClient, build_offer
from vramsupply.platform.backoff import Backoff
from vramsupply.platform.lifecycle import ProviderLifecycle
from vramsupply.serve.options import market_options

CUT_MAX_TOKENS = 500
TOKENS = ("vramsupply_prompt_tokens_total", "vramsupply_completion_tokens_total")


class Watched:
    """Every request the engine was given, grouped by request (choices share their first's prompt)."""

    def __init__(self, live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.requests: list[list[Generation]] = []
        engine = live.engine
        assert engine is not None
        submit = engine.submit

        def watching(request: Any, *, shares_prompt_with: Generation | None = None, **options: Any) -> Generation:
            generation = submit(request, shares_prompt_with=shares_prompt_with, **options)
            if shares_prompt_with is None:
                self.requests.append([generation])
            else:
                next(group for group in self.requests if group[0] is shares_prompt_with).append(generation)
            return generation

        monkeypatch.setattr(engine, "submit", watching)

    def ended(self) -> bool:
        return all(generation.usage is not None for group in self.requests for generation in group)

    def totals(self, max_tokens: int | None = None) -> tuple[int, int]:
        """The usage of each request (those with ``max_tokens``, or all) as OpenAI bills it: the
        prompt once, every choice's completion."""
        prompt = completion = 0
        for group in self.requests:
            if max_tokens is not None and group[0].task is not None and group[0].task.max_completion != max_tokens:
                continue
            usages = [g.usage for g in group]
            assert all(u is not None for u in usages), "every request has ended"
            prompt += usages[0].prompt_tokens  # type: ignore[union-attr]
            completion += sum(u.completion_tokens for u in usages)  # type: ignore[union-attr]
        return prompt, completion


async def scrape(http: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    async with http.get(url + "/metrics") as response:
        samples = metric_samples(await response.text())
    return samples[(TOKENS[0], ())], samples[(TOKENS[1], ())]


async def buyer_usage(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, int]:
    async with http.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        if not body.get("stream"):
            usage = (await response.json())["usage"]
            return usage["prompt_tokens"], usage["completion_tokens"]
        usage = None
        async for line in response.content:
            if line.startswith(b"data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
        assert usage is not None
        return usage["prompt_tokens"], usage["completion_tokens"]


async def cut_stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any], after_chunks: int) -> None:
    async with http.post(url, json={**body, "stream": True}) as response:
        seen = 0
        async for line in response.content:
            seen += line.startswith(b"data: {")
            if seen >= after_chunks:
                break  # leaving the block closes the connection mid-stream


async def test_buyer_usage_heartbeats_and_metrics_agree_over_a_mixed_run(monkeypatch: pytest.MonkeyPatch) -> None:
    with LivePlatform() as platform:
        async with LiveServer(parallel=4) as live, aiohttp.ClientSession() as http:
            watched = Watched(live, monkeypatch)
            settings = Settings(endpoint_url="https://gpu.example.com", endpoint_token="tok")
            engine = live.engine
            assert engine is not None
            offer = build_offer(market_options(settings), _Identity(), served_context=engine.n_ctx, endpoint_token="tok")
            lifecycle = ProviderLifecycle(
                PlatformClient(platform.url, API_KEY, attempts=1), offer.request, engine.stats, heartbeat_interval=0.1, backoff=Backoff(initial=0.05, cap=0.2)
            )
            lifecycle.start()
            await asyncio.wait_for(lifecycle.registered.wait(), 10)
            metrics_before = await scrape(http, live.url)

            text, chat = live.base_url + "/completions", live.base_url + "/chat/completions"
            long = {"max_tokens": CUT_MAX_TOKENS, "ignore_eos": True}
            told = await asyncio.gather(
                buyer_usage(http, text, {"prompt": "Once upon a time", "max_tokens": 8}),
                buyer_usage(http, text, {"prompt": "The dog ran", "max_tokens": 6, "n": 3, "ignore_eos": True}),
                buyer_usage(http, chat, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "n": 2}),
                buyer_usage(http, text, {"prompt": "Tim had", "max_tokens": 7, "stream": True, "stream_options": {"include_usage": True}}),
                buyer_usage(
                    http, chat, {"messages": [{"role": "user", "content": "Sue"}], "max_tokens": 9, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
                ),
                *(cut_stream(http, text, {"prompt": f"Story {i}", **long}, after_chunks=3) for i in range(4)),
                cut_stream(http, text, {"prompt": "Cut with choices", "n": 3, **long}, after_chunks=4),
            )
            await _idle(live, watched)
            prompt, completion = watched.totals()
            await _eventually(lambda: platform.providers[0].reported_prompt_tokens == prompt and platform.providers[0].reported_completion_tokens == completion)
            metrics_after = await scrape(http, live.url)
            await lifecycle.stop(timeout=5)

    assert len(watched.requests) == 10
    assert sum(len(group) for group in watched.requests) == 1 + 3 + 2 + 1 + 2 + 4 + 3
    assert (metrics_after[0] - metrics_before[0], metrics_after[1] - metrics_before[1]) == (prompt, completion)
    told_completed = [usage for usage in told if usage is not None]
    cut_prompt, cut_completion = watched.totals(max_tokens=CUT_MAX_TOKENS)
    assert (sum(p for p, _ in told_completed), sum(c for _, c in told_completed)) == (prompt - cut_prompt, completion - cut_completion)
    assert 0 < cut_completion < 7 * CUT_MAX_TOKENS, "the cut streams were billed what they generated before the buyer left"


class _Identity:
    model_id = "stories260k"
    repo_id = None
    filename = "stories260K.gguf"
    sha256 = None
    quant = None


async def _idle(live: LiveServer, watched: Watched) -> None:
    """Every slot idle and every request's end delivered: the scheduler counts a request done when
    it ends it, and hands its final usage to the event loop a moment later (on a loaded machine,
    after a scrape that already saw the engine idle)."""
    engine = live.engine
    assert engine is not None
    deadline = time.monotonic() + 10
    while (stats := engine.stats()).slots_busy or stats.queue_depth or not watched.ended():
        assert time.monotonic() < deadline, "every slot idle and every request ended within seconds after the last buyer left"
        await asyncio.sleep(0.02)


async def _eventually(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the heartbeats never reported the served tokens"
        await asyncio.sleep(0.05)
