"""A buyer behind our front while the upstream misbehaves: wrong statuses, malformed answers and
streams, implausible usage. Whatever the upstream does, the buyer gets OpenAI error JSON (a 4xx
only for their own request; 502/503/504 for the upstream's failings), a stream always ends with an
error event, and what was delivered is in the earnings ledger. Its stalls and floods are in
``test_upstream_stalls_and_floods.py``.

The upstream is ``tests/doubles/hostile_upstream.py``, a small real aiohttp server; the front in
between is ours, served for real on localhost.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from typing import Any

import pytest
from aiohttp import web
from doubles.hostile_upstream import (
    CHAT,
    REPLAY_PROMPT_TOKENS,
    HostileUpstream,
    answering,
    chunk,
    event,
    fronted,
    streaming,
    whole,
)

USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def no_trouble_of_ours(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], "no traceback, no error of ours"


def text_answer(status: int, text: str, content_type: str = "text/plain"):  # type: ignore[no-untyped-def]
    async def handler(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=status, text=text, content_type=content_type)

    return handler


@pytest.mark.parametrize(
    ("upstream_status", "upstream_body", "buyer_status", "code"),
    [
        (500, "Internal Server Error\nTraceback (most recent call last): File /opt/app.py", 502, "upstream_error"),
        (404, "<html>not found</html>", 502, "upstream_error"),
        (401, json.dumps({"error": {"message": "Incorrect API key", "type": "invalid_request_error", "code": "invalid_api_key"}}), 502, "upstream_error"),
        (201, json.dumps(whole()), 502, "upstream_error"),
        (204, "", 502, "upstream_error"),
        (599, "weird", 502, "upstream_error"),
        (400, json.dumps({"error": {"message": "This model's maximum context length is 8192 tokens", "type": "BadRequestError", "code": "context_length_exceeded"}}), 400, "context_length_exceeded"),
        (422, json.dumps({"detail": [{"loc": ["body", "temperature"], "msg": "bad"}]}), 422, None),
        (429, json.dumps({"error": {"message": "queue full"}}), 429, "queue_full"),
    ],
)
async def test_the_upstreams_status_is_the_buyers_only_when_it_judges_their_request(
    upstream_status: int, upstream_body: str, buyer_status: int, code: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = HostileUpstream()
    upstream.generation = text_answer(upstream_status, upstream_body, "application/json" if upstream_body.startswith("{") else "text/plain")
    async with fronted(upstream) as front:
        status, answer = await front.post(CHAT)
    assert (status, answer["error"]["code"]) == (buyer_status, code)
    assert "Traceback" not in answer["error"]["message"] and "/opt/app.py" not in answer["error"]["message"]
    assert answer["error"]["type"] == ("server_error" if buyer_status >= 500 else "rate_limit_error" if buyer_status == 429 else "invalid_request_error")
    if buyer_status == 400:
        assert "maximum context length is 8192" in answer["error"]["message"]
    if upstream_status == 401:
        assert "--upstream-api-key" in caplog.text, "the provider is told which setting is wrong"
    no_trouble_of_ours(caplog)


@pytest.mark.parametrize(
    "error",
    [
        {"code": 400, "message": "the request exceeds the available context size, try increasing it", "type": "exceed_context_size_error"},  # llama-server
        {"message": "This model's maximum context length is 2048 tokens. However, you requested 2050 tokens.", "type": "BadRequestError", "code": None},  # vLLM
        {"message": "The input (3000 tokens) is longer than the model's context length (2048 tokens).", "type": "BadRequestError"},  # SGLang
        {"message": "Requested tokens (3000) exceed context window of 2048", "type": "internal_server_error"},  # llama_cpp.server
    ],
    ids=["llama-server", "vllm", "sglang", "llama-cpp-python"],
)
async def test_a_prompt_past_the_upstreams_context_gets_openais_code_for_it(error: dict[str, Any]) -> None:
    """The built-in engine says context_length_exceeded; an upstream said it in words only, so
    clients that shorten their prompt and retry on that code behaved otherwise by engine."""
    upstream = HostileUpstream()
    upstream.generation = text_answer(400, json.dumps({"error": error}), "application/json")
    async with fronted(upstream) as front:
        status, answer = await front.post(CHAT)
    assert (status, answer["error"]["code"]) == (400, "context_length_exceeded")
    assert answer["error"]["message"].startswith("The model server refused the request: ")


async def test_a_buyers_body_not_in_its_stated_content_encoding_is_a_400_as_at_our_engine() -> None:
    """The upstream front read the body with aiohttp's own reader: a 500 and two tracebacks."""
    async with fronted(HostileUpstream()) as front:
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        async with front.buyer.post(front.url + "/v1/chat/completions", data=b"not compressed at all", headers=headers) as response:
            status, answer = response.status, await response.json()
        async with front.buyer.post(front.url + "/v1/chat/completions", data=gzip.compress(json.dumps(CHAT).encode()), headers=headers) as response:
            compressed = response.status
    assert (status, answer["error"]["code"]) == (400, "invalid_body")
    assert compressed == 200, "a body that is gzip is read as before"


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"stream": "true"}, "stream"), ({"stream": 1}, "stream"), ({"stream": True, "stream_options": "usage"}, "stream_options"),
     ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage")],
)  # fmt: skip
async def test_a_stream_flag_that_is_no_boolean_is_the_buyers_400_never_sent_upstream(fields: dict[str, Any], param: str) -> None:
    """vLLM and SGLang take "true" and 1 for true and stream; the front read their stream as a whole
    answer: a 502 blaming the provider, for work left unbilled."""
    upstream = HostileUpstream()
    asked: list[dict[str, Any]] = []

    async def recording(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        asked.append(body)
        return web.json_response(whole(usage=USAGE))

    upstream.generation = recording
    async with fronted(upstream) as front:
        async with front.buyer.post(front.url + "/v1/chat/completions", json={**CHAT, **fields}) as response:
            status, answer = response.status, await response.json()
    assert status == 400 and answer["error"]["param"] == param and answer["error"]["code"] == "invalid_value", answer
    assert asked == []


async def test_a_redirect_is_not_followed_but_a_502() -> None:
    upstream = HostileUpstream()

    async def redirect(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(location="/elsewhere")

    upstream.generation = redirect
    async with fronted(upstream) as front:
        status, answer = await front.post(CHAT)
    assert (status, answer["error"]["code"]) == (502, "upstream_error")


@pytest.mark.parametrize(
    "answer",
    [whole(choices=5), whole(choices=["a", 1]), whole(choices=[{"index": 0, "message": {"content": "x", "tool_calls": 7}}]), {"id": "x", "object": "chat.completion"}],
    ids=["choices-int", "choices-not-objects", "tool-calls-int", "no-choices"],
)
async def test_a_malformed_answer_is_a_502_not_our_crash(answer: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    upstream = HostileUpstream()
    upstream.generation = answering(answer)
    async with fronted(upstream) as front:
        status, error = await front.post(CHAT)
    assert (status, error["error"]["code"]) == (502, "upstream_error")
    no_trouble_of_ours(caplog)


async def test_a_malformed_chunk_ends_the_stream_with_an_error_event_and_bills_what_was_sent(caplog: pytest.LogCaptureFixture) -> None:
    upstream = HostileUpstream()
    upstream.generation = streaming(event(chunk("Once")), event({"id": "x", "choices": 5}), event("[DONE]"))
    async with fronted(upstream) as front:
        events = await front.stream(CHAT)
        rows = front.ledger.rows
    assert events[0]["choices"][0]["delta"]["content"] == "Once"
    assert events[-1]["error"]["code"] == "upstream_error" and "malformed choices" in events[-1]["error"]["message"]
    assert "[DONE]" not in events
    assert [(r.prompt_tokens, r.completion_tokens, r.complete) for r in rows] == [(REPLAY_PROMPT_TOKENS, len("Once"), False)]
    no_trouble_of_ours(caplog)


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 10**30, "completion_tokens": 3},
        {"prompt_tokens": 2**62, "completion_tokens": 3},
        {"prompt_tokens": -5, "completion_tokens": 3},
        {"prompt_tokens": "5", "completion_tokens": "3"},
        {"prompt_tokens": 1e30, "completion_tokens": 3.0},
        {"prompt_tokens": 5, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 10**30}},
        {"prompt_tokens": 5, "completion_tokens": 9000},
    ],
    ids=["huge", "2**62", "negative", "strings", "floats", "cached-past-prompt", "past-the-context"],
)
async def test_implausible_usage_is_never_billed_nor_shown_but_counted_instead(usage: dict[str, Any]) -> None:
    upstream = HostileUpstream()
    upstream.generation = answering(whole("hi there", usage=usage))
    async with fronted(upstream) as front:
        status, answer = await front.post(CHAT)
        stats = front.backend.stats()
        rows = front.ledger.rows
    generated = len("hi there") + 1  # and the end-of-sequence token that ended it ("stop", no stop string), which llama-server counts
    counted = {"prompt_tokens": REPLAY_PROMPT_TOKENS, "completion_tokens": generated, "total_tokens": REPLAY_PROMPT_TOKENS + generated}
    assert status == 200 and answer["usage"] == counted, "counted with the model's tokenizer, as a missing usage is"
    assert [(r.prompt_tokens, r.completion_tokens, r.cached_tokens) for r in rows] == [(REPLAY_PROMPT_TOKENS, generated, 0)]
    assert (stats.prompt_tokens_total, stats.completion_tokens_total) == (REPLAY_PROMPT_TOKENS, generated)


