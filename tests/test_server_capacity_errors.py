"""Errors of capacity and state, each produced by a real request in OpenAI's error shape: a full
queue, more choices than the server can ever hold, and a model still loading. Each test starts a
server of its own with the sizes it needs (``test_server_errors.py`` holds the rest)."""

from __future__ import annotations

import aiohttp
import openai
import pytest
from openai import OpenAI

from live_server import MODEL_ID, LiveServer
from test_server_errors import CHAT, COMPLETIONS, HELLO, assert_openai_error, http, post  # noqa: F401  (http: a fixture)


async def test_full_queue_is_429_with_retry_after(http: aiohttp.ClientSession) -> None:
    async with LiveServer(n_ctx=2048, parallel=1, max_queue=0) as busy:
        hold = {"prompt": "Once", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        async with http.post(busy.url + COMPLETIONS, json=hold) as holding:
            await holding.content.readline()
            status, body, response = await post(http, busy.url + COMPLETIONS, {"prompt": "Once", "max_tokens": 2})
            retry_after = response.headers.get("Retry-After")

    assert status == 429
    assert_openai_error(body, type="rate_limit_error", code="queue_full")
    assert retry_after is not None and int(retry_after) >= 1


async def test_more_choices_than_the_server_can_ever_hold_is_400_not_a_429_to_retry_forever(http: aiohttp.ClientSession) -> None:
    """4 slots and no queue: n=5 can never be admitted, even idle. It was a 429 "retry shortly"
    saying 4 requests were waiting on an idle server."""
    async with LiveServer(n_ctx=2048, parallel=4, max_queue=0) as small:
        status, body, _ = await post(http, small.url + COMPLETIONS, {"prompt": "Once", "max_tokens": 2, "n": 5})
        fits, _, _ = await post(http, small.url + COMPLETIONS, {"prompt": "Once", "max_tokens": 2, "n": 4})

    assert status == 400
    assert_openai_error(body, type="invalid_request_error", code="invalid_value", param="n")
    assert "(4: its slots and queue places)" in body["error"]["message"]
    assert fits == 200


async def test_503_while_the_model_loads_then_ready(http: aiohttp.ClientSession) -> None:
    async with LiveServer(load=False) as loading:
        async with http.get(loading.url + "/health") as response:
            health_status, health, retry_after = response.status, await response.json(), response.headers.get("Retry-After")
        chat_status, chat, _ = await post(http, loading.url + CHAT, {"messages": HELLO})
        async with http.get(loading.url + "/v1/models") as response:
            models_status = response.status
        async with http.get(loading.url + "/metrics") as response:
            metrics_status, metrics = response.status, await response.text()

        loading.load_engine()

        async with http.get(loading.url + "/health") as response:
            ready_status, ready = response.status, await response.json()

    assert health_status == 503 and health["status"] == "loading" and retry_after is not None
    assert_openai_error(health, type="server_error", code="model_loading")
    assert chat_status == 503
    assert_openai_error(chat, type="server_error", code="model_loading")
    assert models_status == 503
    assert metrics_status == 200 and "vramsupply_model_loaded 0.0" in metrics
    assert ready_status == 200 and ready["status"] == "ok"


def test_sdk_sees_503_while_loading() -> None:
    with LiveServer(load=False) as loading, OpenAI(base_url=loading.base_url, api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as raised:
            client.completions.create(model=MODEL_ID, prompt="hi")

    assert raised.value.status_code == 503
