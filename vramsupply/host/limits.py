"""The open-files limit a server needs: each buyer's connection holds a file descriptor.

Most systems start a process, and systemd a service, with a soft limit of 1,024 open files (the
hard limit is far higher: 524,288 under systemd 240 and later). Past the soft limit the event
loop cannot accept connections (``EMFILE``), so ``/health`` probes fail too and the platform marks
a busy agent offline. ``serve`` therefore raises its soft limit to the hard one, up to
``WANTED_OPEN_FILES``, as Go's runtime and many servers do at start. Nothing here uses
``select()``, which cannot take descriptors past 1,024; asyncio uses epoll.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

WANTED_OPEN_FILES = 65536


def raise_open_files_limit(wanted: int = WANTED_OPEN_FILES) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted``, within the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.debug("could not raise the open-files limit from %d: %s", soft, exc)
            return soft
        log.debug("open-files limit raised from %d to %d", soft, target)
        return target
    return soft
