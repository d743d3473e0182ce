#!/usr/bin/env python3
"""Waves of concurrent streams against a running server: what happens when one burst gives way to the next.

bench/run.py measures each concurrency level as a whole; this sends WAVES bursts of N streaming
completions (128 forced tokens, 4 short prompts in turn), each burst starting when the last stream
of the one before has ended, and prints every wave's TTFT (p50, max) and tok/s, then the server's
prompt-cache counters from /metrics when it has them. Between waves the server decides what to do
with the idle slots' KV (vramsupply: save it to the host prompt cache or not, engine/save_policy.py),
which shows as the next wave's TTFT. To compare two builds, serve each in turn and run this.

    .venv/bin/vramsupply serve --model bench/.cache/bench-llama-768x12-q8_0.gguf --no-register --port 8080 &
    .venv/bin/python bench/waves.py http://127.0.0.1:8080 --streams 16 --waves 4
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp

PROMPTS = ("Once upon a time", "The little dog", "In a small town", "She opened the door")


async def stream(session: aiohttp.ClientSession, url: str, model: str, prompt: str) -> float:
    """Seconds to the first streamed chunk of one 128-token completion, read to its end."""
    body = {"model": model, "prompt": prompt, "max_tokens": 128, "temperature": 0, "stream": True, "ignore_eos": True}
    started, first = time.perf_counter(), None
    async with session.post(f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if first is None and line.startswith(b"data: {"):
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("a stream ended without a chunk")
    return first


async def run(url: str, streams: int, waves: int) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v1/models") as response:
            model = (await response.json())["data"][0]["id"]
        for wave in range(waves):
            started = time.perf_counter()
            ttfts = await asyncio.gather(*(stream(session, url, model, PROMPTS[i % len(PROMPTS)]) for i in range(streams)))
            seconds = time.perf_counter() - started
            print(f"wave {wave + 1}: TTFT p50 {statistics.median(ttfts) * 1e3:.0f} ms, max {max(ttfts) * 1e3:.0f} ms; "
                  f"{streams * 128 / seconds:.1f} tok/s")
        async with session.get(f"{url}/metrics") as response:
            metrics = await response.text() if response.status == 200 else ""
    for line in metrics.splitlines():
        if line.startswith("vramsupply_prompt_cache_") and "_total" in line:
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--streams", type=int, default=16, help="streams per wave (default 16)")
    parser.add_argument("--waves", type=int, default=4, help="waves (default 4)")
    args = parser.parse_args()
    asyncio.run(run(args.url.rstrip("/"), args.streams, args.waves))


if __name__ == "__main__":
    main()
