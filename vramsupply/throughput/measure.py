"""`vramsupply bench`: how many tokens per second this machine decodes, at 1 stream and with every slot busy.

The measurement runs the real engine (the same scheduler that serves buyers, without HTTP) on the
configured model and settings. Each phase first lets every stream produce its first token, so
prompt processing is not counted, then reads the engine's completion-token counter over a fixed
window. Streams that reach their token limit are replaced at once, so the slots stay full.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from vramsupply.engine import Engine, EngineError, GenerationRequest, SamplingParams

BENCH_PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
FIRST_TOKEN_TIMEOUT = 120.0
MAX_STREAM_TOKENS = 512
MIN_TOKENS = 32
OVERTIME = 10


@dataclass(frozen=True)
class Speeds:
    single_stream: float
    all_slots: float


async def measure(engine: Engine, phase_seconds: float, progress: Callable[[str], None] = lambda _: None) -> Speeds:
    """Tokens per second with one stream, then with ``engine.parallel`` streams, ``phase_seconds`` each."""
    progress(f"1 stream for {phase_seconds:.0f}s")
    single = await _phase(engine, 1, phase_seconds)
    progress(f"{engine.parallel} streams for {phase_seconds:.0f}s")
    total = await _phase(engine, engine.parallel, phase_seconds) if engine.parallel > 1 else single
    return Speeds(single, total)


async def _phase(engine: Engine, streams: int, seconds: float) -> float:
    prompt = engine.tokenize(BENCH_PROMPT)
    # Streams that together fit the KV cache, which the slots share: the speed of decoding, not of
    # requests paused and recomputed for room (engine/preempt.py).
    room = min(engine.n_ctx, engine.kv_tokens // streams)
    max_tokens = max(1, min(MAX_STREAM_TOKENS, room - len(prompt) - 1))
    request = GenerationRequest(prompt=prompt, sampling=SamplingParams(temperature=0.8, seed=1), max_tokens=max_tokens, ignore_eos=True)
    started = [asyncio.Event() for _ in range(streams)]
    tasks = [asyncio.create_task(_keep_generating(engine, request, event)) for event in started]
    try:
        await _first_tokens(started, tasks)
        begin, tokens_before = time.monotonic(), engine.stats().completion_tokens_total
        await asyncio.sleep(seconds)
        elapsed, tokens = time.monotonic() - begin, engine.stats().completion_tokens_total - tokens_before
        # A slow machine (a big model on a CPU, a busy host) gets a longer window rather than a
        # figure made of a handful of tokens: at least MIN_TOKENS, for up to OVERTIME x the time.
        while tokens < MIN_TOKENS and elapsed < seconds * OVERTIME:
            await asyncio.sleep(min(1.0, seconds))
            elapsed, tokens = time.monotonic() - begin, engine.stats().completion_tokens_total - tokens_before
        if tokens == 0:
            raise EngineError(f"no token was decoded in {elapsed:.0f}s")
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return tokens / elapsed if elapsed > 0 else 0.0


async def _first_tokens(started: list[asyncio.Event], tasks: list[asyncio.Task[None]]) -> None:
    """Wait until every stream has a token; an engine error in any of them ends the wait with that error."""
    waiting = asyncio.ensure_future(asyncio.gather(*(event.wait() for event in started)))
    try:
        done, _ = await asyncio.wait([waiting, *tasks], timeout=FIRST_TOKEN_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    for task in tasks:
        if task in done:
            task.result()  # raises the EngineError that stopped it
    if waiting not in done:
        raise EngineError(f"no token within {FIRST_TOKEN_TIMEOUT:.0f}s")


async def _keep_generating(engine: Engine, request: GenerationRequest, first_token: asyncio.Event) -> None:
    while True:
        generation = engine.submit(request)
        try:
            async for _ in generation:
                first_token.set()
        finally:
            generation.cancel()
