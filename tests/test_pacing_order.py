"""The prompt that can still answer soonest goes first: the order prompts are prefilled in, which
whole prompts join a step, and who takes a freed slot."""

from __future__ import annotations

import time
from itertools import count

import numpy as np
from test_pacing import chunk, learn, prefilling

from vramsupply.engine.pacing import MAX_DEFER_SECONDS, MIN_CHUNK, STEP_TARGET_SECONDS, TTFT_TARGET_SECONDS, PrefillPacer, StepWork
from vramsupply.engine.slots import Resume, Slot, Task


def test_prompts_that_can_still_answer_within_the_target_go_oldest_first() -> None:
    pacer = PrefillPacer(512)
    learn(pacer, 0.001)  # 1 ms a prompt token
    now = 100.0
    old_long = prefilling(0, 600, arrived=now - 0.1)
    new_short = prefilling(1, 200, arrived=now)
    oldest = prefilling(2, 900, arrived=now - 0.2, done=800)
    assert pacer.prefill_order([old_long, new_short, oldest], now) == [oldest, old_long, new_short]


def test_prompts_that_can_no_longer_make_the_target_follow_oldest_first_and_a_resumed_one_leads() -> None:
    pacer = PrefillPacer(512)
    learn(pacer, 0.001)
    now = 100.0
    too_long = prefilling(0, 1500, arrived=now - 0.1)  # 1.5 s of prefill: cannot answer within 1 s
    waited = prefilling(1, 10, arrived=now - TTFT_TARGET_SECONDS - 0.5)  # short, but its buyer already waited too long
    feasible = prefilling(2, 500, arrived=now)
    resumed = prefilling(3, 1800, arrived=now - 0.05, resuming=True)
    order = pacer.prefill_order([too_long, waited, feasible, resumed], now)
    assert order == [resumed, feasible, waited, too_long]


def test_a_step_plans_generating_slots_first_and_ends_with_the_first_prompt_it_finishes() -> None:
    pacer = PrefillPacer(512)
    learn(pacer, 0.001)  # 1 ms a prompt token: 180 per step while anyone generates
    now = time.monotonic()
    generating = prefilling(0, 10, arrived=now - 5, done=10)
    generating.next_token = 42
    long = prefilling(1, 900, arrived=now - 0.1)
    short = prefilling(2, 60, arrived=now)
    later = prefilling(3, 80, arrived=now)
    plan = pacer.plan([generating, long, short, later], capacity=2048, memory=None)
    assert [(slot.seq_id, None if chunk is None else len(chunk)) for slot, chunk in plan] == [(0, None), (2, 60)]

    short.n_cached = 60
    plan = pacer.plan([generating, long, short, later], capacity=2048, memory=None)
    assert [(slot.seq_id, None if chunk is None else len(chunk)) for slot, chunk in plan] == [(0, None), (3, 80)]


def test_short_prompts_that_arrive_together_start_together_within_the_step_target() -> None:
    """Sixteen buyers' 5-token questions at once: one a step made the 16th wait 16 steps (0.4 s at
    c=16). A step in which a prompt ends also takes whole prompts that end with it, up to what the
    step cost so far; a prompt that would not end there never joins it."""
    pacer = PrefillPacer(512)
    learn(pacer, 0.001)  # 1 ms a prompt token beside streams
    pacer.observe(StepWork(0, 0.0, True), 0.020)  # the generating rows: 20 ms a step
    now = time.monotonic()
    generating = prefilling(0, 10, arrived=now - 5, done=10)
    generating.next_token = 42
    questions = [prefilling(i, 5, arrived=now + i * 1e-3) for i in range(1, 17)]
    long = prefilling(17, 900, arrived=now + 2e-3 + 1e-4)  # between the 2nd and 3rd question
    plan = pacer.plan([generating, long, *questions], capacity=2048, memory=None)

    started = [(slot.seq_id, len(chunk)) for slot, chunk in plan if chunk is not None]
    assert started == [(i, 5) for i in range(1, 12)], "the first, then 10 more of 5 ms within 50 ms (more than its 25)"
    assert 0.020 + 0.001 * sum(size for _, size in started) <= STEP_TARGET_SECONDS
    assert all(slot is not long for slot, _ in plan)


def test_short_prompts_that_arrive_together_at_an_idle_engine_start_in_one_step() -> None:
    """Before any prefill speed is known, a step's rows bound it: a whole micro-batch with nobody
    generating; beside a stream MIN_CHUNK, and whole prompts ending with the first get at least
    MIN_CHUNK - 1 rows after it, so that the step has enough prompt rows to learn the speed from.
    Before, the first prompt went alone, and a burst of 16 started one a step, the 16th after
    0.4-0.6 s; then, beside a stream, 9-token prompts still went one a step and never taught it."""
    now = time.monotonic()
    questions = [prefilling(i, 5, arrived=now + i * 1e-3) for i in range(16)]
    plan = PrefillPacer(512).plan(questions, capacity=2048, memory=None)
    assert [(slot.seq_id, len(chunk)) for slot, chunk in plan if chunk is not None] == [(i, 5) for i in range(16)]

    generating = prefilling(16, 10, arrived=now - 5, done=10)
    generating.next_token = 42
    pacer = PrefillPacer(512)
    plan = pacer.plan([generating, *questions], capacity=2048, memory=None)
    assert [(slot.seq_id, None if chunk is None else len(chunk)) for slot, chunk in plan] == [(16, None), (0, 5), (1, 5), (2, 5), (3, 5)]
    assert chunk(pacer, generating=True) == MIN_CHUNK, "nothing known beside a stream yet"
    pacer.observe(pacer.step_work(plan), 0.040)
    assert chunk(pacer, generating=True) > MIN_CHUNK, "20 prompt rows taught the speed beside a stream: chunks are sized by it"

    pacer = PrefillPacer(512)
    learn(pacer, 0.001, paced=False)  # known now: with nobody generating, 1 ms a token
    plan = pacer.plan(questions, capacity=2048, memory=None)
    assert len(plan) == 11, "the first (5 ms), then 10 more within 50 ms"


