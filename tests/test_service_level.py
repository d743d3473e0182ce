"""A stream that is serving its buyer well keeps doing so while a prompt that has already missed its
first-token target is prefilled beside it (``engine/service_level.py``); a prompt that can still
answer in time is prefilled at full speed."""

from __future__ import annotations

import asyncio
import time

import pytest

from test_engine_prefill import REQUEST, STORY, held_engine
from test_pacing import learn, prefilling
from vramsupply.engine import GenerationRequest, SamplingParams, service_level
from vramsupply.engine.pacing import MAX_DEFER_SECONDS, STEP_TARGET_SECONDS, PrefillPacer, StepWork
from vramsupply.engine.service_level import TPOT_GUARD_SECONDS, TTFT_TARGET_SECONDS, on_track, step_allowance
from vramsupply.engine.slots import Slot
from vramsupply.engine.step_cost import TILE_ROWS

GENERATING_SECONDS = 0.02


def stream(now: float, ttft: float, tokens: int, elapsed: float) -> Slot:
    """A generating slot whose first token came ``ttft`` after its request, and ``tokens`` tokens
    in all up to ``elapsed`` seconds after that one."""
    slot = prefilling(0, 10, arrived=now - elapsed - ttft, done=10)
    slot.next_token, slot.completion_tokens = 42, tokens
    slot.task.first_token_at = now - elapsed  # type: ignore[union-attr]
    return slot


def paced_pacer() -> PrefillPacer:
    """1 ms a prompt token beside streams whose rows take 20 ms a step."""
    pacer = PrefillPacer(512)
    learn(pacer, 0.001)
    pacer.observe(StepWork(0, 0.0, True), GENERATING_SECONDS)
    return pacer


def prompt_chunk(pacer: PrefillPacer, running: Slot, prompt_tokens: int, waited: float) -> int:
    """The prompt rows the pacer plans beside ``running`` for a prompt whose buyer waited ``waited`` s."""
    prompt = prefilling(1, prompt_tokens, arrived=time.monotonic() - waited)
    plan = pacer.plan([running, prompt], capacity=2048, memory=None)
    assert plan[0] == (running, None), "the stream's next token comes first, always"
    return sum(len(chunk) for _, chunk in plan if chunk is not None)


def test_a_stream_is_on_track_while_its_first_token_came_in_time_and_its_mean_since_is_within_the_target() -> None:
    now = 100.0
    assert on_track(stream(now, ttft=0.4, tokens=31, elapsed=2.9), now)  # 2.9 s over 30 tokens: 97 ms
    assert not on_track(stream(now, ttft=0.4, tokens=31, elapsed=3.1), now), "103 ms a token"
    assert not on_track(stream(now, ttft=TTFT_TARGET_SECONDS + 0.1, tokens=31, elapsed=0.5), now), "its first token came late"
    assert on_track(stream(now, ttft=0.4, tokens=1, elapsed=0.3), now), "one token: nothing to average yet"


def test_the_allowance_is_the_longest_step_that_keeps_every_stream_on_track_within_the_guard() -> None:
    now = 100.0
    roomy, tight = stream(now, 0.2, tokens=31, elapsed=1.0), stream(now, 0.2, tokens=31, elapsed=2.7)
    tight.seq_id = 1
    late = stream(now, TTFT_TARGET_SECONDS + 1, tokens=31, elapsed=0.1)  # not on track: not protected
    assert step_allowance([roomy, tight, late], now) == pytest.approx(TPOT_GUARD_SECONDS * 31 - 2.7)
    assert step_allowance([late], now) is None
    assert step_allowance([], now) is None


def test_a_late_prompt_gets_only_what_the_streams_on_track_can_spare() -> None:
    pacer, now = paced_pacer(), time.monotonic()
    full = prompt_chunk(pacer, stream(now, 0.2, tokens=31, elapsed=0.5), 1500, waited=0.1)  # 1.5 s to prefill: late
    assert full > 64, "plenty to spare: the step's whole target"
    assert prompt_chunk(pacer, stream(now, 0.2, tokens=31, elapsed=2.79), 1500, waited=0.1) == 0, "nothing to spare"

    spare = 0.1  # the stream can take a 100 ms step: 80 ms of prompt rows beside its own 20
    spared = prompt_chunk(pacer, stream(now, 0.2, tokens=31, elapsed=TPOT_GUARD_SECONDS * 31 - spare), 1500, waited=0.1)
    assert 0 < spared <= (spare - GENERATING_SECONDS) / 0.001 < full
    assert spared == TILE_ROWS, "cut at a whole tile"


