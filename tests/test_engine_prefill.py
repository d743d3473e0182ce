"""A short prompt is not kept waiting behind a long one (``engine/pacing.py``). On the real tiny model.

Both requests are queued before the scheduler thread starts, so the first step sees them together
whatever the machine's timing.
"""

from __future__ import annotations

import asyncio

import pytest

from conftest import TINY_MODEL
from vramsupply.engine import Engine, EngineOptions, Generation, GenerationRequest, SamplingParams
from vramsupply.engine.scheduler import Scheduler

REQUEST = {"sampling": SamplingParams(temperature=0), "max_tokens": 4, "ignore_eos": True}
STORY = "Once upon a time there was a little girl named Lily. She loved to play outside in the park with her dog."


async def first_tokens(generations: dict[str, Generation]) -> list[str]:
    """The names of the generations in the order their first tokens reached this event loop."""
    order: list[str] = []

    async def read(name: str, generation: Generation) -> None:
        await generation.__anext__()
        order.append(name)
        await generation.collect()

    await asyncio.gather(*(read(name, generation) for name, generation in generations.items()))
    return order


async def test_a_short_prompt_sent_after_a_long_one_answers_first(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(Scheduler, "start", lambda self: None)
        engine = Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=2, n_batch=16, n_ubatch=8, cache_ram=0, threads=1))
    with engine:
        long_prompt = engine.tokenize(" ".join([STORY] * 6))
        short_prompt = engine.tokenize("The dog")
        assert len(long_prompt) > 10 * 16 and len(short_prompt) < 8
        long = engine.submit(GenerationRequest(long_prompt, **REQUEST))  # type: ignore[arg-type]
        short = engine.submit(GenerationRequest(short_prompt, **REQUEST))  # type: ignore[arg-type]
        engine._scheduler.start()

        assert await first_tokens({"long": long, "short": short}) == ["short", "long"]
        assert long.finish_reason == short.finish_reason == "length"
        alone = engine.submit(GenerationRequest(long_prompt, **REQUEST))  # type: ignore[arg-type]
        await alone.collect()
        assert long.token_ids == alone.token_ids, "the long prompt, prefilled around the short one, answers as if alone"


async def test_with_one_slot_a_short_request_queued_after_a_long_one_takes_the_slot_first(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(Scheduler, "start", lambda self: None)
        engine = Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=1, max_queue=4, cache_ram=0, threads=1))
    with engine:
        long = engine.submit(GenerationRequest(engine.tokenize(" ".join([STORY] * 6)), **REQUEST))  # type: ignore[arg-type]
        short = engine.submit(GenerationRequest(engine.tokenize("The dog"), **REQUEST))  # type: ignore[arg-type]
        engine._scheduler.start()

        assert await first_tokens({"long": long, "short": short}) == ["short", "long"]
