"""A buyer who hangs up while their request is being submitted leaves nothing running behind.

A request whose sampler is costly to build (a grammar, a large logit bias) is submitted from a
worker thread. A buyer who left meanwhile cancelled the handler's wait, not the thread: the
generation the thread then started ran to its token limit for nobody, holding a slot, and its
late submit took a reserved place that had already been given back (see test_engine.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from conftest import TINY_MODEL
from vramsupply.engine import Engine, EngineOptions, Generation, GenerationRequest, SamplingParams
from vramsupply.server.submission import off_the_loop


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=1, max_queue=1, threads=1)) as loaded:
        yield loaded


async def test_a_generation_whose_buyer_left_while_it_was_submitted_is_cancelled_once_it_exists(engine: Engine) -> None:
    loop = asyncio.get_running_loop()
    release, started = threading.Event(), []

    def slow_submit() -> Generation:  # a grammar being parsed, for as long as the test likes
        release.wait(30)
        request = GenerationRequest(engine.tokenize("Once upon a time"), sampling=SamplingParams(temperature=0), max_tokens=200, ignore_eos=True)
        started.append(engine.submit(request, loop=loop))
        return started[-1]

    waiting = asyncio.create_task(off_the_loop(slow_submit))
    await asyncio.sleep(0)
    waiting.cancel()  # the buyer hung up
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release.set()
    for _ in range(1000):
        if started:
            break
        await asyncio.sleep(0.01)
    [generation] = started
    await generation.collect()
    assert generation.finish_reason == "cancelled", "nobody reads it: it must not run to its token limit"
    assert generation.usage.completion_tokens < 200
