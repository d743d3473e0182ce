"""Connections whose client stopped reading: found and closed, so they hold no memory and no stop.

aiohttp's ``response.write`` waits while the connection's send buffer is full, that is for as long
as the client reads nothing, with no limit. A buyer that sent a streaming request and then stopped
reading (a hung process, a proxy that died with the socket open) kept its connection and the
unsent answer forever: about 25 MiB per such client in one test, never given back. Worse, a
handler blocked in that write outlived every stop: aiohttp's shutdown waits ``shutdown_timeout``
for handlers, then cancels only their reading of the request body, then waits as long again, so
one such client stretched a stop to twice the drain, past systemd's stop timeout, and a second
Ctrl-C ("stop now") waited for it too.

So every request's connection is noted while its handler runs (``OpenRequests.middleware``), and:

- ``watch``: a connection that has held unsent data for ``WRITE_STALL_SECONDS`` while passing none
  of it on to the system is aborted. A slow reader still takes some and is left alone; the aborted handler
  ends as a buyer who hung up (its engine work cancelled, its row recorded as unpaid). Its one log
  line says why it was closed: the request's access line (``CLOSED``, a WARNING) where there
  is an access log, else a warning of ours. Both were written, and the access line said "the buyer
  hung up", though the agent had closed the connection;
- ``abort_all``: at the end of a drain, and at once on "stop now", every connection still open is
  aborted, which ends the handlers blocked in a write. Each request's access line says why (a
  WARNING at the drain's deadline, which cut an answer the stop meant to let finish; INFO on "stop
  now", which the provider asked for); it said "the buyer hung up" too.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import struct
import termios
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from vramsupply.server.access import ACCESS_LOG

log = logging.getLogger(__name__)

WRITE_STALL_SECONDS = 30.0
"""How long a connection's unsent data may stay without the client reading any of it."""
CHECK_SECONDS = 5.0
"""How often the send buffers are looked at: a stalled connection is closed at most this late."""


@dataclass(frozen=True)
class Closed:
    """Why the agent closed a request's connection, and how loud its access line says so."""

    why: str
    level: int


CLOSED: Any = web.RequestKey("closed", Closed) if hasattr(web, "RequestKey") else "vramsupply.closed"  # an aiohttp without RequestKey
"""Set on a request whose connection the agent closed (not its buyer): for its access line."""


@dataclass
class _Progress:
    request: web.Request
    writer: AbstractStreamWriter
    taken: int = 0
    """Bytes the client has taken: written, less what waits in our buffer and the system's."""
    since: float = 0.0
    """When that last grew, or the buffer was empty."""


class OpenRequests:
    """The transports of the requests being handled, and when each last made write progress."""

    def __init__(self, stall_seconds: float = WRITE_STALL_SECONDS, check_seconds: float = CHECK_SECONDS) -> None:
        self.stall_seconds = stall_seconds
        self.check_seconds = check_seconds
        self._open: dict[asyncio.BaseTransport, _Progress] = {}

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        transport = request.transport
        if transport is None:
            return await handler(request)
        self._open.setdefault(transport, _Progress(request, request.writer, since=time.monotonic()))
        try:
            return await handler(request)
        finally:
            self._open.pop(transport, None)

    def abort_stalled(self, now: float | None = None) -> int:
        """Abort the connections whose client has taken nothing of what was sent (nothing left our buffer
        and the kernel's send queue) for ``stall_seconds``, while data waited; how many."""
        now = time.monotonic() if now is None else now
        stalled = []
        for transport, progress in self._open.items():
            unsent = _unsent(transport)
            taken = progress.writer.output_size - unsent  # a writer refills the buffers as a client reads:
            if unsent == 0 or taken > progress.taken:  # their size alone cannot tell slow from stuck
                progress.since = now
            progress.taken = taken
            if unsent > 0 and now - progress.since >= self.stall_seconds:
                stalled.append(transport)
        for transport in stalled:
            _say_closed(self._open[transport].request, f"its client read nothing for {now - self._open[transport].since:.0f} s, {_unsent(transport)} bytes unsent")
            self._abort(transport)
        return len(stalled)

    def abort_all(self, closed: Closed) -> int:
        """Abort every connection whose request is still being handled, each marked ``closed`` for
        its access line (with no access log, nothing per request: the stop says how many); how many."""
        transports = list(self._open)
        for transport in transports:
            self._open[transport].request[CLOSED] = closed
            self._abort(transport)
        return len(transports)

    def __len__(self) -> int:
        return len(self._open)

    async def watch(self) -> None:
        """``abort_stalled`` every ``check_seconds``, until cancelled."""
        while True:
            await asyncio.sleep(self.check_seconds)
            self.abort_stalled()

    def _abort(self, transport: asyncio.BaseTransport) -> None:
        self._open.pop(transport, None)
        abort = getattr(transport, "abort", None)
        if abort is not None:
            abort()  # a write waiting on it raises ConnectionResetError; the handler is cancelled


def _say_closed(request: web.Request, why: str) -> None:
    """One line: the request's access line says ``why`` where the app has an access log (the
    handler's cancellation writes it: ``server.app.metrics_middleware``), else this warning."""
    request[CLOSED] = Closed(why, logging.WARNING)
    if ACCESS_LOG not in request.app:
        log.warning("closing the connection of %s %s from %s: %s", request.method, request.path_qs, request.remote or "-", why)


def _unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes written to the connection that its client has not taken: in the transport's buffer,
    and in the system's send queue, which holds megabytes on a fast link: a slow reader empties
    it long before the transport's buffer moves."""
    return _buffered(transport) + _queued(transport)


def _buffered(transport: asyncio.BaseTransport) -> int:
    try:
        return int(transport.get_write_buffer_size())  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError, OSError):  # no such transport, or closed meanwhile
        return 0


def _queued(transport: asyncio.BaseTransport) -> int:
    """The socket's send queue (Linux's ``SIOCOUTQ``, the same number as ``TIOCOUTQ``)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])
    except (OSError, ValueError):  # closed meanwhile
        return 0


OPEN_REQUESTS = web.AppKey("open_requests", OpenRequests)