@pytest.mark.parametrize("usage", [{"prompt_tokens": -5, "completion_tokens": 3}, {"prompt_tokens": "5", "completion_tokens": "3"}, {"prompt_tokens": 1e30, "completion_tokens": 3.0}])
async def test_implausible_usage_that_cannot_be_counted_is_dropped_not_passed_on(usage: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    upstream = HostileUpstream()
    upstream.tokenizes = False
    upstream.generation = answering(whole("hi there", usage=usage))
    async with fronted(upstream) as front:
        status, answer = await front.post(CHAT)
    assert status == 200 and answer["choices"][0]["message"]["content"] == "hi there"
    assert "usage" not in answer, "no usage rather than a malformed one"
    assert "could not count the usage" in caplog.text
    assert "the upstream reports no usage (or one it cannot have counted)" in caplog.text  # before: "no usage", for one it gave


async def test_a_streamed_implausible_usage_is_replaced_by_ours_and_never_leaks_to_a_buyer_who_did_not_ask() -> None:
    upstream = HostileUpstream()
    upstream.generation = streaming(event(chunk("ab")), event(chunk(usage={"prompt_tokens": -1, "completion_tokens": 2})), event("[DONE]"))
    async with fronted(upstream) as front:
        asked = await front.stream({**CHAT, "stream_options": {"include_usage": True}})
        not_asked = await front.stream(CHAT)
        rows = front.ledger.rows
    assert asked[-2]["usage"] == {"prompt_tokens": REPLAY_PROMPT_TOKENS, "completion_tokens": 2, "total_tokens": REPLAY_PROMPT_TOKENS + 2}
    assert [e for e in asked if isinstance(e, dict) and e.get("usage", {}) and e["usage"].get("prompt_tokens") == -1] == []
    assert [e for e in not_asked if isinstance(e, dict) and e.get("choices") == []] == [], "no empty chunk for a buyer who did not ask"
    assert not_asked[-1] == "[DONE]" and len(rows) == 2


async def test_a_broken_compression_is_a_502_in_one_line() -> None:
    upstream = HostileUpstream()

    async def bad_gzip(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.Response(body=b"\x1f\x8b\x08\x00garbage", headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    upstream.generation = bad_gzip
    async with fronted(upstream) as front:
        status, answer = await front.post(CHAT)
    assert (status, answer["error"]["code"]) == (502, "upstream_error") and "\n" not in answer["error"]["message"]


async def test_a_json_answer_to_a_stream_request_is_a_502() -> None:
    upstream = HostileUpstream()
    upstream.generation = answering(whole(usage=USAGE))
    async with fronted(upstream) as front:
        async with front.buyer.post(front.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
            assert response.status == 502 and (await response.json())["error"]["code"] == "upstream_error"


async def test_only_what_an_openai_client_can_read_is_relayed_whatever_the_line_endings() -> None:
    upstream = HostileUpstream()
    garbage = b"this is not sse\n\n" b"data: {not json\n\n" b"event: weird\nid: 3\n\n" b"data: \xff\xfe\x00binary\n\n" b": ping\n\n"
    cr_only = b"".join(event(c).replace(b"\n", b"\r") for c in (chunk("b"), chunk(usage=USAGE))) + b"data: [DONE]\r\r"
    upstream.generation = streaming(garbage, event(chunk("a")), cr_only)
    async with fronted(upstream) as front:
        async with front.buyer.post(front.url + "/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}) as response:
            raw = await response.read()
        rows = front.ledger.rows
    assert raw.split(b"\n\n")[0] == b": ping", "a keep-alive comment still goes through"
    assert b"not sse" not in raw and b"not json" not in raw and b"weird" not in raw and b"binary" not in raw
    events = [json.loads(block[6:]) for block in raw.split(b"\n\n") if block.startswith(b"data: {")]
    assert [e["choices"][0]["delta"]["content"] for e in events if e["choices"]] == ["a", "b"]
    assert events[-1]["usage"]["prompt_tokens"] == 5 and raw.endswith(b"data: [DONE]\n\n")
    assert [(r.prompt_tokens, r.complete) for r in rows] == [(5, True)], "the upstream's usage, even with CR line endings"


async def test_a_stream_cut_or_ended_without_done_is_billed_as_incomplete() -> None:
    upstream = HostileUpstream()

    async def cut() -> None:
        await asyncio.sleep(0.2)  # the buyer has the first event by now
        raise ConnectionResetError  # the upstream dies mid-stream

    upstream.generation = streaming(event(chunk("abc")), event(chunk("de")))
    async with fronted(upstream) as front:
        ended = await front.stream(CHAT)
        upstream.generation = streaming(event(chunk("abc")), then=cut)
        cut_events = await front.stream(CHAT)
        rows = front.ledger.rows
    assert ended[-1] == "[DONE]"
    assert cut_events[0]["choices"][0]["delta"]["content"] == "abc" and cut_events[-1]["error"]["code"] == "upstream_error"
    assert [(r.completion_tokens, r.complete) for r in rows] == [(5, False), (3, False)]


async def test_a_stream_that_ends_before_any_answer_is_an_error_event_and_not_billed() -> None:
    """llama_cpp.server fails a prompt past its context after its 200 headers, ending the body with
    no event: the buyer got a stream of nothing but [DONE], and a cut row billed tokens never served."""
    upstream = HostileUpstream()
    upstream.generation = streaming()
    async with fronted(upstream) as front:
        events = await front.stream({**CHAT, "stream_options": {"include_usage": True}})
        rows = front.ledger.rows
    assert [e["error"]["code"] for e in events] == ["upstream_error"], events
    assert "ended before any answer" in events[0]["error"]["message"]
    assert rows == []


async def test_the_usage_chunk_the_front_writes_itself_has_a_created_time() -> None:
    """OpenAI's chunk requires ``created``; the one the front adds for an upstream that sends no usage lacked it."""
    upstream = HostileUpstream()
    upstream.generation = streaming(event(chunk("abc", created=1700000000)), event("[DONE]"))
    async with fronted(upstream) as front:
        events = await front.stream({**CHAT, "stream_options": {"include_usage": True}})
    [usage] = [e for e in events if isinstance(e, dict) and e.get("usage")]
    assert usage["created"] == 1700000000 and usage["choices"] == []


async def test_an_upstream_error_event_mid_stream_reaches_the_buyer_in_openai_shape() -> None:
    upstream = HostileUpstream()
    upstream.generation = streaming(event(chunk("a")), event({"error": {"message": "CUDA out of memory\nTraceback ...", "code": 500}}), event("[DONE]"))
    async with fronted(upstream) as front:
        events = await front.stream(CHAT)
    error = events[-1]["error"]
    assert (error["type"], error["code"]) == ("server_error", "upstream_error")
    assert "CUDA out of memory" in error["message"] and "Traceback" not in error["message"]


@pytest.mark.parametrize("context", [None, 4096], ids=["context-from-the-upstream", "context-given"])
async def test_heartbeats_report_llama_servers_own_slot_count(context: int | None) -> None:
    """With --context-length given, /props (where llama-server says its slots) was never read, and
    heartbeats reported 4 slots for its 8."""
    async with fronted(HostileUpstream(), context_length=context) as front:
        assert front.backend.stats().slots_total == 8
