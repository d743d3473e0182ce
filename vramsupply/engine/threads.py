"""How many CPU threads llama.cpp gets when the provider did not say: the physical cores.

llama.cpp's own context default is 4 threads whatever the machine. On a 2-core VM that
oversubscribes the cores and halves decode speed (80 against 165 tok/s on the bench model); on a
32-core box it leaves most of them idle. llama-server uses the physical cores (one token per slot
per step is bound by reading the weights, and a core's second hyper-thread only adds contention),
for prompt processing too: its ``-tb`` defaults to ``-t``. We do the same, counting only the CPUs
this process may run on (taskset, cgroup cpusets), read from sysfs, so a pinned container does not
spawn threads for the whole host.

An earlier default gave prompt processing every logical CPU, as llama-cpp-python's ``Llama``
does. But llama.cpp uses the batch thread count for every step of more than one token, and with
continuous batching that is every decode step of two or more streams (and a one-stream step that
carries a prompt-lookup draft), not only prompts: on a CPU with hyper-threads the memory-bound
decode of several streams then ran two threads a core. Upstream reports such oversubscription as
several times slower (llama.cpp issue #19110; unsloth PR #5894, for layers offloaded to the CPU).
Not measured here: the bench VMs have one thread per core, where both defaults are the same.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SYSFS_CPU = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class Threads:
    """``decode``: threads for steps of one token; ``batch``: for steps of more (prompts, several streams)."""

    decode: int
    batch: int


def resolve_threads(requested: int | None, sysfs: Path = SYSFS_CPU) -> Threads:
    """``--threads N`` uses N for both; unset means the physical cores for both."""
    if requested is not None:
        return Threads(requested, requested)
    physical, _ = cpu_counts(allowed_cpus(), sysfs)
    return Threads(physical, physical)


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
