"""The engine's token counters (heartbeats, ``/metrics``) leave out a request whose buyer got only an error.

The counters counted a prompt when its request took a slot, so a request whose prompt llama.cpp
then failed to decode stayed counted: the platform heard of tokens its buyer never got, while the
earnings ledger (rightly) recorded nothing. Now a prompt is counted once its request served
something (its first token, or an end without an error), once whatever its ``n``; a request whose
buyer got only an error is never counted, and the counters never go down.

Only ``llama_cpp.llama_decode`` is replaced (``FailingDecode``); the server and engine are real.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from live_server import LiveServer
from test_ledger_serve import TOKEN, FailingDecode, buy_once

from vramsupply.engine import EngineStats


async def counted(live: LiveServer) -> int:
    """The prompt tokens counted once every request has ended in the engine (a failed answer can
    reach its buyer before the engine has ended the request's other choices)."""
    for _ in range(3000):
        stats = live.state.stats()
        assert isinstance(stats, EngineStats)
        if stats.slots_busy == 0 and stats.queue_depth == 0:
            return stats.prompt_tokens_total
        await asyncio.sleep(0.01)
    raise AssertionError("the engine never went idle")


async def ask_for_two(live: LiveServer) -> dict[str, Any]:
    """One request for two choices, as one answer."""
    body = {"model": "stories260k", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 5, "ignore_eos": True, "n": 2}
    async with aiohttp.ClientSession() as http, http.post(f"{live.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        return {"status": response.status, **await response.json()}


async def test_requests_whose_buyers_got_only_an_error_are_not_counted_as_served(monkeypatch: pytest.MonkeyPatch) -> None:
    decode = FailingDecode(monkeypatch)
    async with LiveServer(endpoint_token=TOKEN, parallel=2) as live:
        served = await buy_once(live, stream=False)
        prompt = served["usage"]["prompt_tokens"]
        start = await counted(live)

        decode.allow(0)  # no prompt is decoded from here
        refused = await buy_once(live, stream=False)
        failed_stream = await buy_once(live, stream=True)
        refused_two = await ask_for_two(live)
        after_failures = await counted(live)

        decode.allow(4)  # the prompt and three tokens, then the decode fails: a stream cut short
        cut = await buy_once(live, stream=True, max_tokens=40)
        after_cut = await counted(live)
        decode.allow(None)
        again = await buy_once(live, stream=False)
        at_end = await counted(live)

    assert served["status"] == again["status"] == 200 and start == prompt
    assert refused["status"] >= 500 and failed_stream["error"] and failed_stream["chunks"] == 0
    assert refused_two["status"] >= 500 and "error" in refused_two
    assert after_failures == start, "three requests that served nothing (one of them n=2) count no prompt token"
    assert cut["error"] and cut["chunks"] > 0
    assert after_cut == start + prompt, "a stream cut after its first tokens served its buyer: its prompt counts"
    assert at_end == start + 2 * prompt
