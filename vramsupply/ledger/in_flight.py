"""Requests in flight, on disk: what a killed agent leaves of the requests it was serving.

A request's row in ``requests`` is written when it ends, so an agent killed outright (SIGKILL, the
OOM killer, a power cut) left no trace of the requests it was generating, though their tokens were
served and heartbeats may have reported them to the platform. Now a request has a row in
``in_flight`` from its first generated token on (its prompt tokens, the completion tokens so far),
written by the writer thread and brought up to date every 2 s while it runs (one transaction for all
of them, nothing per token: ``server.accounting.IN_FLIGHT_EVERY_SECONDS``). Its finished row replaces it in one transaction.
A request relayed to an upstream engine has one too, from its first relayed text, its tokens counted
as well as they are known mid-stream (``upstream.exchange``): its prompt tokens may be an estimate
there at first, brought up to date with the rest once the upstream reports them. Its row in flight
is under an id of ours, not the finished row's (``store.Entry.flight_id``), and goes in the same transaction.

Each row names its ``run``: the agent process, by pid and start time (a later process given the
same pid is not taken for it). Rows of a run that is gone were interrupted: the next agent to open
the ledger moves them to ``requests`` as such (``complete`` 0, ``interrupted`` 1, no money: no buyer
received their usage, which is what buyers pay by), stamped with the time their tokens were last
written; `vramsupply earnings` reads them as interrupted already, without writing. Lost, exactly (of
our own engine's requests; a relayed one's counts are approximate besides, as said there): the
completion tokens generated after that last write (at most 2 s of output) and the prompt's cached
tokens, known only at the end (an interrupted row has 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vramsupply.host.processes import process_start, same_process

UPSERT = """
INSERT INTO in_flight (run, request_id, started_at, updated_at, model, source, choices, prompt_tokens, completion_tokens, input_price, output_price)
VALUES (:run, :request_id, :at, :at, :model, :source, :choices, :prompt_tokens, :completion_tokens, :input_price, :output_price)
ON CONFLICT (run, request_id) DO UPDATE SET updated_at = excluded.updated_at, prompt_tokens = excluded.prompt_tokens,
    completion_tokens = excluded.completion_tokens
"""

FORGET = "DELETE FROM in_flight WHERE run = ? AND request_id = ?"

INTERRUPTED = """
INSERT INTO requests (finished_at, request_id, model, source, complete, choices, prompt_tokens, cached_tokens, completion_tokens,
                      input_price, output_price, gross_nanocents, earned_nanocents, interrupted)
SELECT updated_at, request_id, model, source, 0, choices, prompt_tokens, 0, completion_tokens, input_price, output_price, 0, 0, 1
FROM in_flight WHERE run = ?
"""


@dataclass(frozen=True)
class InFlight:
    """One request in flight, priced as its finished row will be (``ledger.recorder.Pricing``)."""

    request_id: str
    model: str
    source: str
    choices: int
    prompt_tokens: int
    completion_tokens: int
    input_price: int
    output_price: int
    at: float
    """When these tokens were counted."""

    def row(self, run: str) -> dict[str, object]:
        return {"run": run, **self.__dict__}


def this_run() -> str:
    """This process, as ``in_flight.run`` names it: ``<pid>:<start time>`` (``<pid>:`` where unknown)."""
    pid = os.getpid()
    started = process_start(pid)
    return f"{pid}:{'' if started is None else started}"


def run_gone(run: str) -> bool:
    """Whether the process ``run`` names has ended: its rows in flight will never be finished."""
    pid, _, started = run.partition(":")
    try:
        return not same_process(int(pid), int(started) if started else None)
    except ValueError:
        return True  # not a run this code wrote: nobody will finish its rows
