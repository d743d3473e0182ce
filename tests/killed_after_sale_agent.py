"""Test double: the real `vramsupply` command line, killed outright (SIGKILL, as by the OOM killer)
the instant its earnings ledger has committed the first finished request's row.

Run as ``python tests/killed_after_sale_agent.py serve ...``. Only ``LedgerStore.add`` is wrapped,
and only to kill the process once the real one returned (its commit is in the WAL); what the ledger
holds then is what the next start, and `vramsupply earnings`, find. It says so on stderr first
("FAULT: killed after the sale's commit").
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable

from vramsupply.cli import main
from vramsupply.ledger.store import Entry, LedgerStore

real_add = LedgerStore.add


def add_then_die(store: LedgerStore, entries: Iterable[Entry], *, once: bool = False) -> None:
    entries = list(entries)
    real_add(store, entries, once=once)
    if any(not entry.interrupted for entry in entries):
        print("FAULT: killed after the sale's commit", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


LedgerStore.add = add_then_die  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
