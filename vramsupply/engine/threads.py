"""How many CPU threads llama.cpp gets when the provider did not say: the physical cores.

llama.cpp's own context default is 4 threads whatever the machine. On a 2-core VM that
oversubscribes the cores and halves decode speed (80 against 165 tok/s on the bench model); on a
32-core box it leaves most of them idle. llama-server uses the physical cores (one token per slot
per step is bound by reading the weights, and a core's second hyper-thread only adds contention),
for prompt processing too: its ``-tb`` defaults to ``-t``. We do the same, counting only the CPUs
this process may run on (taskset, cgroup cpusets), read from sysfs, so a pinned container does not
spawn threads for the whole host.

Nor more than a cgroup's CPU quota allows (``host/cgroups.py``: Docker's ``--cpus``, a Kubernetes
limit), where every core is visible but only some of their time. The kernel lets the group's
threads run until they have spent the quota for the period (100 ms by default) and stops them all
for the rest of it, and llama.cpp's threads meet at a barrier after every operation of the graph,
so a thread per core spends the quota on threads that add little. Measured on the 2-core VM in a
cgroup v1 quota of one CPU (bench model, ``bench/contention.py --quota``): llama-server at its
default two threads served 104.5 / 152.0 and 116.1 / 165.3 tok/s at c = 1 / 4 in two runs,
vramsupply with one thread 157.1 / 174.1 and 165.3 / 182.0. At a quota of 1.5 CPUs two threads
were the better at c = 4 (vramsupply 233.9 and 228.8; one thread, ad hoc, 181.0) and level at
c = 1, so the quota is rounded to the nearest whole CPU, halves up; the thread tuner
(``thread_tuner.py``) still goes lower when steps say so.

An earlier default gave prompt processing every logical CPU, as llama-cpp-python's ``Llama``
does. But llama.cpp uses the batch thread count for every step of more than one token, and with
continuous batching that is every decode step of two or more streams (and a one-stream step that
carries a prompt-lookup draft), not only prompts: on a CPU with hyper-threads the memory-bound
decode of several streams then ran two threads a core. Upstream reports such oversubscription as
several times slower (llama.cpp issue #19110; unsloth PR #5894, for layers offloaded to the CPU).
Not measured here: the bench VMs have one thread per core, where both defaults are the same.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vramsupply.host.cgroups import PROC_SELF, cpu_limit

log = logging.getLogger(__name__)

SYSFS_CPU = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class Threads:
    """``decode``: threads for steps of one token; ``batch``: for steps of more (prompts, several streams)."""

    decode: int
    batch: int


def resolve_threads(requested: int | None, sysfs: Path = SYSFS_CPU, proc: Path = PROC_SELF) -> Threads:
    """``--threads N`` uses N for both; unset means the physical cores for both, within a CPU quota."""
    if requested is not None:
        _, logical = cpu_counts(allowed_cpus(), sysfs)
        if requested > logical:  # each step waits for the slowest thread: many times slower, silently
            log.warning("--threads %d is more than the %d CPUs this process may use: every step waits for threads that share a CPU", requested, logical)
        return Threads(requested, requested)
    physical, _ = cpu_counts(allowed_cpus(), sysfs)
    limit = cpu_limit(proc)
    threads = threads_within(physical, limit)
    if threads < physical:
        log.info("a cgroup CPU quota of %.2f CPUs: %d CPU threads, not one for each of the %d cores", limit, threads, physical)
    return Threads(threads, threads)


def threads_within(cores: int, limit: float | None) -> int:
    """``cores`` threads, or fewer under a CPU quota: the quota rounded to the nearest whole CPU, at least one."""
    if limit is None:
        return cores
    return max(1, min(cores, math.floor(limit + 0.5)))


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
