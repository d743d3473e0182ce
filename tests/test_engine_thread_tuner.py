"""A provider's machine gets busy with other work, and frees up again (``engine/thread_tuner.py``).

The tuner is driven here by a simulated two-core machine whose step times are the ones measured on
the bench VM (a one-stream step of the bench model: 4.2 ms with two threads and 5.5 ms with one
alone; 330 ms and 6 ms beside one busy program), and by a sixteen-core model that was never
measured. Then a real engine switches its threads between steps, and its answers stay the same.
"""

from __future__ import annotations

import re

import asyncio
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import pytest

from conftest import TINY_MODEL
from vramsupply.engine import Engine, EngineOptions, GenerationRequest, SamplingParams
from vramsupply.engine.thread_measure import CpuClock
from vramsupply.engine.thread_tuner import ThreadTuner

ALONE = {2: 0.0042, 1: 0.0055}
BESIDE_A_BUSY_PROGRAM = {2: 0.33, 1: 0.006}


@dataclass
class TwoCoreMachine:
    """Step times, this process's CPU time and the cores' idle time, on a simulated clock."""

    busy_programs: int = 0
    now: float = 0.0
    cpu: float = 0.0
    idle: float = 0.0
    idle_known: bool = True
    count = 2

    def step(self, threads: int, rows: int = 1) -> float:
        seconds = (BESIDE_A_BUSY_PROGRAM if self.busy_programs else ALONE)[threads] * rows  # a model: linear in rows
        got = threads if not self.busy_programs else min(threads, 2 - self.busy_programs) * 0.9
        self.now += seconds
        self.cpu += seconds * got
        self.idle += seconds * max(2 - self.busy_programs - threads, 0)
        return seconds

    def process_seconds(self) -> float:
        return self.cpu

    def idle_seconds(self) -> float | None:
        return self.idle if self.idle_known else None


@dataclass
class SixteenCoreMachine(TwoCoreMachine):
    """A model, not a measurement: a step of 16 threads takes 10 ms, fewer take longer (to the
    power 0.7), and a thread without a core of its own stalls every barrier (40 times longer)."""

    count = 16

    def step(self, threads: int, rows: int = 1) -> float:
        free = self.count - self.busy_programs
        seconds = 0.010 * (16 / threads) ** 0.7
        got = float(threads)
        if threads > free:
            seconds *= 40
            got = free + 0.5  # the threads spin at each barrier; one shares a core with a busy program
        self.now += seconds
        self.cpu += seconds * got
        self.idle += seconds * max(free - threads, 0)
        return seconds


def tuner_on(machine: TwoCoreMachine) -> ThreadTuner:
    return ThreadTuner(machine.count, clock=lambda: machine.now, cpu=machine)  # type: ignore[arg-type]


def serve_for(tuner: ThreadTuner, machine: TwoCoreMachine, seconds: float, prompt_rows: int = 0) -> list[int]:
    """Decode one stream (or, with ``prompt_rows``, prompt chunks of that many rows beside it) for
    ``seconds`` of the machine's time; the threads of every step."""
    used = []
    end = machine.now + seconds
    while machine.now < end:
        threads = tuner.threads_for_step(prompt_rows > 0)
        tuner.observe(threads, 1 + prompt_rows, machine.step(threads, 1 + prompt_rows), prompt_rows)
        used.append(threads)
    return used


def test_alone_the_decode_keeps_every_core_and_its_probes_cost_almost_nothing() -> None:
    machine = TwoCoreMachine()
    tuner = tuner_on(machine)
    used = serve_for(tuner, machine, 60)
    assert tuner.current == 2
    assert 0 < used.count(1) <= 8 * 3  # probes of three steps, at 1, 2, 4, 8 s apart, then every 16 s
    lost = used.count(1) * (ALONE[1] - ALONE[2])
    assert lost / 60 < 0.001  # under a thousandth of the decode's time


def test_a_busy_program_takes_a_core_and_the_decode_drops_to_one_thread_within_a_second() -> None:
    machine = TwoCoreMachine()
    tuner = tuner_on(machine)
    serve_for(tuner, machine, 30)  # long enough for the timer to back off to its longest wait
    machine.busy_programs = 1
    serve_for(tuner, machine, 1.0)
    assert tuner.current == 1
    later = serve_for(tuner, machine, 60)
    assert later.count(2) == 0  # no core is idle: two threads are never tried again meanwhile


