"""The decode runs at a lower CPU priority than the rest of the process.

On a CPU the decode's threads keep every core busy: ggml's threads spin at each barrier of the
graph, so a two-core machine running two decode threads has no idle core left. The event loop (which
writes each token to its buyer, answers ``/health`` and sends the heartbeats) then has to wait for
the kernel to take a core from the decode, and it is often descheduled while it holds the GIL; the
scheduler thread, back from ``llama_decode``, then waits for it before it can sample. At one stream
that was the whole gap left to llama-server (README, "Where the time goes at one stream": 0.24 ms of
event-loop CPU per token, the GIL held 22 % of the time). With the scheduler thread
``COMPUTE_NICE_OFFSET`` nice levels below the thread that started it, the kernel should give a
waking event loop a core sooner (the mechanism was not traced; the effect was measured). OpenMP's
worker threads are created by the scheduler thread on its first decode, so they inherit its
priority, and so does the grammar worker (``offthread.py``) it starts.

Measured side by side on the 2-core bench VM, the same code with and without
(``bench/results/2026-12-03-decode-nice-*.json``): one stream faster by 1.6-4.2 % (median pair) in
five runs at offsets of 5 to 19, two of them beside llama-server (level with it before, 1.8 % and
3.1 % ahead after); 4 streams 1.0 and 1.05x; 16 streams 1.0, 0.98 and 0.98x in three runs, with the
first-token p95 27, 31 and 6 ms later (not explained; perhaps the event loop, now first, interrupts
steps that its work had waited out before). A small cost where vramsupply is 1.5x llama-server, for
a gain where it was level. Under overload it counts most: vramsupply alone at 0.8 conversations
a second in the marketplace bench, four traces, summed goodput 68.8 tok/s without it and 110.3
with it (``…-marketplace-decode-nice-ab.json``).

Against other programs: where the kernel groups threads by session (``sched_autogroup``, on in
most distributions' kernels; a systemd service is a session of its own) or by cgroup (systemd's
cpu controller), a nice value only orders threads within their group. Yet a niced thread weighs
less in its group's share of a core: with one thread pinned (``--threads 1``) beside two busy
programs in another session, the offset cost about a fifth of the tok/s at one stream (two ad-hoc
runs, 76 against 97 tok/s without it); at the default threads, which ``thread_tuner.py`` lowers
there, no difference showed. Where the kernel groups nothing, the decode gives way to busy programs
at normal priority. Where the kernel refuses (a sandbox without ``setpriority``), the engine runs at
the priority it has.

So the offset is a setting, ``decode_nice`` (``--decode-nice``, ``VRAM_SUPPLY_DECODE_NICE``; 0 to 19,
default ``COMPUTE_NICE_OFFSET``), as llama-server's ``--prio``; 0 leaves the decode at the agent's own
priority (no ``setpriority`` call at all). Set 0 where other busy programs run at normal priority in
the decode's group (a desktop, a shared machine): there a niced decode got about a tenth of a core.
Measured with two ``while True: pass`` loops beside two engine-heavy test files run at once on the
2-core machine: 130.7 s with the offset, 33.1 s without; the test suite itself sets 0 for that reason
(``tests/conftest.py``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from vramsupply.config.settings import DEFAULT_DECODE_NICE, MAX_NICE

log = logging.getLogger(__name__)

COMPUTE_NICE_OFFSET = DEFAULT_DECODE_NICE


def lower_compute_priority(offset: int | None = None) -> int | None:
    """Lower the calling thread's priority by ``offset`` nice levels (None: ``COMPUTE_NICE_OFFSET`` as
    it is at the call; at most to 19); the new nice value, or None where the offset is 0 (nothing is
    changed), the kernel refused, or the system has no per-thread nice (only Linux keeps nice per
    thread: elsewhere a thread id passed as a process id could name another process)."""
    offset = COMPUTE_NICE_OFFSET if offset is None else offset
    if offset == 0 or sys.platform != "linux":
        return None
    tid = threading.get_native_id()
    try:
        nice = min(os.getpriority(os.PRIO_PROCESS, tid) + offset, MAX_NICE)
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:
        log.debug("the decode keeps its priority: %s", exc)
        return None
    return nice
