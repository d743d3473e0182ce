"""The earnings ledger: every finished request, priced, in a local SQLite file `vramsupply earnings` reads.

``serve`` opens a ``LedgerWriter`` and plugs a ``LedgerRecorder`` into the HTTP server; the server
reports each finished request (``server.accounting``) and the recorder prices it. Nothing here
talks to the platform: the ledger is the provider's own record to check payouts against.
"""

from __future__ import annotations

from vramsupply.lazy import lazy_names

__getattr__, __dir__, __all__ = lazy_names(
    __name__,
    {
        "vramsupply.ledger.money": ("cents", "earned_nanocents", "gross_nanocents"),
        "vramsupply.ledger.recorder": ("LedgerRecorder", "UnopenedLedger", "open_recorder"),
        "vramsupply.ledger.store": ("Entry", "LedgerError", "LedgerStore", "default_ledger_path"),
        "vramsupply.ledger.writer": ("LedgerWriter",),
    },
)
