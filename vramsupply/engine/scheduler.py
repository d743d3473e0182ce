"""The decode loop: one thread that owns the llama context and runs every request.

Modelled on llama-server's ``update_slots``. Each step:

1. drain the inbox (submits and cancels posted from any thread) and admit waiting requests, the
   most urgent first, into idle slots (``admission.py``);
2. plan one step (``pacing.py``): the next token of every generating slot first (so generation
   never starves), then prompt chunks, the prompt that can answer soonest first, up to ``n_batch``
   rows (fewer while others generate), written in sequence-id order so llama.cpp can decode them
   in as few forward passes as possible;
3. call ``llama_decode`` once, or twice when the generating rows and the prompt rows together reach
   a flash-attention tile (``tiles.decode_parts``), with the CPU threads ``thread_tuner.py``
   chooses (it releases the GIL; when the shared KV cache is full, roll the part back and pause a
   request instead: ``preempt.py``), sample every slot that has a logits row with its own sampler chain
   (``rows.py``; a grammar request's token is sampled on a worker thread and joins a later step,
   ``offthread.py``), and turn tokens into text deltas (2 and 3: ``step.py``);
4. hand the step's events to each consumer event loop with a single ``call_soon_threadsafe``, at
   most once per ``stream_interval`` mid-answer (``outbox.py``, ``cadence.py``).

When no request is active the thread blocks on the inbox, so an idle engine costs nothing.

Every ``llama_decode`` of the context runs on this thread, the load's warm-up included
(``start``): a decode on another thread costs every later step (``warmup.py``).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

import llama_cpp
from llama_cpp._internals import LlamaContext

from .admission import Admission
from .cadence import DEFAULT_INTERVAL_S, Cadence
from .counters import Counters
from .liveness import DEFAULT_STALL_TIMEOUT, DecodesFailing, Liveness
from .pacing import PrefillPacer
from .generation import Event, Finish, post
from .host_pages import HostBuffers
from .inbox import STOP, Cancel, Inbox, Message, Submit
from .model import Model
from .outbox import Outbox
from .preempt import KvPressure
from .priority import lower_compute_priority
from .prompt_cache import HostPromptCache
from .scoring import Scored
from .slots import Slot, Task
from .step import StepRunner
from .thread_tuner import StepThreads, ThreadTuner
from .tiles import rewinds_for_tiles
from .types import EngineClosed, EngineError, EngineFailed, EngineStats, Overloaded
from .warmup import WarmUpOnThread

log = logging.getLogger(__name__)

PENDING_WAIT_SECONDS = 0.05
"""While every active slot awaits a token from the grammar worker, how long to block before
looking at the inbox again (a cancel or a new request)."""


@dataclass
class Reservation:
    """Places ``Scheduler.reserve`` holds for one request, ``left`` of them not yet taken; once
    ``released``, a submit with it is checked as any other (its request was given up meanwhile)."""

    left: int
    released: bool = False


class Scheduler:
    """Owns the context, the slots and the waiting queue; everything public is thread-safe."""

    def __init__(
        self,
        model: Model,
        context: LlamaContext,
        n_ctx: int,
        parallel: int,
        n_batch: int,
        max_queue: int,
        cache_ram: int = 0,
        max_draft: int = 0,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        kv_per_slot: bool = False,
        stream_interval: float = DEFAULT_INTERVAL_S,
        tuner: ThreadTuner | None = None,
        apart: bool = True,
        host_buffers: HostBuffers | None = None,
        decode_nice: int | None = None,
    ) -> None:
        self._model = model
        self._decode_nice = decode_nice  # nice levels below the starting thread (None: priority.py's default)
        self._ctx = context.ctx
        self._memory = context.memory
        self._slots = [Slot(seq_id, n_ctx, max_draft) for seq_id in range(parallel)]
        self._capacity = parallel + max_queue
        self._inbox = Inbox()
        self._waiting: deque[Task] = deque()
        self._cadence = Cadence(stream_interval)
        self._stopping = False
        # Shared with other threads, guarded by the counters' lock.
        self._counters = Counters()
        self._lock = self._counters.lock
        self._closed = False
        self._reserved = 0  # places held for parts of a request not submitted yet (``reserve``)
        self._liveness = Liveness(stall_timeout)
        # Padding a prompt to a whole tile pays only where attention skips KV in tiles (the CPU's).
        self._pacer = PrefillPacer(llama_cpp.llama_n_ubatch(self._ctx), rewinds=apart and rewinds_for_tiles(model, kv_per_slot))
        self._prompt_cache = self._host_prompt_cache(cache_ram, parallel) if cache_ram > 0 else None
        self._kv = KvPressure(self._ctx, self._memory, self._counters, self._prompt_cache, len(self._slots))
        self._out = Outbox(self._ctx, model, self._counters, self._kv, self._cadence, self._slots, self._waiting)
        self._admission = self._new_admission(kv_per_slot)
        self._threads = StepThreads(self._ctx, tuner, self._counters)
        self._steps = self._new_steps(n_batch, max_draft, apart)
        self._offthread = self._steps.offthread
        self._thread = threading.Thread(target=self._run, name="vramsupply-scheduler", daemon=True)
        self._warm_up = WarmUpOnThread(context, model.vocab, host_buffers)

    def _host_prompt_cache(self, cache_ram: int, parallel: int) -> HostPromptCache:
        spare = parallel if llama_cpp.llama_n_seq_max(self._ctx) > parallel else None
        whole = not self._model.copies_prefixes
        return HostPromptCache(
            self._ctx, self._memory, cache_ram, spare, whole=whole, prefill_seconds=self._pacer.prompt_seconds, counters=self._counters
        )

    def _new_admission(self, kv_per_slot: bool) -> Admission:
        copies = self._model.copies_prefixes  # attention, not recurrent: a prefix may be lent to another sequence
        return Admission(
            self._ctx, self._memory, self._slots, self._waiting, self._pacer, self._kv, self._prompt_cache, self._counters, kv_per_slot,
            lends=copies and not kv_per_slot,
            window=llama_cpp.llama_model_n_swa(self._model.llama_model.model) if copies else None,
            whole=not copies, checkpoints=not copies,
        )

    def _new_steps(self, n_batch: int, max_draft: int, apart: bool) -> StepRunner:
        return StepRunner(
            self._ctx, self._memory, self._slots, self._waiting, self._pacer, self._threads, self._kv, self._out, self._liveness, self._counters,
            n_batch=n_batch, n_vocab=self._model.n_vocab, max_draft=max_draft, apart=apart,
        )

    def start(self) -> None:
        """Start the thread; return once it has warmed the model up (``warmup.py``), or raise the
        warm-up's error, the thread having ended. The warm-up decodes on the thread that will
        decode every step after it (see the module docstring)."""
        try:
            self._thread.start()
        except RuntimeError as exc:  # "can't start new thread": out of memory for its stack, or a thread limit
            raise EngineError(f"cannot start the engine's thread ({exc}): too little memory, or a limit on threads (ulimit -v or -u, a service's TasksMax)") from None
        self._warm_up.wait(join=self._thread.join)
        self._liveness.pauses.start()  # a frozen process is no stall (``liveness.py``); ended by ``stop``

    # ---- any thread -------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """How many tasks may be running or waiting at once: the slots and the queue's places."""
        return self._capacity

    def reserve(self, places: int) -> Reservation:
        """Hold ``places`` places for one request's tasks, all or none (raise EngineClosed /
        Overloaded): each ``submit(..., reservation=...)`` then takes one without a check, so
        requests arriving meanwhile cannot make a later part of it a 429; ``release`` gives back
        those not taken."""
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if self._taken() + places > self._capacity:
                raise Overloaded(self._overloaded(places))
            self._reserved += places
        return Reservation(places)

    def release(self, reservation: Reservation) -> None:
        """Give back the places of ``reservation`` no task took; a submit that comes later with it
        (a request given up while it was being submitted from another thread) takes none."""
        with self._lock:
            self._reserved -= reservation.left
            reservation.left, reservation.released = 0, True

    def submit(self, task: Task, room: int = 1, reservation: Reservation | None = None) -> None:
        """Queue a task, or raise EngineClosed / Overloaded without queueing it.

        ``room``: the places the task and the choices submitted after it (``later_choice``) need;
        those are checked with the first, so a request's choices are refused all together or not at all.
        ``reservation``: the task takes a place ``reserve`` held, unchecked, while it holds one.
        """
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed")
            counters = self._counters
            if reservation is not None and reservation.left > 0:
                reservation.left -= 1
                self._reserved -= 1
            elif not task.later_choice and self._taken() + room > self._capacity:
                raise Overloaded(self._overloaded(room))
            if counters.outstanding == 0:
                self._liveness.progressed()  # the stall clock runs only while there is work
            counters.outstanding += 1
            if not (task.later_choice or task.later_prompt):  # a request, whatever its n and its prompts (each a task)
                counters.requests_total += 1
            self._inbox.post(Submit(task))

    def _taken(self) -> int:
        """Call with ``_lock`` held: places held by tasks running or waiting, and by reservations."""
        return self._counters.outstanding + self._reserved

    def _overloaded(self, room: int) -> str:
        """Call with ``_lock`` held. Running and waiting are not told apart: a task counts as
        running only once the scheduler thread has admitted it."""
        taken = f"{self._taken()} requests are running or waiting"
        places = f"{len(self._slots)} slots and {self._capacity - len(self._slots)} places in the queue"
        need = f"; this request's {room} choices need {room} of them" if room > 1 else ""
        return f"{taken}, for {places}{need}"

    def cancel(self, task_id: str) -> None:
        self._inbox.post(Cancel(task_id))

    def stats(self) -> EngineStats:
        counters = self._counters
        with self._lock:
            return EngineStats(
                slots_total=len(self._slots),
                slots_busy=counters.busy,
                queue_depth=counters.outstanding - counters.busy,
                prompt_cache_bytes=self._prompt_cache.entries.nbytes if self._prompt_cache else 0,
                prompt_cache_entries=len(self._prompt_cache.entries) if self._prompt_cache else 0,
                prompt_cache_bound_bytes=self._prompt_cache.entries.kept_to if self._prompt_cache else 0,
                checkpoint_bytes=sum(slot.checkpoint_bytes for slot in self._slots),
                cpu_threads=counters.cpu_threads,
                failure=self._failure(),
                **counters.totals(),
            )

    def _failure(self) -> str | None:
        """Call with ``_lock`` held."""
        running = not self._closed and self._thread.ident is not None
        if running and not self._thread.is_alive():
            return "the scheduler thread exited unexpectedly"
        return self._liveness.failure(pending=self._counters.outstanding > 0, running=running)

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    def stop(self, timeout: float | None = None) -> bool:
        """Fail every pending request with EngineClosed and end the thread (idempotent).

        False when the thread is still inside a step after ``timeout`` seconds (a stalled decode):
        the caller must then leave the llama context alone.
        """
        with self._lock:
            already = self._closed
            self._closed = True
            if not already:
                self._inbox.post(STOP)
        self._liveness.pauses.stop()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def abandon(self, error: EngineError) -> None:
        """The thread is still inside a step after ``stop`` (hung, or long): end every request it
        holds from here with ``error``, so that each buyer gets it now, not a cut connection later.
        Only their channels are posted to: the slots and llama.cpp's memory stay as the thread left
        them (should the step end, the stop, posted again, ends the requests there once more)."""
        ended = [Event(s.task.channel, "", None, Finish(None, s.usage(), error)) for s in list(self._slots) if s.task is not None]
        waiting = [*self._waiting, *(m.task for m in self._inbox.drain() if isinstance(m, Submit))]
        ended += [Event(t.channel, "", None, Finish(None, t.usage_while_waiting(), error)) for t in waiting]
        self._inbox.post(STOP)
        post(ended)

    # ---- scheduler thread -------------------------------------------------------------------

    def _run(self) -> None:
        lower_compute_priority(self._decode_nice)
        try:
            if self._warm_up.run():
                while self._serve_once():
                    pass
        except DecodesFailing as failing:  # llama.cpp fails every decode (``liveness.py``)
            log.error("%s; ending every request", failing)
            self._died(str(failing))
        except Exception as exc:
            log.error("the scheduler thread failed: %r", exc)
            log.debug("where the scheduler thread failed", exc_info=True)
            self._died(f"the scheduler thread failed: {exc!r}")
        finally:
            self._steps.close()

    def _died(self, cause: str) -> None:
        """The engine has failed: refuse new requests, end every one held with ``cause``, end the thread."""
        self._liveness.died(cause)
        with self._lock:
            self._closed = True
        self._drain_inbox()
        self._out.fail_everything(EngineFailed(cause))
        self._out.flush()

    def _serve_once(self) -> bool:
        if self._liveness.cause is not None:  # a step ran past the stall timeout, and was seen to: failed for good
            self._died(self._liveness.cause)
            return False
        if not self._waiting and not self._active():
            self._handle(self._inbox.wait())
            self._liveness.progressed()
        self._drain_inbox()
        if self._stopping:
            self._out.fail_everything(EngineClosed("the engine was closed before this request finished"))
            self._out.flush()
            return False
        self._admission.admit()
        self._take_sampled()
        if self._active() and not self._steps.run() and self._await_offthread():
            self._liveness.progressed()  # a grammar token: no decode, yet the requests moved on
        self._out.flush()
        return True

    def _await_offthread(self) -> bool:
        """Every active slot awaits a token from the grammar worker, or its prompt's scores from the
        scoring worker: hand over what is held, then block."""
        self._cadence.urgent()
        self._out.flush()
        return self._offthread.wait(self._slots, PENDING_WAIT_SECONDS)

    def _take_sampled(self) -> None:
        """Tokens sampled off the thread (grammar requests, ``offthread.py``) since the last step,
        and prompts' scores made off the thread, with the first token held for them (``scoring.py``)."""
        generated = 0
        for slot, result in self._offthread.ready(self._slots):
            if isinstance(result, BaseException):
                error = result if isinstance(result, EngineError) else EngineError(f"sampling this request's grammar failed: {result}")
                self._out.end_slot(slot, Finish(None, slot.usage(), error))
            elif isinstance(result, Scored):
                generated += self._out.scored(slot, result)
            else:
                generated += self._out.token(slot, result)
        self._counters.add(completion_tokens_total=generated)

    def _drain_inbox(self) -> None:
        for message in self._inbox.drain():
            self._handle(message)

    def _handle(self, message: Message) -> None:
        if isinstance(message, Submit):
            self._waiting.append(message.task)
        elif isinstance(message, Cancel):
            self._cancel(message.task_id)
        else:
            self._stopping = True

    def _cancel(self, task_id: str) -> None:
        for slot in self._slots:
            if slot.task is not None and slot.task.id == task_id:
                self._out.end_slot(slot, Finish("cancelled", slot.usage()))
                return
        for task in self._waiting:
            if task.id == task_id:
                self._waiting.remove(task)
                self._out.end_waiting(task, "cancelled")
                return

    def _active(self) -> list[Slot]:
        return [slot for slot in self._slots if slot.task is not None]
