"""Read the process's cgroup limits: CPU time (Docker's ``--cpus``, a Kubernetes CPU limit,
systemd's ``CPUQuota=``) and memory (``--memory``, a memory limit, ``MemoryMax=``).

Read as the JDK and Go's runtime read them: ``/proc/self/cgroup`` names the process's group in
each hierarchy, ``/proc/self/mountinfo`` where that hierarchy is mounted and which of its groups
the mount shows (a container sees its own group as the root). A limit set on an ancestor binds
too, so every level from the group up to the mount point is read, and the tightest wins:

- CPU: cgroup v2 ``cpu.max`` ("max 100000", or "150000 100000": quota and period in
  microseconds); v1 ``cpu.cfs_quota_us`` (-1 for none) over ``cpu.cfs_period_us``.
- memory: the room left under the limit, the limit less what the group uses, page cache it may
  drop not counted as used (as the kubelet's working set): v2 ``memory.max`` ("max" for none),
  ``memory.current`` and ``inactive_file`` of ``memory.stat``; v1 ``memory.limit_in_bytes`` (a
  number near 2^63 for none), ``memory.usage_in_bytes`` and ``total_inactive_file``.

Anything unreadable means no limit known, never an error: the host's own numbers decide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PROC_SELF = Path("/proc/self")
# cgroup v1 writes "no memory limit" as the largest page-aligned 64-bit number
V1_UNLIMITED_BYTES = 1 << 60


@dataclass(frozen=True)
class CgroupMount:
    """Where one cgroup hierarchy is mounted: ``root`` is the group the mount point shows."""

    version: int
    root: str
    mount_point: Path


def cpu_limit(proc: Path = PROC_SELF) -> float | None:
    """The CPUs' worth of time this process's cgroups allow per period, or None where unlimited or unknown."""
    return _tightest("cpu", proc, lambda level, version: _v2_cpu(level) if version == 2 else _v1_cpu(level))


def memory_room(proc: Path = PROC_SELF) -> int | None:
    """Bytes this process's cgroups let it use beyond what they use now, or None where unlimited or unknown."""
    room = _tightest("memory", proc, lambda level, version: _v2_memory(level) if version == 2 else _v1_memory(level))
    return None if room is None else max(int(room), 0)


def _tightest(controller: str, proc: Path, read: Callable[[Path, int], float | None]) -> float | None:
    limits = [
        limit
        for mount, directory in _controller_dirs(controller, proc)
        for level in _levels(directory, mount)
        if (limit := read(level, mount.version)) is not None
    ]
    return min(limits) if limits else None


def _controller_dirs(controller: str, proc: Path) -> Iterator[tuple[CgroupMount, Path]]:
    """Each mounted hierarchy holding ``controller`` for this process, with the process's group's directory."""
    mounts = _mounts(controller, proc)
    for line in _read_lines(proc / "cgroup"):
        hierarchy, _, rest = line.partition(":")
        controllers, _, group = rest.partition(":")
        version = 2 if hierarchy == "0" and controllers == "" else 1
        if version == 1 and controller not in controllers.split(","):
            continue
        for mount in mounts:
            if mount.version == version:
                yield mount, mount.mount_point / _relative(group, mount.root)


def _mounts(controller: str, proc: Path) -> list[CgroupMount]:
    """cgroup2 mounts, and cgroup v1 mounts of ``controller``, from mountinfo."""
    mounts = []
    for line in _read_lines(proc / "mountinfo"):
        fields, _, tail = line.partition(" - ")
        parts, tail_parts = fields.split(), tail.split()
        if len(parts) < 5 or len(tail_parts) < 3:
            continue
        fstype, options = tail_parts[0], tail_parts[2].split(",")
        if fstype == "cgroup2" or (fstype == "cgroup" and controller in options):
            mounts.append(CgroupMount(2 if fstype == "cgroup2" else 1, parts[3], Path(parts[4])))
    return mounts


def _relative(group: str, root: str) -> str:
    """The group's path below the mount: a container's mount shows its own group as the root."""
    if root != "/" and (group == root or group.startswith(root + "/")):
        group = group[len(root):]
    return group.lstrip("/")


def _levels(directory: Path, mount: CgroupMount) -> Iterator[Path]:
    """The group's directory and each ancestor's the mount shows."""
    for level in (directory, *directory.parents):
        if not level.is_relative_to(mount.mount_point):
            return
        yield level


def _v2_cpu(directory: Path) -> float | None:
    fields = _read_text(directory / "cpu.max").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _v1_cpu(directory: Path) -> float | None:
    return _ratio(_read_text(directory / "cpu.cfs_quota_us"), _read_text(directory / "cpu.cfs_period_us"))


def _ratio(quota: str, period: str) -> float | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _v2_memory(directory: Path) -> int | None:
    return _room(directory, "memory.max", "memory.current", "inactive_file")


def _v1_memory(directory: Path) -> int | None:
    return _room(directory, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _room(directory: Path, limit_file: str, usage_file: str, droppable_key: str) -> int | None:
    limit, usage = _int(_read_text(directory / limit_file)), _int(_read_text(directory / usage_file))
    if limit is None or usage is None or limit >= V1_UNLIMITED_BYTES:
        return None
    return limit - max(usage - _stat(directory / "memory.stat", droppable_key), 0)


def _stat(path: Path, key: str) -> int:
    for line in _read_lines(path):
        name, _, value = line.partition(" ")
        if name == key:
            return _int(value) or 0
    return 0


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _read_lines(path: Path) -> list[str]:
    return [line for line in _read_text(path).splitlines() if line]
