"""Child processes the agent starts (a launched engine, a tunnel tool) must not outlive it.

``die_with_parent`` runs in the child between fork and exec: the kernel sends the child SIGTERM
when the agent dies without stopping it (SIGKILL, the OOM killer), so a restarted agent never
finds an orphan still holding the GPU or a tunnel to a dead port. Linux only
(``prctl(PR_SET_PDEATHSIG)``); elsewhere an orphan outlives the agent.
"""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
