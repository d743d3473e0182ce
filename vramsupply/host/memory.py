"""How much memory this process may still take: the kernel's ``MemAvailable``, or less where a
cgroup's limit leaves less (``cgroups.py``).

Docker's ``--memory``, a Kubernetes memory limit or systemd's ``MemoryMax=`` do not change
``/proc/meminfo``: a container limited to 8 GiB on a 128 GiB host reads about 128 GiB available.
Sized from that, the host prompt cache's default budget (a quarter of what is available, up to
8 GiB) or the layers the memory plan keeps on the CPU could outgrow the container, and the
kernel's OOM killer ends the whole agent mid-request, not just the request.
"""

from __future__ import annotations

import os
from pathlib import Path

from .cgroups import PROC_SELF, memory_room

MEMINFO = Path("/proc/meminfo")


def available_bytes(meminfo: Path = MEMINFO, proc: Path = PROC_SELF) -> int | None:
    """Bytes of memory this process may still use; None when nothing says."""
    host, room = host_available_bytes(meminfo), memory_room(proc)
    if room is None or host is None:
        return host if room is None else room
    return min(host, room)


def host_available_bytes(meminfo: Path = MEMINFO) -> int | None:
    """The kernel's ``MemAvailable`` (free memory plus what it can reclaim), else free pages; None when unknown."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None
