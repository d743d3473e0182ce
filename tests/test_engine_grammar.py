"""Grammar requests never hold up the other slots: their tokens are sampled on a worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import pytest

from conftest import TINY_MODEL
from vramsupply.engine import Engine, EngineClosed, EngineOptions, GenerationRequest, SamplingParams

GRAMMAR = r'root ::= "Tom and Lily " ("ran" | "played" | "saw") [a-z ]{3,30} "."'


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=3, max_queue=4, threads=1)) as loaded:
        yield loaded


def hold_sampling(generation: object) -> threading.Event:
    """Make the worker wait before each of this request's tokens until the event is set."""
    release = threading.Event()
    sampler = generation.task.sampler  # type: ignore[attr-defined]
    sample = sampler.sample_loaded

    def held() -> int:
        assert threading.current_thread().name.startswith("vramsupply-grammar"), "sampled off the scheduler thread"
        release.wait(30)
        return sample()

    sampler.sample_loaded = held
    return release


async def test_a_stream_runs_to_the_end_while_a_grammar_request_waits_for_its_token(engine: Engine) -> None:
    prompt = engine.tokenize("Once upon a time")
    reference = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0, grammar=GRAMMAR), max_tokens=30))
    expected = "".join([d async for d in reference])

    constrained = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0, grammar=GRAMMAR), max_tokens=30))
    release = hold_sampling(constrained)
    plain = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0), max_tokens=40, ignore_eos=True))
    await asyncio.wait_for(plain.collect(), 30)
    assert len(plain.token_ids) == 40, "every token of the plain stream while the grammar's first one was held"
    assert constrained.token_ids == []

    release.set()
    assert "".join([d async for d in constrained]) == expected
    assert constrained.finish_reason == "stop"


async def test_a_grammar_request_cancelled_while_its_token_is_sampled_frees_its_slot(engine: Engine) -> None:
    prompt = engine.tokenize("The dog")
    constrained = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0.8, seed=3, grammar=GRAMMAR), max_tokens=30))
    release = hold_sampling(constrained)
    for _ in range(200):
        if engine.stats().slots_busy == 1:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    constrained.cancel()
    release.set()
    await asyncio.wait_for(constrained.collect(), 30)
    assert constrained.finish_reason == "cancelled"
    for _ in range(200):
        if engine.stats().slots_busy == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats().slots_busy == 0
    again = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0, grammar=GRAMMAR), max_tokens=30))
    assert "".join([d async for d in again]).startswith("Tom and Lily ")


def test_closing_the_engine_with_a_grammar_token_in_flight_waits_for_the_worker() -> None:
    async def run() -> None:
        loaded = Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=2, max_queue=2, threads=1))
        generation = loaded.submit(GenerationRequest(loaded.tokenize("Once"), SamplingParams(temperature=0, grammar=GRAMMAR), max_tokens=30))
        release = hold_sampling(generation)
        await asyncio.sleep(0.3)
        threading.Timer(0.3, release.set).start()
        await asyncio.to_thread(loaded.close)
        with contextlib.suppress(EngineClosed):
            await asyncio.wait_for(generation.collect(), 30)
        assert generation.done

    asyncio.run(run())