def test_once_the_program_ends_the_decode_takes_both_cores_again() -> None:
    machine = TwoCoreMachine(busy_programs=1)
    tuner = tuner_on(machine)
    serve_for(tuner, machine, 5)
    assert tuner.current == 1
    machine.busy_programs = 0
    serve_for(tuner, machine, 2.5)
    assert tuner.current == 2


def test_a_core_left_idle_between_requests_is_not_taken_for_room_to_grow() -> None:
    machine = TwoCoreMachine(busy_programs=1)
    tuner = tuner_on(machine)
    serve_for(tuner, machine, 2)
    assert tuner.current == 1
    used = []
    for _ in range(30):  # a request now and then; between them the busy program's core is the only one used
        used += serve_for(tuner, machine, 0.5)
        machine.now += 5
        machine.idle += 5
    assert used.count(2) == 0


@pytest.mark.parametrize("busy_programs", [1, 4])
def test_on_sixteen_cores_the_decode_gives_up_only_the_cores_other_programs_took(busy_programs: int) -> None:
    machine = SixteenCoreMachine()
    tuner = tuner_on(machine)
    serve_for(tuner, machine, 30)
    assert tuner.current == 16
    machine.busy_programs = busy_programs  # the threads spin at the barriers: they still get their CPU time
    serve_for(tuner, machine, 1.5)
    assert tuner.current == 16 - busy_programs  # not half of them, and without waiting for the timer
    machine.busy_programs = 0
    serve_for(tuner, machine, 5)
    assert tuner.current == 16


def test_where_idle_time_is_unknown_more_threads_are_tried_rarely_and_given_up_after_one_step() -> None:
    machine = TwoCoreMachine(busy_programs=1, idle_known=False)
    tuner = tuner_on(machine)
    serve_for(tuner, machine, 2)
    assert tuner.current == 1
    used = serve_for(tuner, machine, 120)
    assert tuner.current == 1
    assert 1 <= used.count(2) <= 7  # one step a try, the tries backing off to one a minute


def test_under_a_long_prompt_steps_that_carry_prompt_tokens_are_compared_with_each_other() -> None:
    """In the marketplace bench beside a busy program nearly every step carried a prompt chunk; a
    first version compared only steps without one, and never switched."""
    machine = TwoCoreMachine()
    tuner = tuner_on(machine)
    serve_for(tuner, machine, 5, prompt_rows=63)
    machine.busy_programs = 1
    serve_for(tuner, machine, 40, prompt_rows=63)  # a slow step of 64 rows takes 21 s here
    assert tuner.current == 1


def test_alone_a_probe_for_fewer_threads_never_takes_a_step_that_carries_a_prompt() -> None:
    """On a quiet machine such a step with half the threads took twice as long: beside a 4,000-token
    prompt, a 0.21 s step became 0.35 s, a gap over the 250 ms bound in the stream beside it."""
    machine = TwoCoreMachine()
    tuner = tuner_on(machine)
    used = serve_for(tuner, machine, 60, prompt_rows=63)
    assert used.count(1) == 0 and tuner.current == 2
    assert 0 < serve_for(tuner, machine, 20).count(1), "steps of streams alone are still probed"


def test_a_stream_joining_between_two_steps_does_not_make_them_a_pair() -> None:
    machine = TwoCoreMachine(busy_programs=1)
    tuner = tuner_on(machine)
    machine.now = 1.0
    rows = iter([1, 2, 1, 2, 1, 2, 1, 2])
    for rows_now in rows:
        threads = tuner.threads_for_step()
        tuner.observe(threads, rows_now, machine.step(threads))
    assert tuner.current == 2  # every candidate step had a different stream count than the step before


def test_a_pause_between_requests_does_not_pair_a_step_before_it_with_one_after() -> None:
    machine = TwoCoreMachine(busy_programs=1)
    tuner = tuner_on(machine)
    threads = tuner.threads_for_step()
    tuner.observe(threads, 1, machine.step(threads))  # starved: a probe opens with this step as its first
    assert tuner.threads_for_step() == 1  # ... and the next step in a row would be its candidate
    machine.busy_programs = 0
    machine.now += 30  # nobody asks for half an hour... then the machine is free again
    used = serve_for(tuner, machine, 0.2)
    assert tuner.current == 2  # one thread, tried right after the pause, was not compared with the step before it
    assert used[0] == 2


