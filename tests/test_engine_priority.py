"""The decode gives way to the event loop: its threads run at a lower CPU priority (``engine/priority.py``)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import TINY_MODEL
from vramsupply.config.settings import DEFAULT_DECODE_NICE
from vramsupply.engine import Engine, EngineOptions, GenerationRequest, SamplingParams, priority
from vramsupply.engine.priority import MAX_NICE, lower_compute_priority

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="only Linux keeps a nice value per thread")

COMPUTE_NICE_OFFSET = 10
"""The engine's default offset: the suite sets it to 0 (``conftest.isolated_env``), these tests test it."""


@pytest.fixture(autouse=True)
def the_default_offset(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(priority, "COMPUTE_NICE_OFFSET", COMPUTE_NICE_OFFSET)


def nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def refuse(*_args: object) -> None:
    raise PermissionError(1, "Operation not permitted")


def in_a_thread(function: Callable[..., object], *args: object) -> object:
    """Run ``function`` in a thread of its own, so the test's thread keeps its priority."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(function(*args)))
    thread.start()
    thread.join()
    return result[0]


def threads_at(nice: int) -> set[int]:
    return {int(task.name) for task in Path("/proc/self/task").iterdir() if _nice_or_none(int(task.name)) == nice}


def schedulers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "vramsupply-scheduler"}


def _nice_or_none(tid: int) -> int | None:
    try:
        return nice_of(tid)
    except OSError:  # the thread ended meanwhile
        return None


async def test_the_decode_threads_run_below_the_event_loop() -> None:
    """A provider on a 2-core machine: the decode's threads, and only they, sit 10 nice levels down."""
    base = nice_of(threading.get_native_id())
    lowered = min(base + COMPUTE_NICE_OFFSET, MAX_NICE)
    before, others = threads_at(lowered), schedulers()
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=2, threads=2)) as engine:
        generation = engine.submit(GenerationRequest(engine.tokenize("Once upon a time"), sampling=SamplingParams(temperature=0), max_tokens=8))
        await generation.collect()
        assert generation.token_ids
        (scheduler,) = schedulers() - others
        assert nice_of(scheduler.native_id) == lowered
        assert nice_of(threading.get_native_id()) == base  # the event loop keeps its priority
        # the decode's second thread was started by the scheduler thread, and inherited its priority
        assert len(threads_at(lowered) - before - {scheduler.native_id}) >= 1


def test_the_offset_stops_at_the_lowest_priority() -> None:
    assert in_a_thread(lower_compute_priority, 30) == MAX_NICE


def test_a_kernel_that_refuses_leaves_the_priority_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "setpriority", refuse)
    assert in_a_thread(lower_compute_priority) is None


async def test_an_engine_serves_where_the_kernel_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "setpriority", refuse)
    base, others = nice_of(threading.get_native_id()), schedulers()
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=1, threads=1)) as engine:
        generation = engine.submit(GenerationRequest(engine.tokenize("The dog"), sampling=SamplingParams(temperature=0), max_tokens=4))
        await generation.collect()
        assert len(generation.token_ids) == 4
        (scheduler,) = schedulers() - others
        assert nice_of(scheduler.native_id) == base


def test_the_settings_default_is_the_engines() -> None:
    assert DEFAULT_DECODE_NICE == COMPUTE_NICE_OFFSET


def test_no_offset_asks_nothing_of_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """``decode_nice`` 0: the decode stays at the agent's priority, and no ``setpriority`` is made
    (not even a harmless one, which a sandbox may log or refuse)."""
    calls: list[object] = []
    monkeypatch.setattr(os, "setpriority", lambda *args: calls.append(args))
    assert in_a_thread(lower_compute_priority, 0) is None
    monkeypatch.setattr(priority, "COMPUTE_NICE_OFFSET", 0)
    assert in_a_thread(lower_compute_priority) is None
    assert calls == []


def test_the_default_offset_is_read_when_called_not_when_defined(monkeypatch: pytest.MonkeyPatch) -> None:
    base = nice_of(threading.get_native_id())
    monkeypatch.setattr(priority, "COMPUTE_NICE_OFFSET", 3)
    lowered = in_a_thread(lower_compute_priority)
    if lowered is None:
        pytest.skip("the kernel refuses setpriority here")
    assert lowered == min(base + 3, MAX_NICE)


async def test_an_engine_with_decode_nice_lowers_its_decode_that_far() -> None:
    if in_a_thread(lower_compute_priority, 1) is None:
        pytest.skip("the kernel refuses setpriority here")
    base, others = nice_of(threading.get_native_id()), schedulers()
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=1, threads=1, decode_nice=3)) as engine:
        generation = engine.submit(GenerationRequest(engine.tokenize("The dog"), sampling=SamplingParams(temperature=0), max_tokens=4))
        await generation.collect()
        (scheduler,) = schedulers() - others
        assert nice_of(scheduler.native_id) == min(base + 3, MAX_NICE)
