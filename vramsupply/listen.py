"""Listening sockets for a host name that may stand for several addresses, all on one port.

Why not aiohttp's ``TCPSite`` alone: with port 0 ("any free port"), asyncio binds each address of
the name on a port of its own. ``localhost`` on a dual-stack machine is both 127.0.0.1 and ::1, so
the agent listened on two ports and announced only the first: a client that reached ::1 at the
announced port found nothing, or another program. Here the first address picks the port and every
other address is bound to that same port; if that port is taken on a later address, the whole set
is tried again on a new port, a few times.

An address this machine cannot have is left out, as asyncio's ``create_server`` leaves it out (and
Python 3.13's also on EADDRNOTAVAIL): the common case is a container with IPv6 switched off whose
/etc/hosts still maps ``::1`` to ``localhost``, where ``serve --host localhost`` must listen on
127.0.0.1 rather than refuse to start. Only a name with no usable address at all is an error.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

from aiohttp import web

Resolver = Callable[..., list]

PORT_ATTEMPTS = 8

# This machine cannot listen on such an address, whatever the port: socket() fails for a family
# the kernel lacks (IPv6 off at boot), bind() fails with EADDRNOTAVAIL for an address no interface
# has (IPv6 off by sysctl, as Docker does, or an address of another machine).
NOT_ON_THIS_MACHINE = frozenset({errno.EAFNOSUPPORT, errno.EPFNOSUPPORT, errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT, errno.EADDRNOTAVAIL})

log = logging.getLogger("vramsupply.listen")


def bind_sockets(host: str, port: int, *, resolve: Resolver | None = None) -> list[socket.socket]:
    """Bound (not yet listening) sockets for every usable address of ``host``, all on one port.

    Raises ``OSError`` (``socket.gaierror`` for a name that does not resolve) like asyncio would:
    the first address's error where none of them is usable, else the error that stopped one.
    """
    addresses = _addresses(host, port, resolve or socket.getaddrinfo)
    for attempt in range(PORT_ATTEMPTS):
        try:
            return _bind_each(addresses, port)
        except OSError as exc:
            if port != 0 or exc.errno != errno.EADDRINUSE or attempt == PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


async def start_sites(runner: web.BaseRunner, host: str, port: int) -> None:
    """Listen on ``bind_sockets(host, port)`` through ``runner`` (set up, not yet listening). On an
    ``OSError`` the sockets no site took are closed, not left to the garbage collector; the caller
    cleans up the runner, which stops the sites already started."""
    unlistened = bind_sockets(host, port)
    try:
        while unlistened:
            await web.SockSite(runner, unlistened[0]).start()
            unlistened.pop(0)
    except OSError:
        for sock in unlistened:
            sock.close()
        raise


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
    unusable: list[OSError] = []
    try:
        for family, sockaddr in addresses:
            try:
                sock = _bound(family, (sockaddr[0], port, *sockaddr[2:]))
            except OSError as exc:
                if exc.errno not in NOT_ON_THIS_MACHINE:
                    raise _saying_where(exc, sockaddr[0], port, addresses) from None
                log.debug("not listening on %s: %s", sockaddr[0], exc.strerror or exc)
                unusable.append(_saying_where(exc, sockaddr[0], port, addresses, every=True))
                continue
            bound.append(sock)
            port = sock.getsockname()[1]  # the first usable address picks the port; the rest follow it
    except OSError:
        for sock in bound:
            sock.close()
        raise
    if not bound:
        raise unusable[0]
    return bound


def _saying_where(exc: OSError, address: str, port: int, addresses: list, *, every: bool = False) -> OSError:
    """With several addresses, say which one failed (and, where none was usable, that none was)."""
    if len(addresses) == 1:
        return exc
    none = f"; none of the name's {len(addresses)} addresses can be listened on here" if every else ""
    return OSError(exc.errno, f"{exc.strerror} (on {address}, port {port}{none})")


def _bound(family: int, sockaddr: tuple) -> socket.socket:
    sock = _socket(family)
    try:
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock


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
