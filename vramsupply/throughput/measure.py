"""`vramsupply bench`: how many tokens per second this machine decodes, at 1 stream and with every slot busy.

The measurement runs the real engine (the same scheduler that serves buyers, without HTTP) on the
configured model and settings. Each phase first lets every stream produce its first token, so
prompt processing is not counted, then reads the engine's completion-token counter over a fixed
window. Streams that reach their token limit are replaced at once, so the slots stay full.

When each stream's share of the KV cache cannot hold the prompt and some decoding (many slots, a
short context), bench refuses, saying what to change, rather than measure with fewer streams: the
figure is offered as the capacity of the configuration that `serve` runs, and fewer streams would
not be that configuration.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from vramsupply.engine import Engine, EngineError, GenerationRequest, SamplingParams
from vramsupply.errors import VramsupplyError

BENCH_PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
FIRST_TOKEN_TIMEOUT = 120.0
MAX_STREAM_TOKENS = 512
CONTEXT_VARIABLE = "VRAM_SUPPLY_CONTEXT_LENGTH"
"""How bench, which has no --context-length, is given a context length."""
MIN_STREAM_TOKENS = 32
"""What each stream must be able to decode after its prompt: with less room in its share of the KV
cache, the tokens counted would be mostly first tokens, made by prompt processing, not decoding."""
MIN_TOKENS = 32
OVERTIME = 10


class BenchError(VramsupplyError):
    """The benchmark could not run; one line for the CLI."""


@dataclass(frozen=True)
class Speeds:
    single_stream: float
    all_slots: float


async def measure(engine: Engine, phase_seconds: float, progress: Callable[[str], None] = lambda _: None) -> Speeds:
    """Tokens per second with one stream, then with ``engine.parallel`` streams, ``phase_seconds`` each."""
    prompt = engine.tokenize(BENCH_PROMPT)
    check_room(engine, len(prompt))  # before any phase: a refusal after the first would waste it
    progress(f"1 stream for {phase_seconds:.0f}s")
    single = await _phase(engine, prompt, 1, phase_seconds)
    if engine.parallel == 1:  # every slot busy is the one stream
        return Speeds(single, single)
    progress(f"{engine.parallel} streams for {phase_seconds:.0f}s")
    return Speeds(single, await _phase(engine, prompt, engine.parallel, phase_seconds))


def stream_tokens(engine: Engine, prompt_tokens: int, streams: int) -> int:
    """The tokens each of ``streams`` streams may decode: together they fit the KV cache, which the
    slots share, so this is the speed of decoding, not of requests paused and recomputed for room
    (engine/preempt.py)."""
    room = min(engine.n_ctx, engine.kv_tokens // streams)
    return min(MAX_STREAM_TOKENS, room - prompt_tokens - 1)


def check_room(engine: Engine, prompt_tokens: int) -> None:
    """BenchError, saying what to change, when a stream cannot decode MIN_STREAM_TOKENS."""
    needed = prompt_tokens + 1 + MIN_STREAM_TOKENS
    what = f"the {prompt_tokens}-token prompt and {MIN_STREAM_TOKENS} decoded tokens"
    if stream_tokens(engine, prompt_tokens, 1) < MIN_STREAM_TOKENS:
        raise BenchError(f"a context of {min(engine.n_ctx, engine.kv_tokens)} tokens cannot hold {what}: set a context length of at least {needed} ({CONTEXT_VARIABLE})")
    if stream_tokens(engine, prompt_tokens, engine.parallel) < MIN_STREAM_TOKENS:
        fit = max(1, engine.kv_tokens // needed)
        raise BenchError(
            f"{engine.parallel} slots sharing a KV cache of {engine.kv_tokens} tokens leave each {engine.kv_tokens // engine.parallel}, "
            f"too few for {what}; the figure would be prompt processing, not decoding: use --parallel {fit} or fewer, or a longer context length ({CONTEXT_VARIABLE})"
        )


async def _phase(engine: Engine, prompt: list[int], streams: int, seconds: float) -> float:
    max_tokens = stream_tokens(engine, len(prompt), streams)
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
        await asyncio.gather(*tasks, return_exceptions=True)  # every outcome retrieved: none is logged as never retrieved
    return tokens / elapsed if elapsed > 0 else 0.0


async def _first_tokens(started: list[asyncio.Event], tasks: list[asyncio.Task[None]]) -> None:
    """Wait until every stream has a token; an engine error in any of them ends the wait with that error."""
    waiting = asyncio.create_task(_all_set(started))
    try:
        done, _ = await asyncio.wait([waiting, *tasks], timeout=FIRST_TOKEN_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # A cancelled gather() would end with an exception that asyncio reports, with a traceback,
        # as never retrieved; a task is only cancelled, and is awaited here.
        waiting.cancel()
        await asyncio.wait([waiting])
    for task in tasks:
        if task in done:
            task.result()  # raises the EngineError that stopped it
    if waiting not in done:
        raise EngineError(f"no token within {FIRST_TOKEN_TIMEOUT:.0f}s")


async def _all_set(events: list[asyncio.Event]) -> None:
    for event in events:
        await event.wait()


async def _keep_generating(engine: Engine, request: GenerationRequest, first_token: asyncio.Event) -> None:
    while True:
        generation = engine.submit(request)
        try:
            async for _ in generation:
                first_token.set()
        finally:
            generation.cancel()
