"""The streaming load of bench/run.py, and what one request and one level measured.

The load is streaming POST /v1/completions (temperature 0, a short distinct prompt per request)
with a new connection per request, ``concurrency`` requests kept in flight. Every output is forced
to max_tokens: by ``ignore_eos``, or where a server lacks it, by a logit bias against EOS (what
ignore_eos does), so that all servers produce the same number of tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
from gguf import GGUFReader

from servers import ServerSpec

PROMPTS = ("Once upon a time", "The little dog", "In a small town", "She opened the door")


@dataclass
class RequestResult:
    ttft_s: float | None = None
    completion_tokens: int = 0
    tokens_counted_by: str = "chunks"
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class LevelResult:
    """One measurement: one server at one concurrency in one round."""

    round: int
    concurrency: int
    requests: int
    completed: int
    cut_off: int
    errors: int
    completion_tokens: int
    wall_s: float
    tok_s: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    peak_rss_mb: float
    server_cpu_s: float
    client_cpu_s: float
    other_cpu_cores: float
    tokens_counted_by: str
    first_error: str | None = None


def eos_token_id(model: Path) -> int:
    eos = GGUFReader(model).fields["tokenizer.ggml.eos_token_id"]
    return int(eos.parts[eos.data[0]][0])


def request_bodies(spec: ServerSpec, count: int, max_tokens: int, eos_id: int) -> list[dict]:
    """Distinct short prompts; where a server lacks ignore_eos, ban EOS by logit bias (what ignore_eos does)."""
    bodies = []
    for i in range(count):
        body = {
            "prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}",
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if spec.accepts_ignore_eos:
            body["ignore_eos"] = True
        else:
            body["logit_bias"] = {str(eos_id): -100}
        bodies.append(body)
    return bodies


async def stream_completion(session: aiohttp.ClientSession, url: str, body: dict) -> RequestResult:
    """One streaming completion; TTFT is the time to the first chunk carrying text.

    Tokens come from the usage chunk when the server sends one. Otherwise a request that ended
    with finish_reason "length" produced exactly max_tokens, and a cut-off one is counted by its
    text chunks (a server may merge tokens into one chunk, so that count can be low).
    """
    result = RequestResult()
    start = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[len(b"data:"):].strip()
                if data == b"[DONE]" or not take_chunk(result, json.loads(data), start):
                    break
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    if result.tokens_counted_by == "chunks" and result.finish_reason == "length":
        result.completion_tokens = body["max_tokens"]
        result.tokens_counted_by = "finish_reason"
    return result


def take_chunk(result: RequestResult, chunk: dict, start: float) -> bool:
    """Count one stream chunk into ``result``; False where it carries an error, which ends the stream."""
    if chunk.get("error"):
        result.error = f"in-stream error: {json.dumps(chunk['error'])[:200]}"
        return False
    if chunk.get("usage"):
        result.completion_tokens = chunk["usage"]["completion_tokens"]
        result.tokens_counted_by = "usage"
    for choice in chunk.get("choices", []):
        if choice.get("text"):
            if result.ttft_s is None:
                result.ttft_s = time.perf_counter() - start
            if result.tokens_counted_by == "chunks":
                result.completion_tokens += 1
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]
    return True


async def run_level(url: str, bodies: list[dict], concurrency: int) -> tuple[list[RequestResult], float]:
    """Keep `concurrency` requests in flight until every body is sent; a new connection per request."""
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    results: list[RequestResult] = []
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as session:

        async def worker() -> None:
            while not queue.empty():
                results.append(await stream_completion(session, url, queue.get_nowait()))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall_s = time.perf_counter() - start
    return results, wall_s


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None
