"""Mid-answer tokens reach the event loop at most once per stream interval, in groups; a buyer's
first token and the end of the answer are never held back."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from conftest import TINY_MODEL
from vramsupply.engine import generation as generation_module
from vramsupply.engine import Engine, EngineOptions, Generation, GenerationRequest, SamplingParams
from vramsupply.engine.cadence import Cadence
from vramsupply.engine.generation import Event

real_deliver = generation_module.deliver

GREEDY = SamplingParams(temperature=0)
PROMPT = "Once upon a time"
TOKENS = 40


def load(interval_ms: float) -> Engine:
    return Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=2, threads=1, stream_interval_ms=interval_ms))


@pytest.fixture(scope="module")
def every_step() -> Iterator[Engine]:
    with load(0) as engine:
        yield engine


@pytest.fixture(scope="module")
def once_a_second() -> Iterator[Engine]:
    with load(1000) as engine:
        yield engine


async def deltas(engine: Engine, stop: tuple[str, ...] = ()) -> tuple[list[tuple[str, int]], float, Generation]:
    """Each hand-over to the event loop that carried text, as (its text, the tokens handed over by
    then), the seconds the answer took, and the finished generation. Hand-overs, not what the
    consumer reads: a consumer that runs late reads two hand-overs' text as one delta (the tiny
    model writes its 40 tokens in a few ms), which is the loop's timing, not the engine's."""
    request = GenerationRequest(engine.tokenize(PROMPT), sampling=GREEDY, max_tokens=TOKENS, ignore_eos=True, stop=stop)
    handed: list[tuple[str, int]] = []
    tokens = 0

    def deliver(events: list[Event]) -> None:
        nonlocal tokens
        mine = [event for event in events if event.channel is generation._channel]
        tokens += sum(event.token is not None for event in mine)
        text = "".join(event.text for event in mine)
        if text:
            handed.append((text, tokens))
        real_deliver(events)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation_module, "deliver", deliver)
        generation = engine.submit(request)
        started = time.monotonic()
        await generation.collect()
        took = time.monotonic() - started
    return handed, took, generation


async def test_a_short_answer_comes_as_its_first_token_then_the_rest(every_step: Engine, once_a_second: Engine) -> None:
    grouped, took, _ = await deltas(once_a_second)
    plain, _, _ = await deltas(every_step)
    # The tiny model writes 40 tokens in a few tens of ms, well inside the 1 s interval: the first
    # token goes at once (a client's TTFT), the rest are held until the answer ends, which also
    # goes at once rather than after the interval.
    assert [tokens for _, tokens in grouped] == [1, TOKENS]
    assert took < 0.9
    assert "".join(text for text, _ in grouped) == "".join(text for text, _ in plain)
    assert len(plain) > 2  # every step handed over: more deltas than the grouped answer's two


async def test_a_first_token_whose_text_is_held_back_does_not_hold_back_the_first_text(every_step: Engine, once_a_second: Engine) -> None:
    plain, _, generation = await deltas(every_step)
    first_text = "".join(text for text, _ in plain)[: generation.token_text_ends[0]]
    # A stop string that starts with the first token's text and never completes: that text waits
    # for the second token to rule the stop out, and the buyer's first text comes with it.
    grouped, took, _ = await deltas(once_a_second, stop=(first_text + "#never#",))
    assert [tokens for _, tokens in grouped] == [2, TOKENS]
    assert grouped[0][0].startswith(first_text) and took < 0.9


def test_hand_overs_are_spaced_by_the_interval_unless_urgent() -> None:
    cadence = Cadence(0.012)
    assert cadence.due(100.0)  # nothing handed over yet
    cadence.handed_over(100.0)
    assert not cadence.due(100.006)
    assert cadence.due(100.012)
    cadence.urgent()  # a first token or an end
    assert cadence.due(100.001)
    cadence.handed_over(100.001)
    assert not cadence.due(100.002)


def test_interval_zero_hands_over_every_step() -> None:
    cadence = Cadence(0)
    cadence.handed_over(5.0)
    assert cadence.due(5.0)
