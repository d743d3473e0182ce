"""Listening sockets for a host name that may stand for several addresses, all on one port.

Why not aiohttp's ``TCPSite`` alone: with port 0 ("any free port"), asyncio binds each address of
the name on a port of its own. ``localhost`` on a dual-stack machine is both 127.0.0.1 and ::1, so
the agent listened on two ports and announced only the first: a client that reached ::1 at the
announced port found nothing, or another program. Here the first address picks the port and every
other address is bound to that same port; if that port is taken on a later address, the whole set
is tried again on a new port, a few times.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

Resolver = Callable[..., list]

PORT_ATTEMPTS = 8


def bind_sockets(host: str, port: int, *, resolve: Resolver | None = None) -> list[socket.socket]:
    """Bound (not yet listening) sockets for every address of ``host``, all on one port.

    Raises ``OSError`` (``socket.gaierror`` for a name that does not resolve) like asyncio would.
    """
    addresses = _addresses(host, port, resolve or socket.getaddrinfo)
    for attempt in range(PORT_ATTEMPTS):
        try:
            return _bind_each(addresses, port)
        except OSError as exc:
            if port != 0 or exc.errno != errno.EADDRINUSE or attempt == PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _addresses(host: str, port: int, resolve: Resolver) -> list[tuple[int, tuple]]:
    infos = resolve(host, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    unique: list[tuple[int, tuple]] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if (family, sockaddr) not in unique:
            unique.append((family, sockaddr))
    if not unique:
        raise OSError(errno.EADDRNOTAVAIL, f"{host!r} has no address to listen on")
    return unique


def _bind_each(addresses: list[tuple[int, tuple]], port: int) -> list[socket.socket]:
    bound: list[socket.socket] = []
    try:
        for family, sockaddr in addresses:
            sock = _socket(family)
            bound.append(sock)
            sock.bind((sockaddr[0], port, *sockaddr[2:]))
            port = sock.getsockname()[1]  # the first address picks the port; the rest follow it
    except OSError as exc:
        for sock in bound:
            sock.close()
        if len(addresses) > 1:  # say which of the name's addresses failed
            raise OSError(exc.errno, f"{exc.strerror} (on {sockaddr[0]}, port {port})") from None
        raise
    return bound


def _socket(family: int) -> socket.socket:
    """Options as asyncio's ``create_server`` sets them: reuse of a TIME_WAIT address, and an IPv6
    socket that serves IPv6 only (the IPv4 addresses have their own)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    except OSError:
        sock.close()
        raise
    return sock
