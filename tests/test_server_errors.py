"""Every error status the API can answer, produced by a real request, in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
from aiohttp import web
import openai
import pytest
from openai import OpenAI

from live_server import MODEL_ID, LiveServer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(n_ctx=256, parallel=2, max_body_bytes=4096) as live:
        yield live


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def assert_openai_error(body: dict[str, Any], *, type: str = "invalid_request_error", code: str | None = None, param: str | None = None) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in body["error"]["message"]
    assert body["error"]["type"] == type
    if code is not None:
        assert body["error"]["code"] == code
    assert body["error"]["param"] == param


async def post(http: aiohttp.ClientSession, url: str, body: Any = None, *, data: str | bytes | None = None) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    payload = json.dumps(body) if data is None else data
    async with http.post(url, data=payload, headers={"Content-Type": "application/json"}) as response:
        return response.status, await response.json(), response


async def test_malformed_json_is_400(server: LiveServer, http: aiohttp.ClientSession) -> None:
    status, body, _ = await post(http, server.url + CHAT, data='{"messages": [')

    assert status == 400
    assert_openai_error(body, code="invalid_json")


async def test_a_body_saved_with_a_byte_order_mark_is_read(server: LiveServer, http: aiohttp.ClientSession) -> None:
    """A JSON file from Notepad (``curl -d @file``) opens with U+FEFF: "expected value at line 1 column 1"."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    status, answer, _ = await post(http, server.url + CHAT, data=b"\xef\xbb\xbf" + json.dumps(body).encode())
    assert status == 200, answer


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_not_in_its_stated_content_encoding_is_400(server: LiveServer, http: aiohttp.ClientSession, encoding: str) -> None:
    """It was a 500, with two tracebacks in the log, for any client that says gzip and sends text."""
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    async with http.post(server.url + CHAT, data=b"not compressed at all", headers=headers) as response:
        status, body = response.status, await response.json()

    assert status == 400
    assert_openai_error(body, code="invalid_body")
    assert body["error"]["message"].startswith("The request body cannot be read: ")
    ok, _, _ = await post(http, server.url + CHAT, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert ok == 200, "the server answers the next request"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "invalid_http"),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\n{}", "invalid_body"),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", "invalid_http"),
    ],
    ids=["url-over-8190-bytes", "brotli-body", "chunked-and-content-length"],
)
async def test_what_aiohttps_parser_refuses_is_openai_error_json(server: LiveServer, http: aiohttp.ClientSession, raw: bytes, code: str) -> None:
    """Before: aiohttp's text/plain 400, for br "Please install `Brotli`", advice for the server's owner."""
    assert server.server is not None
    counted = (await statuses(http, server, "unmatched")).get("400", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.server.port)
    writer.write(raw)
    head, _, body = (await reader.read()).partition(b"\r\n\r\n")
    writer.close()

    assert head.startswith(b"HTTP/1.0 400 ") and b"Content-Type: application/json" in head and b"x-request-id: req_" in head
    assert (await statuses(http, server, "unmatched")).get("400", 0) == counted + 1, "counted as every other answer (it was not)"
    assert_openai_error(json.loads(body), code=code)
    assert b"Brotli" not in body
    ok, _, _ = await post(http, server.url + COMPLETIONS, {"prompt": "Once", "max_tokens": 2})
    assert ok == 200, "the server answers the next request"


async def statuses(http: aiohttp.ClientSession, server: LiveServer, route: str) -> dict[str, int]:
    async with http.get(server.url + "/metrics") as response:
        text = await response.text()
    prefix = f'vramsupply_requests_total{{route="{route}",status="'
    return {line[len(prefix):].split('"')[0]: int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines() if line.startswith(prefix)}


