"""The earnings ledger: every finished request, priced, in a local SQLite file `vramsupply earnings` reads.

``serve`` opens a ``LedgerWriter`` and plugs a ``LedgerRecorder`` into the HTTP server; the server
reports each finished request (``server.accounting``) and the recorder prices it. Nothing here
talks to the platform: the ledger is the provider's own record to check payouts against.
"""

from vramsupply.ledger.money import cents, earned_nanocents, gross_nanocents
from vramsupply.ledger.recorder import LedgerRecorder, UnopenedLedger, open_recorder
from vramsupply.ledger.store import Entry, LedgerError, LedgerStore, default_ledger_path
from vramsupply.ledger.writer import LedgerWriter

__all__ = [
    "Entry",
    "LedgerError",
    "LedgerRecorder",
    "LedgerStore",
    "LedgerWriter",
    "UnopenedLedger",
    "cents",
    "default_ledger_path",
    "earned_nanocents",
    "gross_nanocents",
    "open_recorder",
]
