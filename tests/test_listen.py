"""A host name with several addresses (``localhost`` on a dual-stack machine: 127.0.0.1 and ::1)
and ``--port 0``: every address listens on the one port the agent announces.

The names here resolve through a stand-in for ``getaddrinfo`` (this machine's ``localhost`` has one
address); the sockets, the server and the HTTP requests are real. 127.0.0.2 is loopback on Linux.

An address this machine cannot have (IPv6 switched off, as in many containers whose /etc/hosts
still says ``::1 localhost``) is left out, as asyncio leaves it out: 192.0.2.1 (TEST-NET-1, on no
interface; each test checks that the kernel refuses it) stands for it, and a network namespace of its own with IPv6 off is the real thing.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

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


NOT_HERE = ("192.0.2.1", "198.51.100.1")  # TEST-NET-1 and -2: documentation addresses, on no interface
NO_SUCH_FAMILY = socket.AF_DECnet  # a family this kernel lacks, as AF_INET6 is where IPv6 is off at boot


def name_of(*addresses: tuple[int, str]):
    """A stand-in resolver: every name is these (family, address) pairs, in this order."""

    def resolve(host, port, *args, **kwargs):
        return [(family, socket.SOCK_STREAM, 6, "", (address, port)) for family, address in addresses]

    return resolve


def refusal(family: int, address: str) -> OSError:
    """What this kernel says to listening on ``address``: the tests below rely on it refusing."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
    except OSError as exc:
        return exc
    pytest.skip(f"this machine can listen on {address}")


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


@pytest.mark.parametrize("order", ["first", "last"])
def test_an_address_this_machine_does_not_have_is_left_out_and_the_others_listen(order: str, caplog: pytest.LogCaptureFixture) -> None:
    """Before, ``serve --host localhost`` refused to start where ::1 is in /etc/hosts and IPv6 is off."""
    assert refusal(socket.AF_INET, NOT_HERE[0]).errno == errno.EADDRNOTAVAIL
    usable, unusable = (socket.AF_INET, "127.0.0.1"), (socket.AF_INET, NOT_HERE[0])
    resolve = name_of(unusable, usable) if order == "first" else name_of(usable, unusable)

    with caplog.at_level(logging.DEBUG, logger="vramsupply.listen"):
        sockets = bind_sockets("partly.test", 0, resolve=resolve)
    try:
        assert [sock.getsockname()[0] for sock in sockets] == ["127.0.0.1"]
        assert sockets[0].getsockname()[1] != 0
    finally:
        for sock in sockets:
            sock.close()
    assert f"not listening on {NOT_HERE[0]}: Cannot assign requested address" in caplog.text


def test_an_address_whose_family_this_kernel_lacks_is_left_out() -> None:
    assert refusal(NO_SUCH_FAMILY, "any").errno == errno.EAFNOSUPPORT
    with socket.socket() as taken:  # a fixed port: the one the agent is told to listen on
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
    sockets = bind_sockets("partly.test", port, resolve=name_of((NO_SUCH_FAMILY, "any"), (socket.AF_INET, "127.0.0.1")))
    try:
        assert [sock.getsockname() for sock in sockets] == [("127.0.0.1", port)]
    finally:
        for sock in sockets:
            sock.close()


def test_a_name_with_no_address_this_machine_can_listen_on_is_one_clear_error() -> None:
    first, _ = (refusal(socket.AF_INET, address) for address in NOT_HERE)
    resolve = name_of(*((socket.AF_INET, address) for address in NOT_HERE), (NO_SUCH_FAMILY, "any"))

    with pytest.raises(OSError) as raised:
        bind_sockets("elsewhere.test", 0, resolve=resolve)

    assert raised.value.errno == errno.EADDRNOTAVAIL
    assert raised.value.strerror == f"{first.strerror} (on {NOT_HERE[0]}, port 0; none of the name's 3 addresses can be listened on here)"


def test_another_failure_after_a_left_out_address_is_still_an_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as raised:
            bind_sockets("partly.test", port, resolve=name_of((socket.AF_INET, NOT_HERE[0]), (socket.AF_INET, "127.0.0.1")))

    assert raised.value.errno == errno.EADDRINUSE
    assert f"on 127.0.0.1, port {port}" in raised.value.strerror


def in_a_network_of_its_own(tmp_path: Path, hosts: str, *command: str, ipv6: bool = True) -> subprocess.CompletedProcess[str]:
    """``command`` in network and mount namespaces of its own (unshare: root), with loopback up,
    ``hosts`` as its /etc/hosts and, unless ``ipv6``, IPv6 switched off by sysctl as Docker does."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("a network namespace of the child's own needs root, unshare and ip")
    (tmp_path / "hosts").write_text(hosts)
    setup = f'mount --bind "{tmp_path / "hosts"}" /etc/hosts && ip link set lo up'
    if not ipv6:
        setup += " && echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"
    command = ("unshare", "--mount", "--net", "sh", "-c", f'{setup} && exec "$@"', "sh", *command)
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=120)


DUAL_STACK_HOSTS = "127.0.0.1 localhost\n::1 localhost\n"

LISTEN_ON_LOCALHOST = """
import asyncio
from vramsupply.server import ApiServer, create_app

async def main():
    server = ApiServer(create_app("stories260k"), "localhost", 0)
    await server.start()
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)  # it listens there
    writer.close()
    print(server.url)
    await server.stop()

asyncio.run(main())
"""


def test_localhost_where_ipv6_is_switched_off_listens_on_its_ipv4_address(tmp_path: Path) -> None:
    result = in_a_network_of_its_own(tmp_path, DUAL_STACK_HOSTS, sys.executable, "-c", LISTEN_ON_LOCALHOST, ipv6=False)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("http://localhost:")


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


@pytest.mark.usefixtures("dual_stack")
async def test_a_listen_that_fails_after_the_binds_closes_every_socket_it_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another program binds 127.0.0.2 on the same port (both may, with SO_REUSEADDR) and starts
    listening between the agent's bind and its listen: the agent's listen there fails."""
    rival = socket.socket()
    rival.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    rival.bind(("127.0.0.2", 0))
    port = rival.getsockname()[1]
    bound: list[socket.socket] = []

    def bind_then_the_rival_listens(host: str, port: int) -> list[socket.socket]:
        bound.extend(bind_sockets(host, port))
        rival.listen()
        return list(bound)

    monkeypatch.setattr(listen, "bind_sockets", bind_then_the_rival_listens)
    server = ApiServer(create_app("stories260k"), "dualstack.test", port)
    try:
        with pytest.raises(OSError) as refused:
            await server.start()
        assert refused.value.errno == errno.EADDRINUSE
        assert [sock.fileno() for sock in bound] == [-1, -1], "both closed: the one listening and the one that could not"
    finally:
        rival.close()