def test_a_late_prompt_waits_for_the_streams_to_spare_a_whole_tile_rather_than_go_row_by_row() -> None:
    """Below a tile, prompt rows attend row by row, at about twice a tile's cost a row at depth on
    the bench CPU; in a marketplace run at 0.2 conv/s, 177 steps beside streams carried late
    prompts' chunks of 10-60 rows that way. A step of the streams' rows alone adds to what they can
    spare, so a late prompt that a whole tile would fit within the step's target waits for one."""
    pacer, now = paced_pacer(), time.monotonic()
    spare = 0.06  # 40 ms of prompt rows beside the stream's 20: below a tile
    elapsed = TPOT_GUARD_SECONDS * 31 - spare
    assert prompt_chunk(pacer, stream(now, 0.2, tokens=31, elapsed=elapsed), 1500, waited=0.1) == 0, "a step of the stream's row alone"
    later = stream(now, 0.2, tokens=32, elapsed=elapsed + GENERATING_SECONDS)  # that step done: 70 ms more to spare
    assert prompt_chunk(pacer, later, 1500, waited=0.1) == TILE_ROWS

    end = prefilling(1, 240, arrived=time.monotonic() - 1.5, done=200)  # the last 40 rows: never a tile
    plan = pacer.plan([stream(now, 0.2, tokens=31, elapsed=elapsed), end], capacity=2048, memory=None)
    [rows] = [len(chunk) for _, chunk in plan if chunk is not None]
    assert 30 < rows <= 40, "what the stream spares, row by row (its mean has moved on a little since)"


def test_a_prompt_that_can_still_answer_in_time_or_waited_too_long_goes_at_full_speed() -> None:
    pacer, now = paced_pacer(), time.monotonic()
    unprotected = prompt_chunk(pacer, stream(now, TTFT_TARGET_SECONDS + 1, tokens=31, elapsed=0.5), 400, waited=0.0)
    assert unprotected <= (STEP_TARGET_SECONDS - GENERATING_SECONDS) / 0.001
    no_slack = stream(now, 0.2, tokens=31, elapsed=2.79)
    assert prompt_chunk(pacer, no_slack, 400, waited=0.0) == unprotected, "0.4 s of prefill: it can still answer in time"
    assert prompt_chunk(pacer, no_slack, 1500, waited=MAX_DEFER_SECONDS + 1) > 0, "deferred for long enough: it goes"


def test_a_prompt_yields_only_when_even_its_best_speed_would_answer_late() -> None:
    """900 tokens take 1.03 s beside the streams (1 ms a token, in steps they share) but 0.45 s
    alone: judged by its paced speed it would yield, and yielding would make it surely late."""
    pacer, now = paced_pacer(), time.monotonic()
    no_slack = stream(now, 0.2, tokens=31, elapsed=2.79)
    assert prompt_chunk(pacer, no_slack, 900, waited=0.0) > 0, "0.9 s (nothing known alone): in time, it goes"
    assert prompt_chunk(pacer, no_slack, 900, waited=0.5) == 0, "0.5 s waited + 0.9 s: late at any speed"
    learn(pacer, 0.0005, paced=False)
    assert prompt_chunk(pacer, no_slack, 900, waited=0.5) > 0, "0.5 s waited + 0.45 s alone: not surely late"
    assert prompt_chunk(pacer, no_slack, 900, waited=0.6) == 0, "0.6 s waited + 0.45 s alone: late"


async def test_a_late_prompt_waits_for_a_stream_that_has_nothing_to_spare(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the real tiny model: with the guard at 0 an on-track stream never has time to spare, so a
    prompt that already missed its target gets its first token only after the stream's last (it
    gets one first chunk, from which the pacer learns what prompt rows cost); with the guard as
    shipped (the tiny model's steps take well under a millisecond) it goes beside the stream."""

    async def events(guard: float) -> list[str]:
        monkeypatch.setattr(service_level, "TPOT_GUARD_SECONDS", guard)
        seen: list[str] = []
        with held_engine(monkeypatch, parallel=2, n_batch=32, n_ubatch=32) as engine:  # a 16-token first chunk teaches the pacer
            late = engine.submit(GenerationRequest(engine.tokenize(" ".join([STORY] * 3)), **REQUEST))  # type: ignore[arg-type]
            await asyncio.sleep(TTFT_TARGET_SECONDS + 0.1)  # its buyer has waited longer than the target
            running = engine.submit(GenerationRequest(engine.tokenize("The dog"), SamplingParams(temperature=0), max_tokens=40, ignore_eos=True))
            engine._scheduler.start()

            async def first_of_late() -> None:
                await late.__anext__()
                seen.append("late: first token")
                await late.collect()

            async def all_of_running() -> None:
                await running.collect()
                seen.append("running: last token")

            await asyncio.gather(first_of_late(), all_of_running())
            assert late.finish_reason == running.finish_reason == "length"
        return seen

    assert await events(guard=0.0) == ["running: last token", "late: first token"]
    assert await events(guard=TPOT_GUARD_SECONDS) == ["late: first token", "running: last token"]