FIRST_TOKENS = count(10_000, 10_000)


def waiting(prompt_tokens: int, arrived: float, resumed: bool = False) -> Task:
    first = next(FIRST_TOKENS)  # no two requests share a prefix
    task = Task("w", np.arange(first, first + prompt_tokens, dtype=np.int32), None, 8, None, None, arrived=arrived)  # type: ignore[arg-type]
    if resumed:
        task.resume = Resume(task.prompt, 5, 3, 0, None)  # type: ignore[arg-type]
    return task


def test_a_freed_slot_goes_to_the_oldest_request_that_can_still_answer_in_time_counting_what_is_cached() -> None:
    pacer = PrefillPacer(512)
    learn(pacer, 0.001)  # 1 ms a prompt token
    now = time.monotonic()
    idle = Slot(0, 4096)
    stale = waiting(50, arrived=now - 2.0)  # already missed the target
    returning = waiting(1500, arrived=now - 0.2)  # 1.5 s to prefill, but 1400 of it is in the idle slot
    idle.record(returning.prompt[:1400])
    fresh = waiting(600, arrived=now)
    assert pacer.admission_order([stale, fresh, returning], [idle], cache=None) == [(False, returning), (False, fresh), (False, stale)]
    assert pacer.admission_order([stale, fresh, returning], [Slot(1, 4096)], cache=None) == [(False, fresh), (False, stale), (False, returning)]


def test_a_paused_request_or_one_deferred_too_long_takes_the_slot_first() -> None:
    pacer = PrefillPacer(512)
    learn(pacer, 0.001)
    now = time.monotonic()
    idle = [Slot(0, 4096)]
    fresh = waiting(10, arrived=now)
    deferred = waiting(1500, arrived=now - MAX_DEFER_SECONDS - 1)
    paused = waiting(1800, arrived=now - 1, resumed=True)
    assert pacer.admission_order([fresh, deferred, paused], idle, cache=None) == [(True, deferred), (True, paused), (False, fresh)]


def test_whether_a_prompt_can_still_make_it_is_judged_at_the_speed_it_will_be_prefilled() -> None:
    pacer = PrefillPacer(512)
    learn(pacer, 0.001, paced=False, tokens=512)  # 1 ms a token alone
    learn(pacer, 0.003)  # 3 ms a token beside a stream
    now = 100.0
    older = prefilling(0, 600, arrived=now - 0.3)  # alone: 0.9 s in all; beside a stream: 2.1 s
    newer = prefilling(1, 100, arrived=now)
    assert pacer.prefill_order([newer, older], now, paced=False) == [older, newer]
    assert pacer.prefill_order([newer, older], now, paced=True) == [newer, older]


def test_a_chunk_stops_where_the_prompt_gets_its_checkpoint_and_such_a_prompt_joins_no_step_it_cannot_end() -> None:
    """A recurrent model's prompt is checkpointed a few tokens before its end (checkpoints.py): no
    chunk runs past that point, and until the checkpoint is made the prompt is no companion."""
    now = time.monotonic()
    long = prefilling(0, 300, arrived=now)
    long.checkpoints_due = [296]
    pacer = PrefillPacer(512)
    learn(pacer, 0.0001, paced=False, tokens=512)  # a fast machine: the micro-batch bounds the step
    plan = pacer.plan([long], capacity=2048, memory=None)
    assert [len(chunk) for _, chunk in plan] == [296]

    long.n_cached = 296  # checkpointed: the last 4 tokens go on, and whole prompts may join them
    long.checkpoints_due = []
    other = prefilling(1, 100, arrived=now + 1e-3)
    other.checkpoints_due = [96]
    short = prefilling(2, 5, arrived=now + 2e-3)
    plan = PrefillPacer(512).plan([long, other, short], capacity=2048, memory=None)
    assert [(slot.seq_id, len(chunk)) for slot, chunk in plan] == [(0, 4), (2, 5)]


def test_a_step_never_plans_more_rows_than_a_small_batch_holds() -> None:
    """With --n-batch as small as the slots (4 here), the rows whole prompts get to teach the
    speed (MIN_CHUNK - 1 after the first) must still fit the batch: before, a stream and 4-token
    questions planned 10 rows for 4, and the scheduler thread died filling the batch."""
    now = time.monotonic()
    generating = prefilling(3, 10, arrived=now - 5, done=10)
    generating.next_token = 42
    questions = [prefilling(i, 2, arrived=now + i * 1e-3) for i in range(3)]
    for capacity in (4, 5, 8):
        plan = PrefillPacer(512).plan([generating, *questions], capacity=capacity, memory=None)
        rows = sum(1 if chunk is None else len(chunk) for _, chunk in plan)
        assert rows <= capacity and plan[0] == (generating, None), (capacity, plan)
        assert [(slot.seq_id, len(chunk)) for slot, chunk in plan[1:] if chunk is not None] == [(i, 2) for i in range(min(3, (capacity - 1) // 2))]
