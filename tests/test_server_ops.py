"""What operators and the platform rely on: /health, /metrics, the endpoint token, and slots freed
when a client hangs up."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from conftest import buyer_leaves_just_before_the_end, lines_of_a_cut_stream
from live_server import MODEL_ID, LiveServer
from vramsupply.server.text_shape import TextShape

TOKEN = "s3cret-endpoint-token"
LONG = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(parallel=2) as live:
        yield live


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with http.get(url) as response:
        return response.status, await response.json()


async def wait_for_health(http: aiohttp.ClientSession, server: LiveServer, *, busy: int, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        _, health = await get_json(http, server.url + "/health")
        if health["slots_busy"] == busy or time.monotonic() > deadline:
            return health
        await asyncio.sleep(0.02)


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_health_reports_slots(server: LiveServer, http: aiohttp.ClientSession) -> None:
    status, health = await get_json(http, server.url + "/health")

    assert status == 200
    assert health == {"status": "ok", "model": MODEL_ID, "slots_idle": 2, "slots_busy": 0, "queue": 0}


async def test_client_leaving_a_stream_frees_its_slot(server: LiveServer, http: aiohttp.ClientSession) -> None:
    assert server.engine is not None
    before = server.engine.stats().completion_tokens_total
    async with http.post(server.url + "/v1/completions", json={**LONG, "stream": True}) as response:
        await response.content.readline()
        during = await wait_for_health(http, server, busy=1)
        response.close()

    after = await wait_for_health(http, server, busy=0)

    assert during["slots_busy"] == 1 and during["slots_idle"] == 1
    assert after["slots_busy"] == 0 and after["slots_idle"] == 2
    assert server.engine.stats().completion_tokens_total - before < LONG["max_tokens"]


async def test_client_leaving_a_whole_response_frees_its_slot(server: LiveServer, http: aiohttp.ClientSession) -> None:
    assert server.engine is not None
    before = server.engine.stats().completion_tokens_total
    request = asyncio.create_task(http.post(server.url + "/v1/completions", json=LONG))
    during = await wait_for_health(http, server, busy=1)
    request.cancel()

    after = await wait_for_health(http, server, busy=0)

    assert during["slots_busy"] == 1
    assert after["slots_busy"] == 0
    assert server.engine.stats().completion_tokens_total - before < LONG["max_tokens"]


async def test_a_buyer_leaving_as_the_stream_ends_is_no_server_error(
    server: LiveServer, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert server.engine is not None
    before = server.engine.stats().completion_tokens_total
    buyer_leaves_just_before_the_end(monkeypatch)
    with caplog.at_level(logging.DEBUG, logger="vramsupply.server"):
        async with http.post(server.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 8, "ignore_eos": True, "stream": True}) as response:
            lines = await lines_of_a_cut_stream(response)

    assert b"data: [DONE]\n" in lines, "every event was sent"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "nothing for the provider to worry about"
    assert any("hung up before its stream ended" in r.getMessage() for r in caplog.records)
    assert (await wait_for_health(http, server, busy=0))["slots_busy"] == 0
    assert server.engine.stats().completion_tokens_total - before == 8


async def test_a_fault_of_ours_mid_stream_ends_the_stream_with_an_error_event(
    server: LiveServer, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def fault(*args: object) -> list[bytes]:
        raise RuntimeError("a bug in writing a chunk")

    monkeypatch.setattr(TextShape, "text_chunks", fault)
    with caplog.at_level(logging.ERROR, logger="vramsupply.server"):
        request = {"prompt": "Once", "max_tokens": 8, "ignore_eos": True, "stream": True}
        async with http.post(server.url + "/v1/completions", json=request, timeout=aiohttp.ClientTimeout(total=30)) as response:
            body = await response.read()  # before, the stream never ended

    events = [json.loads(line[len(b"data: ") :]) for line in body.splitlines() if line.startswith(b"data: {")]
    assert events[-1]["error"]["type"] == "server_error", "the buyer learns that the answer ended badly"
    assert "bug" not in events[-1]["error"]["message"], "and nothing of its cause"
    assert any(r.exc_info and "a bug in writing a chunk" in str(r.exc_info[1]) for r in caplog.records), "the provider's log has the traceback"
    assert (await wait_for_health(http, server, busy=0))["slots_busy"] == 0


async def test_the_status_lines_request_count_counts_a_batch_of_prompts_once(server: LiveServer, http: aiohttp.ClientSession) -> None:
    """The periodic "N requests" counted each prompt of a batch: 5 for these 2 requests."""
    assert server.engine is not None
    before = server.engine.stats().requests_total
    for request in ({"prompt": ["a", "b", "c", "d"], "max_tokens": 3}, {"prompt": "a", "max_tokens": 3, "n": 3}):
        async with http.post(server.url + "/v1/completions", json=request) as response:
            assert response.status == 200
    assert server.engine.stats().requests_total - before == 2


async def test_metrics_parse_and_count_requests(server: LiveServer, http: aiohttp.ClientSession) -> None:
    async with http.get(server.url + "/metrics") as response:
        before = metric_samples(await response.text())

    for _ in range(3):
        async with http.post(server.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 3, "ignore_eos": True}) as response:
            assert response.status == 200
    async with http.post(server.url + "/v1/chat/completions", json={"messages": [], "max_tokens": 3}) as response:
        assert response.status == 400
    async with http.get(server.url + "/no/such/page") as response:
        assert response.status == 404
    async with http.get(server.url + "/metrics") as response:
        content_type = response.headers["Content-Type"]
        after = metric_samples(await response.text())

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert content_type.startswith("text/plain")
    assert grew("vramsupply_requests_total", route="/v1/completions", status="200") == 3
    assert grew("vramsupply_requests_total", route="/v1/chat/completions", status="400") == 1
    assert grew("vramsupply_requests_total", route="unmatched", status="404") == 1
    assert grew("vramsupply_completion_tokens_total") == 9
    assert grew("vramsupply_prompt_tokens_total") == 3 * 2
    assert grew("vramsupply_time_to_first_token_seconds_count") == 3
    assert grew("vramsupply_time_per_output_token_seconds_count") == 3
    assert after[("vramsupply_slots_total", ())] == 2
    assert after[("vramsupply_slots_busy", ())] == 0
    assert after[("vramsupply_queue_depth", ())] == 0
    assert after[("vramsupply_model_loaded", ())] == 1
    assert after[("vramsupply_preemptions_total", ())] == 0, "three short requests fit the shared KV cache"
    stats = server.engine.stats()  # host memory, for a provider sizing --cache-ram
    assert after[("vramsupply_prompt_cache_bytes", ())] == stats.prompt_cache_bytes
    assert after[("vramsupply_prompt_cache_entries", ())] == stats.prompt_cache_entries
    assert after[("vramsupply_checkpoint_bytes", ())] == 0, "a llama model's KV is cut back, never checkpointed"
    assert after[("vramsupply_draft_tokens_total", ())] == 0, "drafting is off unless --draft-max asks for it"


async def test_metrics_see_busy_slots(server: LiveServer, http: aiohttp.ClientSession) -> None:
    async with http.post(server.url + "/v1/completions", json={**LONG, "stream": True}) as response:
        await response.content.readline()
        async with http.get(server.url + "/metrics") as scrape:
            samples = metric_samples(await scrape.text())
        response.close()
    await wait_for_health(http, server, busy=0)

    assert samples[("vramsupply_slots_busy", ())] == 1


async def test_a_provider_who_turned_drafting_on_sees_how_much_of_it_was_accepted(http: aiohttp.ClientSession) -> None:
    quoting = "Tom said: the big red ball is mine. Lily said: the big red ball is mine. Tom said: the big"
    async with LiveServer(parallel=2, draft_max=8) as live:
        async with http.post(live.url + "/v1/completions", json={"prompt": quoting, "max_tokens": 60, "temperature": 0}) as response:
            assert response.status == 200
        async with http.get(live.url + "/metrics") as scrape:
            samples = metric_samples(await scrape.text())
        stats = live.engine.stats()

    drafted, accepted = samples[("vramsupply_draft_tokens_total", ())], samples[("vramsupply_draft_accepted_tokens_total", ())]
    assert (drafted, accepted) == (stats.draft_tokens_total, stats.draft_accepted_total)
    assert 0 < accepted <= drafted, "the quoting request drafts from its prompt, and some drafts hold"


@pytest.fixture(scope="module")
def guarded() -> Iterator[LiveServer]:
    with LiveServer(endpoint_token=TOKEN) as live:
        yield live


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer ", TOKEN])
async def test_endpoint_token_is_required_on_v1(guarded: LiveServer, http: aiohttp.ClientSession, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/unknown")):
        async with http.request(method, guarded.url + path, headers=headers, json={"prompt": "x"}) as response:
            body = await response.json()
            assert response.status == 401, path
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert body["error"]["code"] == "invalid_api_key"
            assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_a_token_whose_bytes_are_no_utf8_is_a_401_not_our_500(guarded: LiveServer) -> None:
    """aiohttp hands such a header over surrogate-escaped, which the comparison could not encode."""
    host, port = guarded.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe" + TOKEN.encode() + b"\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), head
    assert json.loads(body)["error"]["code"] == "invalid_api_key"


async def test_health_and_metrics_stay_open_with_a_token(guarded: LiveServer, http: aiohttp.ClientSession) -> None:
    for path in ("/health", "/metrics"):
        async with http.get(guarded.url + path) as response:
            assert response.status == 200


def test_sdk_with_the_right_token_works_and_the_wrong_one_is_401(guarded: LiveServer) -> None:
    with OpenAI(base_url=guarded.base_url, api_key=TOKEN, max_retries=0) as client:
        completion = client.completions.create(model=MODEL_ID, prompt="Once", max_tokens=2)
    with OpenAI(base_url=guarded.base_url, api_key="nope", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as raised:
            client.models.list()

    assert completion.choices[0].text
    assert raised.value.status_code == 401


async def test_engine_closing_mid_stream_ends_it_with_an_error_event(http: aiohttp.ClientSession) -> None:
    async with LiveServer() as live:
        assert live.engine is not None
        engine = live.engine

        async def close_engine() -> None:
            await asyncio.to_thread(engine.close)

        async with http.post(live.url + "/v1/completions", json={**LONG, "stream": True}) as response:
            await response.content.readline()
            await live.acall(close_engine)
            events = [line for line in (await response.text()).splitlines() if line.startswith("data: ")]

    error = json.loads(events[-1].removeprefix("data: "))
    assert error["error"]["code"] == "shutting_down"
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert "data: [DONE]" not in events