async def test_a_buyer_who_leaves_as_the_stream_headers_go_out_is_a_hang_up_not_a_500(
    server: LiveServer, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under load, 6 % of streams whose buyers left within 150 ms were counted 500, each with a
    traceback: the connection was closing as the headers went out (aiohttp raises then, rather
    than cancel the handler). Here it closes at that moment every time."""
    prepare = web.StreamResponse.prepare

    async def leaving(response: web.StreamResponse, request: web.BaseRequest) -> Any:
        if response.headers.get("Content-Type", "").startswith("text/event-stream") and request.transport is not None:
            request.transport.close()
        return await prepare(response, request)

    before = await statuses(http, server, COMPLETIONS)
    monkeypatch.setattr(web.StreamResponse, "prepare", leaving)
    with caplog.at_level(logging.INFO), pytest.raises(aiohttp.ClientError):
        await post(http, server.url + COMPLETIONS, {"prompt": "Once", "max_tokens": 4, "stream": True})
    monkeypatch.undo()
    for _ in range(100):  # the handler's end, on the server's thread
        after = await statuses(http, server, COMPLETIONS)
        if after.get("499", 0) > before.get("499", 0) or after.get("500", 0) > before.get("500", 0):
            break
        await asyncio.sleep(0.05)

    assert after.get("500", 0) == before.get("500", 0), "no server error"
    assert after.get("499", 0) == before.get("499", 0) + 1, "a buyer who hung up"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


async def test_body_that_is_not_an_object_is_400(server: LiveServer, http: aiohttp.ClientSession) -> None:
    status, body, _ = await post(http, server.url + COMPLETIONS, [1, 2, 3])

    assert status == 400
    assert_openai_error(body, code="invalid_json")


@pytest.mark.parametrize(
    ("route", "request_body", "param"),
    [
        (CHAT, {"model": MODEL_ID}, "messages"),
        (CHAT, {"messages": []}, "messages"),
        (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0]"),
        (CHAT, {"messages": [{"role": "user", "content": "hi", "audio": {"id": "x"}}]}, "messages[0].audio"),
        (CHAT, {"messages": HELLO, "temperature": 3}, "temperature"),
        (CHAT, {"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        (CHAT, {"messages": HELLO, "n": 100}, "n"),
        (CHAT, {"messages": HELLO, "logit_bias": {"not-a-token": 5}}, "logit_bias.not-a-token"),
        (CHAT, {"messages": HELLO, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        (CHAT, {"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
        # The tiny model has no chat template; its ChatML fallback shows the model no tools.
        (CHAT, {"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        (CHAT, {"messages": HELLO, "tool_choice": "required"}, "tool_choice"),
        (CHAT, {"messages": HELLO, "tool_choice": "sometimes"}, "tool_choice"),
        (CHAT, {"messages": HELLO, "functions": [{"name": "f"}]}, "functions"),
        (CHAT, {"messages": HELLO, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        (CHAT, {"messages": HELLO, "modalities": ["text", "audio"]}, "modalities"),
        (CHAT, {"messages": HELLO, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        (CHAT, {"messages": HELLO, "response_format": {"type": "xml"}}, "response_format.type"),
        (CHAT, {"messages": HELLO, "stop": 5}, "stop"),
        (CHAT, {"messages": HELLO, "stop": [f"stop{i}" for i in range(17)]}, "stop"),
        (COMPLETIONS, {}, "prompt"),
        (COMPLETIONS, {"prompt": []}, "prompt"),  # ("" is the BOS token alone: test_api_client_values.py)
        (COMPLETIONS, {"prompt": [[1, 2], []]}, "prompt"),
        (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, "max_tokens"),  # (with echo it scores the prompt: test_prompt_logprobs.py)
        (COMPLETIONS, {"prompt": "hi", "best_of": 3}, "best_of"),
    ],
)
async def test_invalid_fields_are_400_naming_the_param(
    server: LiveServer, http: aiohttp.ClientSession, route: str, request_body: dict[str, Any], param: str
) -> None:
    status, body, _ = await post(http, server.url + route, request_body)

    assert status == 400
    assert_openai_error(body, param=param)
    assert param in body["error"]["message"]


@pytest.mark.parametrize(
    "request_body",
    [
        {"messages": HELLO, "max_tokens": 5, "logit_bias": {"99999999": 1}},
        {"messages": HELLO, "max_tokens": 5, "ignore_eos": True, "response_format": {"type": "json_object"}},
        {"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wizard"}}}},
    ],
)
async def test_requests_the_engine_cannot_run_are_400(server: LiveServer, http: aiohttp.ClientSession, request_body: dict[str, Any]) -> None:
    status, body, _ = await post(http, server.url + CHAT, request_body)

    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_token_ids_outside_the_vocabulary_are_400(server: LiveServer, http: aiohttp.ClientSession) -> None:
    for prompt, bad in (([1, 2, 10_000_000], "10000000"), ([-1], "-1")):
        status, body, _ = await post(http, server.url + COMPLETIONS, {"prompt": prompt})

        assert status == 400
        assert bad in body["error"]["message"] and body["error"]["param"] == "prompt"


async def test_prompt_longer_than_the_context_is_400_with_the_numbers(server: LiveServer, http: aiohttp.ClientSession) -> None:
    assert server.engine is not None
    prompt = "the cat sat on the mat. " * 80
    prompt_tokens = len(server.engine.tokenize(prompt))

    status, body, _ = await post(http, server.url + COMPLETIONS, {"prompt": prompt})

    assert status == 400
    assert_openai_error(body, code="context_length_exceeded", param="prompt")
    assert str(prompt_tokens) in body["error"]["message"] and "256" in body["error"]["message"]


async def test_a_prompt_that_fills_the_context_alone_is_told_so_whatever_max_tokens_says(server: LiveServer, http: aiohttp.ClientSession) -> None:
    """An echo of a prompt exactly the context's length, with max_tokens 0, was told that the
    prompt plus max_tokens (0) was 256 tokens, "more than the context of 256"."""
    assert server.engine is not None
    n_ctx = server.engine.n_ctx
    status, body, _ = await post(http, server.url + COMPLETIONS, {"prompt": [1] * n_ctx, "max_tokens": 0, "echo": True})
    assert status == 400
    assert_openai_error(body, code="context_length_exceeded", param="prompt")
    assert body["error"]["message"] == (
        f"This model's context is {n_ctx} tokens: the prompt has {n_ctx} tokens but the context holds {n_ctx} "
        f"(at most {n_ctx - 1} prompt tokens, leaving room for one generated token)."
    )


async def test_max_tokens_past_the_context_is_400_naming_max_tokens(server: LiveServer, http: aiohttp.ClientSession) -> None:
    status, body, _ = await post(http, server.url + CHAT, {"messages": HELLO, "max_tokens": 1000})

    assert status == 400
    assert_openai_error(body, code="context_length_exceeded", param="max_tokens")
    assert "1000" in body["error"]["message"]


def test_sdk_raises_bad_request_for_context_overflow(server: LiveServer) -> None:
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            client.completions.create(model=MODEL_ID, prompt="word " * 400)

    assert raised.value.code == "context_length_exceeded"


def test_unknown_model_is_404_model_not_found(server: LiveServer) -> None:
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as raised:
            client.chat.completions.create(model="gpt-4o", messages=HELLO)

    assert raised.value.status_code == 404
    assert raised.value.code == "model_not_found"
    assert raised.value.param == "model"
    assert "gpt-4o" in raised.value.message


@pytest.mark.parametrize("path", ["/v1/embeddings", "/nowhere", "/v1"])
async def test_unknown_route_is_404(server: LiveServer, http: aiohttp.ClientSession, path: str) -> None:
    status, body, _ = await post(http, server.url + path, {"input": "x"})

    assert status == 404
    assert_openai_error(body, code="unknown_url")
    assert path in body["error"]["message"]


async def test_wrong_method_is_405_with_allow(server: LiveServer, http: aiohttp.ClientSession) -> None:
    async with http.get(server.url + CHAT) as response:
        status, body, allow = response.status, await response.json(), response.headers.get("Allow")

    assert status == 405
    assert_openai_error(body, code="method_not_allowed")
    assert allow == "POST"


async def test_body_over_the_limit_is_413(server: LiveServer, http: aiohttp.ClientSession) -> None:
    status, body, _ = await post(http, server.url + CHAT, {"messages": [{"role": "user", "content": "x" * 5000}]})

    assert status == 413
    assert_openai_error(body, code="request_too_large")
    assert "4096" in body["error"]["message"]


@pytest.mark.parametrize(
    "raw",
    ["", "null", "true", '"text"', "{}", '{"messages": null}', '{"messages": [null]}', '{"messages": [{"role": "user", "content": {"a": 1}}]}',
     '{"messages": [{"role": "user", "content": "hi"}], "stream_options": 5}', '{"prompt": {"x": 1}}', "\xff\xfe"],
)
async def test_garbage_never_gets_a_500(server: LiveServer, http: aiohttp.ClientSession, raw: str) -> None:
    for route in (CHAT, COMPLETIONS):
        status, body, _ = await post(http, server.url + route, data=raw.encode("latin-1"))
        assert status == 400, (route, raw, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "5"), ("max_tokens", True), ("max_tokens", 5.0), ("stream", "yes"), ("n", "2"), ("temperature", "0.5"), ("logprobs", "yes"),
        # accepted and unused, typed all the same
        ("user", 123), ("metadata", "k"), ("metadata", ["k"]), ("safety_identifier", 7), ("prompt_cache_key", False),
    ],
)
async def test_a_value_of_the_wrong_type_is_400_naming_it_not_coerced(
    server: LiveServer, http: aiohttp.ClientSession, field: str, value: Any
) -> None:
    """As at OpenAI: ``true`` was taken for one token, and ``"yes"`` for a stream."""
    status, body, _ = await post(http, server.url + CHAT, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, field: value})

    assert status == 400
    assert_openai_error(body, param=field)


async def test_the_unused_openai_fields_are_taken_when_typed_as_openai_types_them(server: LiveServer, http: aiohttp.ClientSession) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "user": "u-1", "metadata": {"k": "v"}, "safety_identifier": "s", "prompt_cache_key": "p", "store": True}
    status, answer, _ = await post(http, server.url + CHAT, body)
    assert status == 200, answer
    legacy, answer, _ = await post(http, server.url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "user": "u-1"})
    assert legacy == 200, answer
    status, answer, _ = await post(http, server.url + CHAT, {**body, "metadata": {"k": 1}})
    assert status == 400
    assert_openai_error(answer, param="metadata.k")


async def test_numbers_stay_numbers_and_logit_bias_keys_are_token_ids(server: LiveServer, http: aiohttp.ClientSession) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 1, "top_p": 1, "logit_bias": {"5": 1.5, "6": -2}}
    status, answer, _ = await post(http, server.url + CHAT, body)

    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] <= 2


async def test_the_responses_api_is_a_404_that_names_the_api_served(server: LiveServer, http: aiohttp.ClientSession) -> None:
    """openai-agents and langchain's use_responses_api call /v1/responses: a bare "Invalid URL" left
    the buyer guessing."""
    status, body, _ = await post(http, server.url + "/v1/responses", {"model": "m", "input": "x"})
    assert status == 404 and body["error"]["code"] == "unknown_url"
    assert body["error"]["message"].endswith("this server serves OpenAI's Chat Completions API (/v1/chat/completions), not its Responses API")
