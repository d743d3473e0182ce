"""Which prompt is served first (``engine/pacing.py``). On the real tiny model.

Both requests are queued before the scheduler thread starts, so the first step sees them together
whatever the machine's timing.
"""

from __future__ import annotations

import asyncio

import pytest

from conftest import TINY_MODEL, scheduler_held
from vramsupply.engine import Engine, EngineOptions, Generation, GenerationRequest, SamplingParams
from vramsupply.engine.pacing import TTFT_TARGET_SECONDS

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


def held_engine(monkeypatch: pytest.MonkeyPatch, **options: object) -> Engine:
    """An engine whose scheduler thread waits for ``engine._scheduler.start()``."""
    with scheduler_held(monkeypatch):
        return Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, cache_ram=0, threads=1, **options))  # type: ignore[arg-type]


@pytest.mark.parametrize("slots", [1, 2], ids=["one slot: admission", "two slots: prefill"])
async def test_prompts_that_can_still_answer_in_time_go_oldest_first(monkeypatch: pytest.MonkeyPatch, slots: int) -> None:
    with held_engine(monkeypatch, parallel=slots, n_batch=16, n_ubatch=8) as engine:
        long = engine.submit(GenerationRequest(engine.tokenize(" ".join([STORY] * 6)), **REQUEST))  # type: ignore[arg-type]
        short = engine.submit(GenerationRequest(engine.tokenize("The dog"), **REQUEST))  # type: ignore[arg-type]
        engine._scheduler.start()

        assert await first_tokens({"long": long, "short": short}) == ["long", "short"]


@pytest.mark.parametrize("slots", [1, 2], ids=["one slot: admission", "two slots: prefill"])
async def test_a_request_that_already_missed_the_target_goes_after_one_that_can_make_it(monkeypatch: pytest.MonkeyPatch, slots: int) -> None:
    with held_engine(monkeypatch, parallel=slots, n_batch=16, n_ubatch=8) as engine:
        long_prompt = engine.tokenize(" ".join([STORY] * 6))
        assert len(long_prompt) > 10 * 16
        late = engine.submit(GenerationRequest(long_prompt, **REQUEST))  # type: ignore[arg-type]
        await asyncio.sleep(TTFT_TARGET_SECONDS + 0.1)  # its buyer has waited longer than the target
        fresh = engine.submit(GenerationRequest(engine.tokenize("The dog"), **REQUEST))  # type: ignore[arg-type]
        engine._scheduler.start()

        assert await first_tokens({"late": late, "fresh": fresh}) == ["fresh", "late"]
        assert late.finish_reason == fresh.finish_reason == "length"
        alone = engine.submit(GenerationRequest(long_prompt, **REQUEST))  # type: ignore[arg-type]
        await alone.collect()
        assert late.token_ids == alone.token_ids, "the deferred prompt answers as if alone"
