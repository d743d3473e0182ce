"""Asking the Hub about several repos at once, and about each repo once.

Weighing every quant (`vramsupply plan`, serve's memory check) needs the file listing of up to
MAX_CANDIDATES_CHECKED repos. huggingface_hub's calls block, and each `model_info` takes 0.2–1 s
on a real connection: asked one after another they add up to seconds spent waiting on calls that
do not depend on each other. `ask_together` runs them on a few threads and hands back one
`Answer` per repo, in the order asked, holding what the call returned or raised: the caller then
handles them one by one, in rank order, exactly as it handled the calls made one by one.

The threads are daemons, and nothing joins them: Ctrl-C during a plan ends the command at once,
not after the calls still waiting on a slow Hub (each call's own timeout ends it).

`AskedOnce` keeps the Resolver's promise of asking about each repo once, now that two threads
may want the same repo at the same time: the second waits for the first's answer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

# Enough for every candidate repo a plan weighs (MAX_CANDIDATES_CHECKED) to be asked at once.
MAX_PARALLEL_ASKS = 8


class Answer(Generic[V]):
    """What one call returned, or the exception it raised; `result()` waits for it."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: V | None = None
        self._error: BaseException | None = None

    @classmethod
    def of(cls, call: Callable[[], V]) -> Answer[V]:
        answer: Answer[V] = cls()
        answer.settle(call)
        return answer

    def settle(self, call: Callable[[], V]) -> None:
        try:
            self._value = call()
        except BaseException as exc:  # handed to whoever reads the answer, as the call would have raised it
            self._error = exc
        finally:
            self._done.set()

    @property
    def failed(self) -> bool:
        return self._done.is_set() and self._error is not None

    def result(self) -> V:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def ask_one_by_one(ask: Callable[[K], V], keys: Iterable[K]) -> Iterator[Answer[V]]:
    """Each key asked only when its answer is wanted: for a search that stops at the first fit."""
    for key in keys:
        yield Answer.of(partial(ask, key))


def ask_together(ask: Callable[[K], V], keys: Sequence[K], limit: int = MAX_PARALLEL_ASKS) -> list[Answer[V]]:
    """Every key asked at once, on at most `limit` threads; the answers in the order of `keys`."""
    answers: list[Answer[V]] = [Answer() for _ in keys]
    work: queue.SimpleQueue[tuple[Answer[V], K]] = queue.SimpleQueue()
    for answer, key in zip(answers, keys):
        work.put((answer, key))

    def worker() -> None:
        while True:
            try:
                answer, key = work.get_nowait()
            except queue.Empty:
                return
            answer.settle(partial(ask, key))

    for _ in range(min(limit, len(answers))):
        threading.Thread(target=worker, name="vramsupply-hub-ask", daemon=True).start()
    return answers


class AskedOnce(Generic[K, V]):
    """`get(key)` calls `ask(key)` once per key however many threads want it at once: the others
    wait for that answer. An answer is kept; an exception is raised to every thread waiting for it
    and then forgotten, so that a later `get` asks again (as before the calls ran in parallel)."""

    def __init__(self, ask: Callable[[K], V]) -> None:
        self._ask = ask
        self._answers: dict[K, Answer[V]] = {}
        self._lock = threading.Lock()

    def get(self, key: K) -> V:
        with self._lock:
            answer = self._answers.get(key)
            asking = answer is None
            if answer is None:
                answer = self._answers[key] = Answer()
        if asking:
            answer.settle(partial(self._ask, key))
            if answer.failed:
                with self._lock:
                    del self._answers[key]
        return answer.result()
