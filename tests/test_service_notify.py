"""sd_notify: what systemd would receive on its notify socket, read from a real AF_UNIX datagram socket."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vramsupply.config import EngineKind, Settings
from vramsupply.service import SystemdNotifier, notify
from vramsupply.service.notify import watchdog_interval


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on the socket, without blocking."""
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        return messages
    finally:
        sock.settimeout(2)


def test_ready_status_stopping_arrive_as_datagrams(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    notifier.status("loading model\nstories260K")
    notifier.ready("serving 4 slots")
    notifier.stopping()
    notifier.close()
    assert received(sock) == ["STATUS=loading model stories260K", "READY=1\nSTATUS=serving 4 slots", "STOPPING=1"]


def test_abstract_socket_address() -> None:
    name = f"vramsupply-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = SystemdNotifier({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready()
    notifier.status("x")
    notifier.stopping()


def test_a_vanished_socket_does_not_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    notifier.ready()
    notifier.status("still fine")
    assert len([r for r in caplog.records if "cannot notify systemd" in r.getMessage()]) == 1


def test_watchdog_interval_is_half_of_watchdog_usec_and_honours_watchdog_pid() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


async def test_watchdog_pings_from_the_event_loop_and_stops_when_the_loop_hangs(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})  # ping every 50 ms
    task = notifier.start_watchdog()
    assert task is not None
    await asyncio.sleep(0.3)
    pings_while_healthy = received(sock)
    time.sleep(0.3)  # the loop is blocked: no pings may be sent meanwhile
    pings_while_hung = received(sock)
    task.cancel()
    notifier.close()
    assert pings_while_healthy.count("WATCHDOG=1") >= 3
    assert set(pings_while_healthy) == {"WATCHDOG=1"}
    assert pings_while_hung == []


async def test_no_watchdog_task_without_watchdog_usec(notify_socket: tuple[socket.socket, str]) -> None:
    _, path = notify_socket
    assert SystemdNotifier({"NOTIFY_SOCKET": path}).start_watchdog() is None


# A first download may outlast TimeoutStartSec: while data moves, systemd is given more time


def extensions(sock: socket.socket) -> list[str]:
    return [m for m in received(sock) if m.startswith("EXTEND_TIMEOUT_USEC=")]


def test_each_check_at_which_data_moved_extends_the_start_and_a_stall_does_not(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = notify_socket
    monkeypatch.setattr(notify, "PROGRESS_CHECK_SECONDS", 0.001)
    mib = 1 << 20
    # bytes so far at each check: 3 MiB, then 1 kiB (a stall), then 1 MiB, then nothing (no /proc)
    readings = iter([0, 3 * mib, 3 * mib + 1024, 4 * mib + 1024, None, None])
    done = asyncio.Event()

    def moved() -> int | None:
        try:
            return next(readings)
        except StopIteration:
            done.set()
            return None

    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})

    async def run() -> None:
        extending = asyncio.ensure_future(notifier.extend_start_while_moving(moved))
        await done.wait()
        extending.cancel()

    asyncio.run(run())
    notifier.close()
    assert extensions(sock) == ["EXTEND_TIMEOUT_USEC=600000000"] * 2


def test_preparing_the_model_while_it_downloads_keeps_extending_the_start(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The serve lifecycle's preparation, with a backend whose download writes 4 MiB at a time."""
    from vramsupply.serve.lifecycle import prepare
    from vramsupply.signals import StopSignals

    sock, path = notify_socket
    monkeypatch.setattr(notify, "PROGRESS_CHECK_SECONDS", 0.05)

    class Downloading:
        kind = EngineKind.llama_cpp.value

        async def prepare(self) -> str:
            with open(tmp_path / "model.gguf", "wb") as fh:
                for _ in range(4):
                    await asyncio.sleep(0.06)
                    fh.write(os.urandom(4 << 20))
                    fh.flush()
            return "the model"

    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})

    async def run() -> object:
        return await prepare(Settings(model="acme/m"), Downloading(), notifier, StopSignals())

    assert asyncio.run(run()) == "the model"
    notifier.close()
    messages = received(sock)
    assert messages[0] == "STATUS=preparing acme/m (downloading it unless cached)"
    assert "EXTEND_TIMEOUT_USEC=600000000" in messages


def test_io_bytes_reads_what_the_kernel_counts(tmp_path: Path) -> None:
    io = tmp_path / "io"
    io.write_text("rchar: 1000\nwchar: 24\nsyscr: 3\n")
    assert notify.io_bytes(str(io)) == 1024
    assert notify.io_bytes(str(tmp_path / "absent")) is None
    io.write_text("rchar: many\n")
    assert notify.io_bytes(str(io)) is None
    assert notify.io_bytes() is not None  # Linux counts this process's own
