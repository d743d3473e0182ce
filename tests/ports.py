"""Free TCP ports for a server a test starts in another process (which must be told its port).

The tests run in parallel workers (pytest-xdist). "Bind port 0, read the number, close" races
twice there: the other worker's next port 0 may be the same number, and so may the local port the
kernel gives any outgoing connection, before the agent under test has bound it. So each worker
takes its ports from a slice of its own below the kernel's ephemeral range (which neither port 0
nor an outgoing connection ever draws from), in turn, and checks each is free before handing it out.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

FIRST, LAST = 20000, 32000  # below Linux's default ephemeral range (32768-60999)


def _slice() -> range:
    low = FIRST
    high = min(LAST, _ephemeral_start())
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    size = (high - low) // workers
    return range(low + index * size, low + (index + 1) * size)


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return LAST


def _cycle() -> Iterator[int]:
    ports = _slice()
    start = random.randrange(len(ports))  # a rerun soon after does not meet its own TIME_WAITs
    return itertools.cycle([*ports[start:], *ports[:start]])


_ports = _cycle()


def free_port() -> int:
    """A port on 127.0.0.1 nobody listens on now, and that no other worker will hand out."""
    for port in itertools.islice(_ports, 1000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in this worker's range")
