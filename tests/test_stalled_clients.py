"""A client that stops reading its answer is closed, and never holds a stop.

A buyer's process hangs (or a proxy dies with its socket open) after sending a streaming request:
the server's write waits for a reader that never comes. It used to wait forever, holding the
connection and the unsent answer, and a stop waited for it too: twice the drain timeout for one
SIGTERM, and a second SIGTERM ("stop now") did not stop at once. The clients here are raw
sockets with a tiny receive buffer that read nothing; the server is the real ``ApiServer``.

Closing such a client wrote two lines under systemd: our warning, then the request's access line,
which said "(the buyer hung up)" though the agent had closed the connection. It is one line now. A
stop that closes it (at the drain's deadline, or at once on a second SIGTERM) blamed the buyer too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from agent_process import AgentProcess
import pytest
from aiohttp import web
from conftest import TINY_MODEL

from vramsupply.server.app import DEFAULT_MAX_BODY_BYTES, STOP_GRACE_SECONDS, ApiServer, Routes, openai_app
from vramsupply.server.stalled import OPEN_REQUESTS, OpenRequests
from vramsupply.server.state import ServerState

CHUNK = b"data: " + b"x" * 65536 + b"\n\n"


async def endless(request: web.Request) -> web.StreamResponse:
    """An answer that never ends (as a long stream does for a client that reads nothing)."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    while True:
        await response.write(CHUNK)


