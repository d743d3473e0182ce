"""A buyer behind our front while the upstream stalls or floods: no headers, a slow loris, a stream
kept alive by comments or flowing for ever, endless lines and events, answers and error bodies too
big to hold, gzip bombs. Each ends within its bound (``RelayLimits``) as OpenAI error JSON or a
stream's error event, and what was delivered is in the earnings ledger.

The upstream is ``tests/doubles/hostile_upstream.py``, as in ``test_upstream_hostile.py`` (whose
other misbehaviours are statuses, malformed answers and implausible usage).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from typing import Any

import pytest
from aiohttp import web
from doubles.hostile_upstream import CHAT, HostileUpstream, answering, chunk, event, fronted, hang, streaming, whole
from test_upstream_hostile import USAGE, no_trouble_of_ours

from vramsupply.upstream.limits import RelayLimits


async def test_an_endless_sse_line_ends_the_stream_and_what_was_sent_is_billed(caplog: pytest.LogCaptureFixture) -> None:
    upstream = HostileUpstream()
    huge = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * (2 << 20) + b'"}}]}\n\n'
    upstream.generation = streaming(event(chunk("start")), huge, event(chunk(usage=USAGE)), event("[DONE]"))
    async with fronted(upstream) as front:
        events = await front.stream({**CHAT, "stream_options": {"include_usage": True}})
        rows = front.ledger.rows
    assert events[0]["choices"][0]["delta"]["content"] == "start"
    assert len(events) == 2 and "larger than 1048576 bytes" in events[1]["error"]["message"]
    assert [(r.completion_tokens, r.complete) for r in rows] == [(len("start"), False)]
    no_trouble_of_ours(caplog)


async def test_an_event_that_never_ends_is_bounded_too() -> None:
    upstream = HostileUpstream()
    lines = b"".join(b'data: {"choices":[]}\n' for _ in range(20_000))  # no blank line: one growing event
    upstream.generation = streaming(event(chunk("a")), lines, event("[DONE]"))
    async with fronted(upstream, RelayLimits(max_event_bytes=64 << 10)) as front:
        events = await front.stream(CHAT)
    assert "larger than 65536 bytes" in events[-1]["error"]["message"]


async def test_an_upstream_that_never_answers_is_a_504_within_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    upstream = HostileUpstream()

    async def no_headers(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        await hang()
        raise AssertionError

    upstream.generation = no_headers
    async with fronted(upstream, RelayLimits(answer_seconds=0.5, first_event_seconds=0.5)) as front:
        started = time.monotonic()
        status, answer = await front.post(CHAT)
        assert (status, answer["error"]["code"]) == (504, "upstream_timeout")
        status, answer = await front.post({**CHAT, "stream": True})
        assert (status, answer["error"]["code"]) == (504, "upstream_timeout") and "no headers within 0.5s" in answer["error"]["message"]
        assert time.monotonic() - started < 5
        assert front.backend.in_flight() == 0, "nothing left for a drain to wait on"
    no_trouble_of_ours(caplog)


async def test_a_slow_loris_answer_ends_at_the_overall_bound() -> None:
    upstream = HostileUpstream()

    async def slow_loris(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        while True:
            await response.write(b" ")
            await asyncio.sleep(0.05)

    upstream.generation = slow_loris
    async with fronted(upstream, RelayLimits(answer_seconds=0.5)) as front:
        status, answer = await front.post(CHAT)
    assert (status, answer["error"]["code"]) == (504, "upstream_timeout")


async def test_a_stream_kept_alive_by_comments_alone_ends_and_is_billed() -> None:
    upstream = HostileUpstream()

    async def ping_forever(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(event(chunk("a")))
        while True:
            await asyncio.sleep(0.05)
            await response.write(b": ping\n\n")

    upstream.generation = ping_forever
    async with fronted(upstream, RelayLimits(idle_seconds=0.5)) as front:
        events = await front.stream(CHAT)
        rows = front.ledger.rows
    assert events[0]["choices"][0]["delta"]["content"] == "a"
    assert events[-1]["error"]["code"] == "upstream_timeout" and "no event within 0.5s" in events[-1]["error"]["message"]
    assert [(r.completion_tokens, r.complete) for r in rows] == [(1, False)]


async def test_a_stream_that_flows_forever_ends_at_the_overall_bound() -> None:
    upstream = HostileUpstream()

    async def forever(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while True:
            await response.write(event(chunk("a")))
            await asyncio.sleep(0.02)

    upstream.generation = forever
    async with fronted(upstream, RelayLimits(stream_seconds=0.5)) as front:
        events = await front.stream(CHAT)
    assert "did not finish within 0.5s" in events[-1]["error"]["message"]


async def test_a_flood_of_an_answer_is_a_502_and_never_held_whole(caplog: pytest.LogCaptureFixture) -> None:
    upstream = HostileUpstream()
    big = whole("x" * (3 << 20))
    upstream.generation = answering(big)
    async with fronted(upstream, RelayLimits(max_answer_bytes=1 << 20)) as front:
        status, answer = await front.post(CHAT)
        assert (status, answer["error"]["code"]) == (502, "upstream_error") and "larger than 1048576 bytes" in answer["error"]["message"]

        bomb = gzip.compress(json.dumps(big).encode())  # 3 MiB that arrive as a few KiB
        upstream.generation = lambda request, body: asyncio.sleep(0, web.Response(body=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}))
        status, answer = await front.post(CHAT)
        assert (status, answer["error"]["code"]) == (502, "upstream_error") and "larger than" in answer["error"]["message"]
    no_trouble_of_ours(caplog)


@pytest.mark.parametrize("bombed", ["tokenize", "replay"])
async def test_a_flood_answering_a_count_is_refused_and_the_buyer_still_gets_the_answer(bombed: str, caplog: pytest.LogCaptureFixture) -> None:
    """An answer without usage is counted with the upstream's tokenizer and a 1-token replay; each
    read a gzip bomb (32 MiB from 32 KiB) whole into memory."""
    upstream = HostileUpstream()
    upstream.counting_bomb = gzip.compress(b'{"tokens": [' + b"1, " * (11 << 20) + b"1]}")
    upstream.bombed = {bombed}
    upstream.generation = answering(whole("hi there"))
    async with fronted(upstream) as front:
        status, answer = await front.post(CHAT)
    assert status == 200 and answer["choices"][0]["message"]["content"] == "hi there"
    assert "usage" not in answer
    assert "answer is larger than 16777216 bytes" in caplog.text


async def test_an_endless_error_body_is_not_read_to_its_end() -> None:
    upstream = HostileUpstream()

    async def endless_error(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(status=500)
        await response.prepare(request)
        while True:
            await response.write(b"Traceback " * 1000)
            await asyncio.sleep(0.01)

    upstream.generation = endless_error
    async with fronted(upstream) as front:
        status, answer = await asyncio.wait_for(front.post(CHAT), 5)
    assert (status, answer["error"]["code"]) == (502, "upstream_error")
