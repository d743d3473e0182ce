"""sd_notify(3) without libsystemd: datagrams to ``$NOTIFY_SOCKET`` telling systemd how the agent is doing.

Under a ``Type=notify`` unit systemd waits for ``READY=1`` before it calls the service started, shows the
latest ``STATUS=`` line in ``systemctl status``, and restarts the service when ``WATCHDOG=1`` stops
arriving within ``WatchdogSec``. Outside systemd (``NOTIFY_SOCKET`` unset) every call is a no-op, so
the serve lifecycle can call the notifier unconditionally.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)


def socket_address(notify_socket: str | None) -> str | bytes | None:
    """The address to send to: a filesystem path, or bytes for an abstract socket (a leading ``@``)."""
    if not notify_socket:
        return None
    if notify_socket.startswith("@"):
        return b"\0" + notify_socket[1:].encode()
    return notify_socket


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises.

    None when the watchdog is off, or when ``WATCHDOG_PID`` says it is meant for another process.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000


START_EXTENSION_SECONDS = 600.0
"""How much longer the start may take from each check at which the model's preparation moved data."""
PROGRESS_CHECK_SECONDS = 60.0
PROGRESS_MIN_BYTES = 1 << 20
"""Less than this in a minute (17 kB/s) is no download that will end within a start's time."""


def io_bytes(path: str = "/proc/self/io") -> int | None:
    """Bytes this process has read and written so far, sockets included (a download's bytes arrive
    and are written; a file being verified is read), or None where the kernel does not say."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    try:
        return int(fields["rchar"]) + int(fields["wchar"])
    except (KeyError, ValueError):
        return None


def one_line(text: str) -> str:
    """systemd shows STATUS= as a single line; newlines would also end the assignment."""
    return " ".join(text.split())


class SystemdNotifier:
    """Speaks the notify protocol to the service manager that started us, if any."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = socket_address(env.get("NOTIFY_SOCKET"))
        self.watchdog_interval = watchdog_interval(env) if self._address is not None else None
        self._socket: socket.socket | None = None
        self._warned = False
        self.healthy: Callable[[], bool] = lambda: True
        """Asked before every watchdog ping: a failed engine stops the pings, so systemd restarts us."""

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> None:
        """Send ``KEY=VALUE`` lines in one datagram. Failures are logged once and never raised: a
        service manager that stopped listening must not take the agent down with it."""
        if self._address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the event loop on a full queue; a lost ping is better than a stalled loop.
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(assignments).encode(), self._address)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd: %s", exc)
                self._warned = True

    def ready(self, status: str | None = None) -> None:
        """The model is loaded and the server listens: systemd may now report the service started."""
        self.notify("READY=1", *([f"STATUS={one_line(status)}"] if status else []))

    def status(self, text: str) -> None:
        self.notify(f"STATUS={one_line(text)}")

    async def extend_start_while_moving(self, moved: Callable[[], int | None] = io_bytes) -> None:
        """While the model is prepared: a first download may outlast the unit's ``TimeoutStartSec``
        (30 minutes: 20 GB at 10 MB/s), and being killed there only to resume after a restart
        shows the service as failed. So each ``interval`` in which this process moved data
        (``moved``: bytes so far) extends the start by ``extension`` from then (``EXTEND_TIMEOUT_USEC``,
        which never shortens systemd's deadline); a stalled download gets no more time than it had."""
        if self._address is None:
            return
        last = moved()
        while True:
            await asyncio.sleep(PROGRESS_CHECK_SECONDS)
            now = moved()
            if now is not None and last is not None and now - last >= PROGRESS_MIN_BYTES:
                self.notify(f"EXTEND_TIMEOUT_USEC={round(START_EXTENSION_SECONDS * 1_000_000)}")
            last = now

    def stopping(self, status: str | None = None) -> None:
        self.notify("STOPPING=1", *([f"STATUS={one_line(status)}"] if status else []))

    async def run_watchdog(self) -> None:
        """Ping from the event loop itself while ``healthy()``: a hung loop or a failed engine stops
        the pings, and systemd restarts us."""
        if self.watchdog_interval is None:
            return
        while True:
            if self.healthy():
                self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)

    def start_watchdog(self) -> asyncio.Task[None] | None:
        """Start pinging on the running loop; returns the task to cancel at shutdown (None when off)."""
        if self.watchdog_interval is None:
            return None
        return asyncio.get_running_loop().create_task(self.run_watchdog(), name="systemd-watchdog")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
