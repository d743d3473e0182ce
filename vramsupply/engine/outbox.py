"""What the scheduler thread hands the buyers: each token's text, each request's end, and the
hand-over of a step's events to the consumer event loops.

Apart from ``scheduler.py`` because it is the one concern that does not steer the decode: it turns
what a step sampled into ``Event``s (``generation.py``), frees the slot of a request that ended,
and, at the pace ``cadence.py`` sets, posts the held events with one ``call_soon_threadsafe`` per
loop. Every method runs on the scheduler thread.
"""

from __future__ import annotations

import time
from collections import deque

import llama_cpp

from . import backend_sampling
from .cadence import Cadence
from .counters import Counters
from .generation import Event, Finish, post, post_prompt_scores
from .logprobs import TokenLogprob
from .model import Model
from .preempt import KvPressure
from .scoring import Scored
from .slots import Slot, Tally, Task
from .types import EngineError


class Outbox:
    """The events of the steps since the last hand-over, and the endings that free slots."""

    def __init__(
        self, ctx: llama_cpp.llama_context_p, model: Model, counters: Counters, kv: KvPressure, cadence: Cadence,
        slots: list[Slot], waiting: deque[Task],
    ) -> None:
        self._ctx = ctx
        self._model = model
        self._counters = counters
        self._kv = kv
        self._cadence = cadence
        self._slots = slots
        self._waiting = waiting
        self._events: list[Event] = []

    def token(self, slot: Slot, token: int, logprob: TokenLogprob | None = None) -> int:
        """Stream one sampled token; returns how many completion tokens it counts for (1: every
        sampled token counts, an end-of-generation one too)."""
        task = slot.task
        if token in self._model.eog_tokens:
            return self._end_token(slot, logprob)
        if task.stop_ids and token in task.stop_ids:
            return self._stop_token(slot, token, logprob)
        slot.completion_tokens += 1
        if not task.tally.counted:
            self._count(task.tally)
        if task.first_token_at is None:
            task.first_token_at = time.monotonic()
        delta = slot.stream.push(self._model.piece(token, token in task.preserve), slot.completion_tokens >= task.min_tokens)
        if not task.spoke:  # until its first text is out (its buyer's TTFT), every token goes at once:
            self._cadence.urgent()  # a first token's text may be held back (half a character, a stop string's start)
            task.spoke = bool(delta.text)
        if delta.stopped:
            self.end_slot(slot, Finish("stop", slot.usage()), text=delta.text, token=token, logprob=logprob)
        elif slot.completion_tokens >= task.max_completion:
            text = delta.text + slot.stream.finish()
            self.end_slot(slot, Finish("length", slot.usage()), text=text, token=token, logprob=logprob)
        else:
            slot.next_token = token
            self._events.append(Event(task.channel, delta.text, token, None, logprob))
        return 1

    def scored(self, slot: Slot, scored: Scored) -> int:
        """A scored prompt's scores are all in (``scoring.py``): they go to its buyer now, ahead of
        the first token held back for them, which goes on as any token; with no token
        (``max_tokens`` 0) the request ends, its usage counting the prompt."""
        assert slot.task is not None
        post_prompt_scores(slot.task.channel, scored.scores)
        if scored.token is None:
            self.end_slot(slot, Finish("length", slot.usage()))
            return 0
        return self.token(slot, scored.token, scored.logprob)

    def _end_token(self, slot: Slot, logprob: TokenLogprob | None) -> int:
        """An end-of-generation token: it counts (the model decoded it: vLLM's usage and
        llama-server's ``tokens_predicted`` count it too) and has its logprobs entry, last, which
        evaluation tools read as the generated token; it adds no text, and no id to the token ids
        (``Generation.token_ids``: they are the tokens that brought the text)."""
        self._counted(slot)
        self.end_slot(slot, Finish("stop", slot.usage()), text=slot.stream.finish(), logprob=logprob)
        return 1

    def _stop_token(self, slot: Slot, token: int, logprob: TokenLogprob | None) -> int:
        """One of the request's ``stop_token_ids``: it counts (the model generated it) and ends the
        request as a stop string does, its text kept only with ``keep_stop_token``."""
        task = slot.task
        self._counted(slot)
        text = ""
        if task.keep_stop_token:
            delta = slot.stream.push(self._model.piece(token, token in task.preserve))
            text = delta.text
            if delta.stopped:  # the token's text itself ended a stop string
                self.end_slot(slot, Finish("stop", slot.usage()), text=text, token=token, logprob=logprob)
                return 1
        self.end_slot(slot, Finish("stop", slot.usage()), text=text + slot.stream.finish(), token=token, logprob=logprob)
        return 1

    def _counted(self, slot: Slot) -> None:
        """A token that ends the request counts as a generated one (``token`` inlines this)."""
        task = slot.task
        slot.completion_tokens += 1
        if not task.tally.counted:
            self._count(task.tally)
        if task.first_token_at is None:
            task.first_token_at = time.monotonic()

    def end_slot(
        self, slot: Slot, finish: Finish, text: str = "", token: int | None = None, logprob: TokenLogprob | None = None
    ) -> None:
        if slot.backend_sampled:
            backend_sampling.detach(self._ctx, slot.seq_id)  # before release frees the chain
            slot.backend_sampled = False
        task = slot.release()
        self._kv.held = False  # room in the KV cache again: paused requests may resume
        self._cadence.urgent()
        self._events.append(Event(task.channel, text, token, finish, logprob))
        self._settle(task, finish)  # before the request stops counting as outstanding
        self._counters.add(busy=-1, outstanding=-1)

    def end_waiting(self, task: Task, reason: str | None, error: EngineError | None = None) -> None:
        """End a request waiting for a slot (or paused, ``preempt.py``) with its usage so far."""
        task.sampler.close()
        self._cadence.urgent()
        finish = Finish(reason, task.usage_while_waiting(), error)
        self._events.append(Event(task.channel, "", None, finish))
        self._settle(task, finish)
        self._counters.add(outstanding=-1)

    def _settle(self, task: Task, finish: Finish) -> None:
        """A request that ended without a token counts its prompt now, unless its buyer got only an error (``Tally``)."""
        if task.tally.ended(finish.error is not None):
            self._count(task.tally)

    def _count(self, tally: Tally) -> None:
        tally.counted = True
        self._counters.add(prompt_tokens_total=tally.prompt_tokens, cached_tokens_total=tally.cached_tokens)

    def fail_everything(self, error: EngineError) -> None:
        for slot in self._slots:
            if slot.task is not None:
                self.end_slot(slot, Finish(None, slot.usage(), error))
        while self._waiting:
            self.end_waiting(self._waiting.popleft(), None, error)

    def flush(self) -> None:
        """One ``call_soon_threadsafe`` per consumer loop, carrying all its events, when one is due."""
        now = time.perf_counter()
        if self._events and self._cadence.due(now):
            self._cadence.handed_over(now)
            events, self._events = self._events, []
            for loop in post(events):
                self._abandon(loop)

    def _abandon(self, loop: object) -> None:
        """A consumer's event loop is closed: nobody can read its requests, so cancel them."""
        for slot in self._slots:
            if slot.task is not None and slot.task.channel.loop is loop:
                self.end_slot(slot, Finish("cancelled", slot.usage()))
        for task in [t for t in self._waiting if t.channel.loop is loop]:
            self._waiting.remove(task)
            self.end_waiting(task, "cancelled")