@asynccontextmanager
async def serving(open_requests: OpenRequests, drain_timeout: float = 30.0) -> AsyncIterator[ApiServer]:
    app = web.Application(middlewares=[open_requests.middleware])
    app[OPEN_REQUESTS] = open_requests
    app.router.add_get("/stream", endless)
    server = ApiServer(app, "127.0.0.1", 0, drain_timeout=drain_timeout)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def serving_the_api(access_log: logging.Logger | None) -> AsyncIterator[ApiServer]:
    """The agent's own app and middlewares (access lines, metrics), every route an endless answer."""
    app = openai_app(ServerState("m"), DEFAULT_MAX_BODY_BYTES, Routes(*[endless] * 6))
    app[OPEN_REQUESTS].stall_seconds, app[OPEN_REQUESTS].check_seconds = 1.0, 0.1
    server = ApiServer(app, "127.0.0.1", 0, access_log=access_log)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def not_reading(port: int, path: str = "/stream", body: bytes = b"", method: str = "GET") -> socket.socket:
    """A client that sends its request and reads nothing."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    client.connect(("127.0.0.1", port))
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    client.sendall(head.encode() + body)
    return client


async def until(condition: object, timeout: float) -> float:
    began = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - began < timeout, "never happened"
        await asyncio.sleep(0.05)
    return time.monotonic() - began


async def test_a_client_that_reads_nothing_is_closed_once_its_writes_stall() -> None:
    open_requests = OpenRequests(stall_seconds=1.0, check_seconds=0.1)
    async with serving(open_requests) as server:
        client = not_reading(server.port)
        try:
            await until(lambda: len(open_requests) == 1, timeout=5)
            took = await until(lambda: len(open_requests) == 0, timeout=10)
            assert took >= 0.5, "closed only once its writes had stalled"
        finally:
            client.close()


async def test_a_slow_reader_is_left_alone() -> None:
    open_requests = OpenRequests(stall_seconds=2.0, check_seconds=0.1)
    async with serving(open_requests) as server:
        client = not_reading(server.port)
        client.setblocking(False)
        try:
            await until(lambda: len(open_requests) == 1, timeout=5)
            for _ in range(40):  # 4 s of reading a little at a time: twice the stall limit
                await asyncio.sleep(0.1)
                try:
                    client.recv(65536)
                except BlockingIOError:
                    pass
            assert len(open_requests) == 1, "a client that reads, however slowly, keeps its connection"
        finally:
            client.close()


async def test_a_stop_ends_at_the_drain_deadline_however_a_client_reads() -> None:
    open_requests = OpenRequests(stall_seconds=600.0)  # not the stall watch: the stop itself
    async with serving(open_requests, drain_timeout=0.5) as server:
        client = not_reading(server.port)
        try:
            await until(lambda: len(open_requests) == 1, timeout=5)
            await asyncio.sleep(0.5)  # its writes are blocked now
            began = time.monotonic()
            await server.stop()
            took = time.monotonic() - began
        finally:
            client.close()
    assert took < 0.5 + STOP_GRACE_SECONDS + 2, f"the stop took {took:.1f} s (twice the drain before)"


@pytest.mark.parametrize("access_log", [True, False], ids=["access log (systemd)", "no access log (terminal)"])
async def test_a_client_closed_for_reading_nothing_is_one_log_line_that_says_so(access_log: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with serving_the_api(logging.getLogger("vramsupply.access") if access_log else None) as server:
        client = not_reading(server.port, "/v1/completions", b"{}", "POST")
        try:
            await until(lambda: len(server.app[OPEN_REQUESTS]) == 1, timeout=5)
            # counted as 499 when its handler is cancelled, just before its access line is written, if any
            await until(lambda: b'status="499"' in server.state.metrics.render(), timeout=10)
        finally:
            client.close()
    lines = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records]
    assert len(lines) == 1, lines  # before: a warning, then an access line that blamed the buyer
    [line] = lines
    why = r"its client read nothing for \d+ s, \d+ bytes unsent"
    if access_log:
        assert re.fullmatch(rf'WARNING vramsupply\.access: 127\.0\.0\.1 "POST /v1/completions HTTP/1\.1" 499 - [\d.]+s req_\w+ \(closed: {why}\)', line), line
    else:
        assert re.fullmatch(rf"WARNING vramsupply\.server\.stalled: closing the connection of POST /v1/completions from 127\.0\.0\.1: {why}", line), line


def completion_tokens(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("vramsupply_completion_tokens_total"))


@contextmanager
def serving_a_buyer_that_reads_nothing(*args: str) -> Iterator[AgentProcess]:
    """`vramsupply serve` (not on a terminal: with its access log) and a buyer whose streamed answer
    has outgrown the sockets, because it reads nothing."""
    agent = AgentProcess("--model", str(TINY_MODEL), "--port", "0", "--no-register", *args)
    try:
        agent.wait_ready(timeout=60)
        port = int(agent.base_url.rsplit(":", 1)[1].split("/")[0])
        prompt = "Once upon a time there was a little girl. " * 150  # 1,800 tokens
        body = json.dumps({"prompt": prompt, "echo": True, "max_tokens": 200, "n": 4, "logprobs": 20, "stream": True, "ignore_eos": True}).encode()
        client = not_reading(port, "/v1/completions", body, "POST")
        try:
            # each choice's first event echoes the prompt with 20 logprobs a token, about 1 MB: four
            # are past what the sockets hold (about 2 MB), so the server's writes to this client
            # block, while the engine goes on generating
            agent.wait_for(lambda: completion_tokens(port) >= 400, "the answer outgrowing the sockets", timeout=60)
            yield agent
        finally:
            client.close()
    finally:
        agent.kill()


def access_lines(agent: AgentProcess) -> list[str]:
    return [line for line in agent.stderr if " vramsupply.access: " in line]


def test_a_second_sigterm_stops_at_once_beside_a_buyer_that_reads_nothing() -> None:
    with serving_a_buyer_that_reads_nothing() as agent:
        agent.send_signal(signal.SIGTERM)
        agent.wait_for(lambda: "SIGTERM received:" in agent.log, "the first signal's line")
        began = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=30)
        took = time.monotonic() - began
    assert code == 130 and took < 10, (code, took, agent.log[-2000:])
    assert "error: stopped without waiting for 4 in-flight requests" in agent.output  # n 4: a task each
    # the agent closed the connection, at its provider's word: said so, not blamed on the buyer
    [line] = access_lines(agent)
    assert re.search(r' INFO vramsupply\.access: 127\.0\.0\.1 "POST /v1/completions HTTP/1\.1" 499 - [\d.]+s req_\w+ '
                     r"\(closed: the agent was stopped at once, before it finished\)$", line), line  # fmt: skip


def test_a_request_cut_at_the_drain_deadline_says_so_in_its_access_line() -> None:
    with serving_a_buyer_that_reads_nothing("--drain-timeout", "1") as agent:
        code = agent.stop(signal.SIGTERM, timeout=30)  # one SIGTERM: the drain, which the buyer outlasts
    assert code == 0, agent.log[-2000:]
    [line] = access_lines(agent)  # before: "(the buyer hung up)", though the agent had closed it
    assert re.search(r' WARNING vramsupply\.access: 127\.0\.0\.1 "POST /v1/completions HTTP/1\.1" 499 - [\d.]+s req_\w+ '
                     r"\(closed: the agent stopped and its 1 s drain ran out\)$", line), line  # fmt: skip