def test_idle_time_is_read_for_the_cpus_this_process_may_use(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  900 0 100 5000 50 0 0 0 0 0\n"
        "cpu0 300 0 50 1000 10 0 0 0 0 0\n"
        "cpu1 300 0 25 2000 20 0 0 0 0 0\n"
        "cpu2 300 0 25 2000 20 0 0 0 0 0\n"
        "intr 12345\n"
    )
    tick = CpuClock(cpus=[0], stat_path=str(stat))._tick
    assert CpuClock(cpus=[0, 2], stat_path=str(stat)).idle_seconds() == pytest.approx(3030 / tick)
    assert CpuClock(cpus=[0], stat_path=str(tmp_path / "missing")).idle_seconds() is None
    assert CpuClock(cpus=[0, 7], stat_path=str(stat)).idle_seconds() is None  # CPUs it does not list: unknown


class EveryOtherStep(ThreadTuner):
    """Two threads, then one, then two: the engine must apply each step's count and still answer alike."""

    def __init__(self) -> None:
        super().__init__(2)
        self.steps = 0

    def threads_for_step(self, prompt: bool = False) -> int:
        self.steps += 1
        return 1 + self.steps % 2


async def answers(engine: Engine) -> list[list[int]]:
    """Two greedy streams decoded together."""
    request = dict(sampling=SamplingParams(temperature=0.0), max_tokens=32, ignore_eos=True)
    generations = [engine.submit(GenerationRequest(engine.tokenize(p), **request)) for p in ("Once upon a time", "The little dog")]
    await asyncio.gather(*(g.collect() for g in generations))
    return [g.token_ids for g in generations]


async def test_switching_threads_between_steps_changes_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=2, threads=2)) as pinned:
        expected = await answers(pinned)
        assert (pinned.stats().cpu_threads, pinned.stats().thread_switches_total) == (2, 0)

    tuner = EveryOtherStep()
    monkeypatch.setattr("vramsupply.engine.engine.thread_tuner", lambda options, context: tuner)
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=2)) as tuned:
        assert await answers(tuned) == expected
        assert tuner.steps >= 32
        assert llama_cpp.llama_n_threads(tuned._context.ctx) == 1 + tuner.steps % 2  # the last step's count was applied


def test_the_default_threads_get_a_tuner_and_explicit_threads_do_not() -> None:
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=64, parallel=1)) as default:
        most = default.threads[0]
        assert default.stats().cpu_threads == most
        assert (default._scheduler._threads._tuner is not None) == (most > 1)
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=64, parallel=1, threads=2)) as pinned:
        assert pinned._scheduler._threads._tuner is None


def test_each_switch_is_logged_with_what_the_probe_measured(caplog: pytest.LogCaptureFixture) -> None:
    machine = TwoCoreMachine(busy_programs=1)
    tuner = tuner_on(machine)
    with caplog.at_level("DEBUG", logger="vramsupply.engine.thread_tuner"):
        serve_for(tuner, machine, 2)
        machine.busy_programs = 0
        serve_for(tuner, machine, 3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("using ")]
    assert lines[0].startswith("using 1 CPU thread instead of 2: other programs may be keeping the cores busy; steps were ")
    assert lines[0].endswith("× faster with 1")
    assert lines[1].startswith("using 2 CPU threads instead of 1: the cores have room again; steps were ") and lines[1].endswith(" with 2")


def test_switches_back_and_forth_are_said_at_info_four_times_in_ten_minutes(caplog: pytest.LogCaptureFixture) -> None:
    """Beside a program busy on and off, a review counted 162 INFO lines in 10 minutes."""
    machine = TwoCoreMachine()
    tuner = tuner_on(machine)
    with caplog.at_level("INFO", logger="vramsupply.engine.thread_tuner"):
        for _ in range(20):  # busy and idle by turns, 60 s of the machine's time in all
            machine.busy_programs = 1 - machine.busy_programs
            serve_for(tuner, machine, 3)
        said_early = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
        machine.now += 600
        for _ in range(2):
            machine.busy_programs = 1 - machine.busy_programs
            serve_for(tuner, machine, 3)
    said = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert len(said_early) == 4 and said_early[0].startswith("using 1 CPU thread instead of 2")
    assert said_early[-1].endswith("the count changes often: changes are logged at DEBUG for a while (/metrics' vramsupply_cpu_threads shows the count in use)")
    assert len(said) == 6 and re.search(r"\(\d+ more switches were logged at DEBUG\)$", said[4]) and "DEBUG" not in said[5], said
