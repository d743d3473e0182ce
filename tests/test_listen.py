"""A host name with several addresses (``localhost`` on a dual-stack machine: 127.0.0.1 and ::1)
and ``--port 0``: every address listens on the one port the agent announces.

The names here resolve through a stand-in for ``getaddrinfo`` (this machine's ``localhost`` has one
address); the sockets, the server and the HTTP requests are real. 127.0.0.2 is loopback on Linux.
"""

from __future__ import annotations

import asyncio
import errno
import socket

import aiohttp
from aiohttp import web
import pytest

from vramsupply import listen
from vramsupply.devplatform import DevPlatform
from vramsupply.listen import bind_sockets
from vramsupply.server import ApiServer, create_app

REAL_GETADDRINFO = socket.getaddrinfo
TWO_ADDRESSES = ("127.0.0.1", "127.0.0.2")


def two_address_name(host, port, *args, **kwargs):
    """``dualstack.test`` is two loopback addresses; every other name resolves as usual."""
    if host != "dualstack.test":
        return REAL_GETADDRINFO(host, port, *args, **kwargs)
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in TWO_ADDRESSES]


@pytest.fixture
def dual_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", two_address_name)


async def answers(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status


@pytest.mark.usefixtures("dual_stack")
async def test_serving_on_a_two_address_name_with_port_0_answers_on_the_announced_port_everywhere() -> None:
    server = ApiServer(create_app("stories260k"), "dualstack.test", 0)
    await server.start()
    try:
        assert server.url == f"http://dualstack.test:{server.port}"
        for address in TWO_ADDRESSES:
            assert await answers(f"http://{address}:{server.port}/v1/models") == 503  # ours: no model attached yet
    finally:
        await server.stop()


@pytest.mark.usefixtures("dual_stack")
async def test_the_dev_platform_on_a_two_address_name_listens_on_one_port() -> None:
    platform = DevPlatform()
    url = await platform.start("dualstack.test", 0)
    try:
        port = int(url.rsplit(":", 1)[1])
        for address in TWO_ADDRESSES:
            assert await answers(f"http://{address}:{port}/v1/providers/demand") == 401  # ours: no API key sent
    finally:
        await platform.stop()


def test_a_port_taken_on_one_address_of_the_name_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.2", 0))
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as raised:
            bind_sockets("dualstack.test", port, resolve=two_address_name)

    assert raised.value.errno == errno.EADDRINUSE
    assert f"on 127.0.0.2, port {port}" in raised.value.strerror


def test_with_port_0_a_port_taken_on_a_later_address_means_trying_a_new_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """The free port the first address found may be taken on the second: the set is bound again."""
    tries: list[int] = []
    real_socket = listen._socket

    def second_address_taken_once(family: int) -> socket.socket:
        sock = real_socket(family)
        tries.append(family)
        if len(tries) == 2:
            sock.close()
            raise OSError(errno.EADDRINUSE, "Address already in use")
        return sock

    monkeypatch.setattr(listen, "_socket", second_address_taken_once)
    sockets = bind_sockets("dualstack.test", 0, resolve=two_address_name)
    try:
        assert len(tries) == 4
        assert [sock.getsockname()[0] for sock in sockets] == list(TWO_ADDRESSES)
        assert len({sock.getsockname()[1] for sock in sockets}) == 1
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "half-the-headers"])
async def test_a_connection_that_never_completes_a_request_is_closed(sent: bytes) -> None:
    """aiohttp holds such a connection (and its file descriptor) for an hour by default."""
    server = ApiServer(create_app("stories260k"), "127.0.0.1", 0, idle_timeout=0.3)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(sent)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), timeout=20) == b"", "closed without an answer"
        writer.close()
    finally:
        await server.stop()


async def test_a_request_whose_buyer_left_during_the_last_writes_counts_as_499() -> None:
    """The stream handler ends normally when aiohttp reports the hang-up as a failed write (3 of
    171 cut streams in a soak), and /metrics counted those as 200. The handler marks the request."""
    from vramsupply.server.state import BUYER_LEFT

    async def cut_at_the_end(request: web.Request) -> web.Response:
        request[BUYER_LEFT] = True
        return web.Response()

    app = create_app("stories260k")
    app.router.add_get("/cut-at-the-end", cut_at_the_end)
    server = ApiServer(app, "127.0.0.1", 0)
    await server.start()
    try:
        await answers(f"{server.url}/cut-at-the-end")
        async with aiohttp.ClientSession() as session, session.get(f"{server.url}/metrics") as response:
            metrics = await response.text()
    finally:
        await server.stop()
    assert 'vramsupply_requests_total{route="/cut-at-the-end",status="499"} 1.0' in metrics
