"""A save is timed by what the copy costs, not by the time slices another process took meanwhile.

On a loaded machine the scheduler thread is now and then preempted in the middle of a 0.3 ms copy
and gets its CPU back tens of ms later. Timed by the wall clock alone, one such save made every
copy look dearer than prefilling again, and the paused requests were then prefilled again
(``engine/save_policy.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vramsupply.engine import save_policy
from vramsupply.engine.save_policy import SavePolicy, run_queue_seconds

PREFILL_PER_TOKEN = 60e-6  # the tiny test model on the 2-core test VM
COPY_PER_TOKEN = 3e-6


class Seconds:
    """A clock as a test sets it: the wall clock, or the scheduler thread's seconds waiting for a CPU."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def a_policy() -> tuple[SavePolicy, Seconds, Seconds]:
    """A policy on the test's clocks, with the test model's prefill cost."""
    run_queue, wall = Seconds(), Seconds()
    return SavePolicy(prefill_seconds=lambda n: PREFILL_PER_TOKEN * n, waited=run_queue, clock=wall), run_queue, wall


def test_a_save_preempted_by_another_process_does_not_make_a_paused_requests_copy_look_dearer_than_its_prefill() -> None:
    policy, run_queue, wall = a_policy()
    assert policy.worth_saving(127, certain=True)  # nothing timed yet
    with policy.timed(127):
        run_queue.seconds += 0.068  # another process held the CPU in the middle of the copy
        wall.seconds += 0.068 + COPY_PER_TOKEN * 127

    assert policy.worth_saving(116, certain=True)  # wall clock alone: 160 µs a token, 19 ms against 7


def test_a_save_that_is_really_slow_still_counts() -> None:
    policy, _, wall = a_policy()
    assert policy.worth_saving(127, certain=True)
    with policy.timed(127):
        wall.seconds += 10 * PREFILL_PER_TOKEN * 127  # on the CPU all along: the copy itself is slow

    assert not policy.worth_saving(116, certain=True)


def test_the_time_waited_before_the_save_is_not_taken_off_it() -> None:
    policy, run_queue, wall = a_policy()
    run_queue.seconds = 5.0  # waits of the thread's past
    assert policy.worth_saving(127, certain=True)
    with policy.timed(127):
        wall.seconds += 10 * PREFILL_PER_TOKEN * 127

    assert not policy.worth_saving(116, certain=True)


def test_the_thread_s_wait_for_a_cpu_is_the_second_field_of_its_schedstat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    schedstat = tmp_path / "schedstat"
    schedstat.write_text("912345678 4500000000 7\n")  # on a CPU, waiting for one, time slices (ns)
    monkeypatch.setattr(save_policy, "SCHEDSTAT", str(schedstat))
    assert run_queue_seconds() == 4.5

    monkeypatch.setattr(save_policy, "SCHEDSTAT", str(tmp_path / "missing"))  # not Linux: the wall clock alone
    assert run_queue_seconds() == 0.0


def test_one_slow_save_does_not_stop_saving_for_good_but_copies_that_stay_slow_do() -> None:
    """Skipped saves are not timed, so an outlier that lifted the estimate past the prefill's cost
    once turned saving off for the rest of the process."""
    policy, _, _ = a_policy()
    for _ in range(5):
        assert policy.worth_saving(100, certain=True)
        policy.saved(100, COPY_PER_TOKEN * 100)
    policy.saved(100, 100 * PREFILL_PER_TOKEN * 100)  # one save 100 times slower, on the CPU all along
    assert policy.worth_saving(100, certain=True)

    slow_saves = 0
    while policy.worth_saving(100, certain=True) and slow_saves < 10:  # they stay that slow
        policy.saved(100, 100 * PREFILL_PER_TOKEN * 100)
        slow_saves += 1
    assert slow_saves < 10, "saving stops after a few"


def test_a_copy_that_fails_is_timed_all_the_same() -> None:
    """Every stream waited for it either way."""
    policy, _, wall = a_policy()
    with pytest.raises(MemoryError), policy.timed(127):
        wall.seconds += 10 * PREFILL_PER_TOKEN * 127
        raise MemoryError

    assert not policy.worth_saving(116, certain=True)
