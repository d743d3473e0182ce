"""A buyer waiting on an upstream that stops answering altogether (a wedged llama-server, a
paused container): once its ``/health`` has gone unanswered for ``RelayLimits.hung_seconds``, what
it has sent nothing for as long ends with a 504 (an error event once a stream has begun), not at
the request's own bound (600 s for a whole answer), long after ``/health`` said 503. A stream that
still flows is no hung request, whatever ``/health`` says.

The upstream is ``tests/doubles/hostile_upstream.py``; the front before it is ours, on localhost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from aiohttp import web
from doubles.hostile_upstream import CHAT, HostileUpstream, chunk, event, fronted, hang, streaming

from vramsupply.upstream.limits import RelayLimits

HUNG = RelayLimits(hung_seconds=0.5)


async def no_headers(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    await hang()
    raise AssertionError


async def test_a_whole_answer_and_a_stream_waiting_on_a_hung_upstream_end_once_its_health_goes_unanswered(caplog: pytest.LogCaptureFixture) -> None:
    upstream = HostileUpstream()
    upstream.generation = no_headers
    async with fronted(upstream, HUNG) as front:
        waiting = [asyncio.create_task(front.post(CHAT)), asyncio.create_task(front.post({**CHAT, "stream": True}))]
        await asyncio.sleep(0.3)
        upstream.silent = True
        started = time.monotonic()
        answers = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        waited = time.monotonic() - started
        health = await front.health()
        in_flight = front.backend.in_flight()
    for status, answer in answers:
        assert (status, answer["error"]["code"]) == (504, "upstream_timeout"), answer
        assert "it stopped answering: nothing came for 0.5s while its health checks went unanswered" in answer["error"]["message"]
    assert waited < 5, "ended after the upstream's silence, not at the request's 600 s bound"
    assert health[0] == 503 and in_flight == 0
    assert "ending 2 request(s) it has sent nothing for 0.5s" in caplog.text


async def test_a_stream_begun_then_hung_ends_with_an_error_event_and_what_was_sent_is_billed() -> None:
    upstream = HostileUpstream()
    upstream.generation = streaming(event(chunk("abc")), then=hang)
    async with fronted(upstream, HUNG) as front:
        stream = asyncio.create_task(front.stream(CHAT))
        await asyncio.sleep(0.3)
        upstream.silent = True
        events = await asyncio.wait_for(stream, 10)
        rows = front.ledger.rows
    assert events[0]["choices"][0]["delta"]["content"] == "abc"
    assert events[-1]["error"]["code"] == "upstream_timeout" and "stopped answering" in events[-1]["error"]["message"]
    assert [(r.completion_tokens, r.complete) for r in rows] == [(3, False)]


async def test_a_stream_that_still_flows_is_relayed_to_its_end_while_health_goes_unanswered() -> None:
    upstream = HostileUpstream()

    async def slow_but_flowing(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(15):  # 1.5 s, three times the silence that makes an upstream hung here
            await response.write(event(chunk("a")))
            await asyncio.sleep(0.1)
        await response.write(event("[DONE]"))
        return response

    upstream.generation = slow_but_flowing
    async with fronted(upstream, HUNG) as front:
        stream = asyncio.create_task(front.stream(CHAT))
        await asyncio.sleep(0.05)
        upstream.silent = True
        events = await asyncio.wait_for(stream, 10)
    assert events[-1] == "[DONE]" and len(events) == 16


async def test_an_upstream_that_answers_again_in_time_ends_nothing(caplog: pytest.LogCaptureFixture) -> None:
    upstream = HostileUpstream()

    async def answers_late(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(1.5)
        return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "late"}, "finish_reason": "stop"}]})

    upstream.generation = answers_late
    caplog.set_level(logging.WARNING)
    async with fronted(upstream, RelayLimits(hung_seconds=1.0)) as front:
        answer = asyncio.create_task(front.post(CHAT))
        for _ in range(3):  # silent for a moment, three times, each shorter than hung_seconds
            upstream.silent = True
            await asyncio.sleep(0.3)
            upstream.silent = False
            await asyncio.sleep(0.2)
        status, body = await asyncio.wait_for(answer, 10)
    assert status == 200 and body["choices"][0]["message"]["content"] == "late"
    assert "ending" not in caplog.text
