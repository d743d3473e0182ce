#!/usr/bin/env python3
"""Idle and peak RSS of `vramsupply serve` (bench model, its defaults) with glibc's malloc arenas as
they are and capped at two (MALLOC_ARENA_MAX=2), in alternating runs.

glibc gives threads that allocate arenas of their own (up to 8 per core), and memory freed in one
arena is not reused by another: the agent's event loop, its scheduler thread, the ledger writer and
asyncio's worker threads all allocate. Each run starts the agent, reads its RSS once it is loaded,
then samples it every 20 ms while 3 bursts of 16 streams (128 tokens each) and 2 prompts of about
1,800 tokens run. Results: bench/results/2026-12-06-malloc-arenas-xeon.txt, read in
docs/performance.md (Memory at defaults).

    bench/.cache/venv-llamacpp-server/bin/python bench/malloc_arenas.py [PAIRS]
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client import stream_completion  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "bench" / ".cache" / "bench-llama-768x12-q8_0.gguf"
HOME = tempfile.mkdtemp(prefix="arenas-home-")  # a data dir of its own: no other agent's lock or ledger
MIB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(process: psutil.Process) -> int:
    total = 0
    for each in (process, *process.children(recursive=True)):
        try:
            total += each.memory_info().rss
        except psutil.Error:
            pass
    return total


async def load(url: str) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for burst in range(3):
            bodies = [
                {"prompt": f"Story {burst} {i}: once upon a time", "max_tokens": 128, "temperature": 0, "stream": True, "ignore_eos": True}
                for i in range(16)
            ]
            await asyncio.gather(*(stream_completion(session, url, body) for body in bodies))
        long = " ".join(["the little dog ran to the park and played with a ball"] * 140)
        bodies = [{"prompt": f"{i} {long}", "max_tokens": 32, "stream": True} for i in range(2)]
        await asyncio.gather(*(stream_completion(session, url, body) for body in bodies))


def run(variant: str) -> tuple[float, float, float]:
    """(idle MiB, peak MiB, seconds of load) of one agent."""
    env = {**os.environ, "HOME": HOME, **({"MALLOC_ARENA_MAX": "2"} if variant == "arenas=2" else {})}
    port = free_port()
    command = [str(REPO / ".venv" / "bin" / "vramsupply"), "serve", "--model", str(MODEL), "--no-register", "--port", str(port)]
    agent = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert agent.stdout is not None
    for line in agent.stdout:
        if line.startswith("vramsupply ready"):
            break
    threading.Thread(target=lambda: [None for _ in agent.stdout], daemon=True).start()  # type: ignore[union-attr]
    process = psutil.Process(agent.pid)
    time.sleep(2)
    idle = rss(process)
    peak, done = [idle], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss(process))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    began = time.monotonic()
    asyncio.run(load(f"http://127.0.0.1:{port}"))
    took = time.monotonic() - began
    done.set()
    sampler.join()
    agent.terminate()
    agent.wait(60)
    return idle / MIB, peak[0] / MIB, took


def main() -> None:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    for pair in range(pairs):
        for variant in ("default", "arenas=2") if pair % 2 == 0 else ("arenas=2", "default"):
            idle, peak, took = run(variant)
            print(f"{variant:9s} idle {idle:6.1f} MiB  peak {peak:6.1f} MiB  load {took:5.1f} s", flush=True)


if __name__ == "__main__":
    main()
