"""The fault suite: hostile requests get a 4xx OpenAI error, never a 5xx, and the server stays healthy.

Every case is sent the way an attacker or a broken client would send it (raw bytes over a socket
where a client library would refuse), then /health must still say ok and a plain request must
still be answered.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from live_server import LiveServer
from test_server_ops import metric_samples

from vramsupply.server import state as server_state

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
HUGE_ENUM = {"type": "json_schema", "json_schema": {"name": "e", "schema": {"enum": [f"option number {i}" for i in range(100_000)]}}}


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}


# (route, raw body, expected status, expected param or None)
HOSTILE: list[tuple[str, bytes, int, str | None]] = [
    (TEXT, b'{"prompt": "Once",', 400, None),
    (TEXT, b'{"prompt": "\xff\xfe\xfd"}', 400, None),
    (TEXT, b'{"prompt": "Once", "temperature": NaN}', 400, None),
    (TEXT, b'{"prompt": "Once", "top_p": Infinity}', 400, None),
    (TEXT, b'{"prompt": "Once", "logit_bias": {"5": -Infinity}}', 400, None),
    (TEXT, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    (TEXT, json.dumps({"prompt": [10**9]}).encode(), 400, None),
    (TEXT, json.dumps({"prompt": [-1, 5]}).encode(), 400, None),
    (TEXT, json.dumps({"prompt": "Once", "logit_bias": {"99999999": 5}}).encode(), 400, None),
    (TEXT, json.dumps({"prompt": "Once", "top_k": 10**15}).encode(), 400, "top_k"),
    (TEXT, json.dumps({"prompt": "Once", "n": 10_000}).encode(), 400, "n"),
    (TEXT, json.dumps({"prompt": "Once", "stop": ["x"] * 1000}).encode(), 400, "stop"),
    (TEXT, json.dumps({"prompt": "Once", "stop": ["end", "x" * 100_000]}).encode(), 400, "stop[1]"),
    (TEXT, json.dumps({"prompt": "Once", "max_tokens": -5}).encode(), 400, "max_tokens"),
    (CHAT, json.dumps({"messages": [{"role": "user", "content": "Hi"}], "response_format": HUGE_ENUM}).encode(), 400, "response_format"),
    (CHAT, json.dumps({"messages": [{"role": "user", "content": "Hi"}], "response_format": nested(40)}).encode(), 400, "response_format"),
    (
        CHAT,
        json.dumps({"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "array", "maxItems": 10**9}}}}).encode(),
        400,
        "response_format",
    ),
    # A count that is no whole number: NaN compared false with every limit and meant no bound at all.
    (CHAT, b'{"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "array", "maxItems": NaN}}}}', 400, "response_format.json_schema.schema.maxItems"),
    (
        CHAT,
        json.dumps({"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "minLength": -5}}}}).encode(),
        400,
        "response_format.json_schema.schema.minLength",
    ),
    (CHAT, json.dumps({"messages": [{"role": "user", "content": "Hi"}] * 10_000}).encode(), 400, "messages"),
    (CHAT, json.dumps({"messages": [{"role": "wizard", "content": "Hi"}]}).encode(), 400, "messages[0].role"),
    (CHAT, b"[]", 400, None),
    (CHAT, b"", 400, None),
]


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(parallel=2, n_ctx=512) as live:
        yield live


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def still_healthy(server: LiveServer, http: aiohttp.ClientSession) -> None:
    async with http.get(server.url + "/health") as response:
        assert response.status == 200 and (await response.json())["status"] == "ok"
    async with http.post(server.url + TEXT, json={"prompt": "Once", "max_tokens": 2}) as response:
        assert response.status == 200


@pytest.mark.parametrize(("route", "body", "status", "param"), HOSTILE, ids=[f"{i}" for i in range(len(HOSTILE))])
async def test_a_hostile_body_is_a_4xx_openai_error_and_the_server_stays_healthy(
    server: LiveServer, http: aiohttp.ClientSession, route: str, body: bytes, status: int, param: str | None
) -> None:
    async with http.post(server.url + route, data=body, headers={"Content-Type": "application/json"}) as response:
        assert response.status == status, await response.text()
        error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    await still_healthy(server, http)


async def test_a_slow_upload_that_keeps_sending_is_answered(server: LiveServer, http: aiohttp.ClientSession) -> None:
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 3}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.server.port)  # type: ignore[union-attr]
    writer.write(f"POST {TEXT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    for start in range(0, len(body), 8):
        writer.write(body[start : start + 8])
        await writer.drain()
        await asyncio.sleep(0.1)
    status_line = await asyncio.wait_for(reader.readline(), 30)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 200")
    await still_healthy(server, http)


async def test_a_client_that_sends_headers_only_gets_408_and_frees_its_handler(
    server: LiveServer, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_state, "BODY_IDLE_SECONDS", 0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.server.port)  # type: ignore[union-attr]
    writer.write(f"POST {TEXT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode())
    await writer.drain()
    await still_healthy(server, http)  # served meanwhile
    # The answer, read as a client reads it: up to its Content-Length. (The connection itself closes
    # up to 10 s later: aiohttp lingers, reading the body the client never sent.)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_timeout"
    await still_healthy(server, http)


async def test_clients_that_hang_up_after_the_headers_leave_nothing_behind(server: LiveServer, http: aiohttp.ClientSession) -> None:
    for _ in range(20):
        _, writer = await asyncio.open_connection("127.0.0.1", server.server.port)  # type: ignore[union-attr]
        writer.write(f"POST {TEXT} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{{\"prompt\"".encode())
        await writer.drain()
        writer.close()
    await still_healthy(server, http)


async def test_the_whole_suite_answered_no_5xx(server: LiveServer, http: aiohttp.ClientSession) -> None:
    async with http.get(server.url + "/metrics") as response:
        samples = metric_samples(await response.text())
    answered = {labels: value for (name, labels), value in samples.items() if name == "vramsupply_requests_total"}
    assert answered, "the suite ran against this server"
    assert [labels for labels, value in answered.items() if dict(labels)["status"].startswith("5") and value] == []


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status").read().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def cut_streams(url: str, count: int) -> None:
    """``count`` streams, 8 at a time, each abandoned by its buyer after 3 chunks."""
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    semaphore = asyncio.Semaphore(8)

    async def one(http: aiohttp.ClientSession) -> None:
        async with semaphore, http.post(url + TEXT, json=body) as response:
            seen = 0
            async for line in response.content:
                seen += line.startswith(b"data: {")
                if seen >= 3:
                    return

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(one(http) for _ in range(count)))


async def test_streams_cut_mid_way_leave_every_slot_idle_and_memory_flat() -> None:
    """40 here to keep the suite fast; the soak (bench/soak.py) cuts 1,000."""
    from agent_process import AgentProcess
    from conftest import TINY_MODEL

    with AgentProcess("--model", str(TINY_MODEL), "--no-register", "--port", "0", "--parallel", "8") as agent:
        agent.wait_ready()
        url = agent.base_url.removesuffix("/v1")
        await cut_streams(url, 10)  # warm up: allocator pools, caches
        before = rss_bytes(agent.process.pid)
        await cut_streams(url, 40)
        cut_at = asyncio.get_running_loop().time()
        async with aiohttp.ClientSession() as http:
            while True:
                async with http.get(url + "/health") as response:
                    health = await response.json()
                if health["slots_busy"] == 0 and health["queue"] == 0:
                    break
                assert asyncio.get_running_loop().time() - cut_at < 5, f"slots still busy 5 s after the last buyer left: {health}"
                await asyncio.sleep(0.05)
        after = rss_bytes(agent.process.pid)
    assert (after - before) / before < 0.05, f"RSS grew from {before:,} to {after:,} bytes"
