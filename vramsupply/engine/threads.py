"""How many CPU threads llama.cpp gets when the provider did not say.

llama.cpp's own context default is 4 threads whatever the machine. On a 2-core VM that
oversubscribes the cores and halves decode speed (80 against 165 tok/s on the bench model); on a
32-core box it leaves most of them idle. llama-server instead uses the physical cores for decoding
(one token per slot per step is memory-bound, and a second hyper-thread on a core only adds
contention) and llama-cpp-python's ``Llama`` lets prompt processing, which is compute-bound, use
every logical CPU. We do the same, counting only the CPUs this process may run on (taskset,
cgroup cpusets), read from sysfs, so a pinned container does not spawn threads for the whole host.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SYSFS_CPU = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class Threads:
    """``decode``: threads for generation steps; ``batch``: threads for prompt processing."""

    decode: int
    batch: int


def resolve_threads(requested: int | None) -> Threads:
    """``--threads N`` uses N for both; unset means physical cores for decode and all CPUs for batch."""
    if requested is not None:
        return Threads(requested, requested)
    physical, logical = cpu_counts(allowed_cpus())
    return Threads(physical, logical)


def allowed_cpus() -> list[int]:
    """The CPU ids this process may run on (its affinity mask), or all CPUs where there is none."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cpu_counts(cpus: Iterable[int], sysfs: Path = SYSFS_CPU) -> tuple[int, int]:
    """(physical cores, logical CPUs) among ``cpus``.

    CPUs that share a core list the same ``thread_siblings_list`` in sysfs, so the number of
    distinct lists is the number of cores. A CPU whose topology cannot be read (no sysfs, another
    OS) counts as a core of its own: that never gives fewer threads than CPUs with real cores.
    """
    cpus = list(cpus)
    cores = {_core_of(cpu, sysfs) for cpu in cpus}
    logical = max(len(cpus), 1)
    return max(min(len(cores), logical), 1), logical


def _core_of(cpu: int, sysfs: Path) -> str:
    for name in ("core_cpus_list", "thread_siblings_list"):
        try:
            return (sysfs / f"cpu{cpu}" / "topology" / name).read_text().strip()
        except OSError:
            continue
    return f"cpu{cpu}"
