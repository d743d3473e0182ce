"""Grammar sampling off the scheduler thread.

A grammar is applied by rejection (``sampling.py``): when it refuses the token the chain picked,
the whole vocabulary goes through it, and for a big schema that walk can take a second. On the
scheduler thread that second would be a second-long pause in every other buyer's stream. So a
slot whose request has a grammar hands its copied logits to a worker thread and sits out the
decode steps until its token is ready, while the other slots go on; the token joins the batch of
the next step after it arrives. llama.cpp's grammar calls release the GIL (ctypes), so the worker
really runs beside the decode.

One worker: grammar requests wait for each other, never for the decode. A request that asks for
logprobs, or has a prompt-lookup draft to verify, is sampled in the step as before.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable

import llama_cpp

from .scoring import Scored
from .slots import Slot


class OffThreadSampling:
    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vramsupply-grammar")

    @staticmethod
    def wanted(slot: Slot) -> bool:
        task = slot.task
        return task is not None and task.sampler.has_grammar and task.logprobs is None and not slot.draft.size and not slot.backend_sampled

    def dispatch(self, slot: Slot, ctx: llama_cpp.llama_context_p) -> None:
        """Copy the slot's logits row now; sample it on the worker."""
        assert slot.task is not None
        sampler = slot.task.sampler
        sampler.load(ctx, slot.row)
        slot.pending = self._pool.submit(sampler.sample_loaded)

    @staticmethod
    def ready(slots: Iterable[Slot]) -> list[tuple[Slot, int | Scored | BaseException]]:
        """Slots whose token has arrived (or whose sampling failed), each taken off the worker; and
        those whose prompt's scores have (``scoring.py``), with the token held back for them."""
        done: list[tuple[Slot, int | Scored | BaseException]] = []
        for slot in slots:
            future = slot.pending
            if future is not None and future.done():
                slot.pending = None
                error = future.exception()
                done.append((slot, error if error is not None else future.result()))
        return done

    @staticmethod
    def wait(slots: Iterable[Slot], timeout: float) -> bool:
        """Block until some slot's token (or scores) arrives (True) or ``timeout`` passes with none (False)."""
        pending = [slot.pending for slot in slots if slot.pending is not None]
        if not pending:
            return False
        done, _ = concurrent.futures.wait(pending, timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        return bool(done)

    def close(self) -> None:
        """Wait for the worker: no grammar may be walked once the model is freed."""
        self._pool.shutdown(wait=True)
