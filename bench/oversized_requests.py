#!/usr/bin/env python3
"""How long one buyer's oversized requests hold up the others: `/health` and a small request's
latency while they run, for the agent as it is and for another checkout (``--before DIR``).

Three floods, each beside a poller of `/health` (which the platform reads with a 5 s timeout) and
of a small completion from another buyer:
- ``ids``: 20 concurrent bodies of 2M token ids (under the 4 MiB body limit), each past the context;
- ``text``: 40 concurrent 4 MiB text prompts, each past the context;
- ``logprobs``: one whole (not streamed) chat answer of 16 choices × 600 tokens with 20 logprobs.

    .venv/bin/python bench/oversized_requests.py [--before /path/to/older/checkout]

Results: bench/results/2026-12-07-oversized-requests.txt (the bundled model, `serve` defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "vramsupply" / "assets" / "stories260K.gguf"
IDS = b'{"max_tokens":1,"prompt":[' + b"1," * (2 * 1024 * 1024 - 40) + b"1]}"
TEXT = b'{"max_tokens":1,"prompt":"' + b"a " * (2 * 1024 * 1024 - 40) + b'"}'
LOGPROBS = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 600, "min_tokens": 600, "n": 16, "logprobs": True, "top_logprobs": 20}
SMALL = {"prompt": "Once upon a time", "max_tokens": 1, "user": "u" * 9000}  # a 9 KB body: tokenized on a thread


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def worst(session: aiohttp.ClientSession, url: str, stop: asyncio.Event, body: dict | None = None) -> float:
    """The slowest answer to ``url`` (a GET, or a POST of ``body``) polled until ``stop``."""
    slowest = 0.0
    while not stop.is_set():
        began = time.monotonic()
        async with (session.get(url) if body is None else session.post(url, json=body)) as response:
            await response.read()
        slowest = max(slowest, time.monotonic() - began)
        await asyncio.sleep(0.1)
    return slowest


async def flood(base: str, kind: str) -> tuple[float, float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=600)) as session:
        stop = asyncio.Event()
        health = asyncio.create_task(worst(session, base + "/health", stop))
        small = asyncio.create_task(worst(session, base + "/v1/completions", stop, SMALL))
        await asyncio.sleep(0.5)

        async def one(data: bytes | None, path: str = "/v1/completions", body: dict | None = None) -> int:
            async with session.post(base + path, data=data, json=body, headers={"Content-Type": "application/json"}) as response:
                await response.read()
                return response.status

        if kind == "ids":
            await asyncio.gather(*(one(IDS) for _ in range(20)))
        elif kind == "text":
            await asyncio.gather(*(one(TEXT) for _ in range(40)))
        else:
            await one(None, "/v1/chat/completions", LOGPROBS)
        stop.set()
        return await health, await small


def run(source: Path, kinds: list[str]) -> dict[str, tuple[float, float]]:
    port = free_port()
    home = tempfile.mkdtemp(prefix="vs-oversized-")
    env = {**os.environ, "HOME": home, "PYTHONPATH": str(source)}
    command = [sys.executable, "-m", "vramsupply", "serve", "--model", str(MODEL), "--no-register", "--port", str(port)]
    server = subprocess.Popen(command, env=env, cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
                if subprocess.run(["curl", "-sf", base + "/health"], capture_output=True).returncode == 0:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        return {kind: asyncio.run(flood(base, kind)) for kind in kinds}
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="another checkout's root, run first")
    parser.add_argument("--kinds", default="ids,text,logprobs")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    for label, source in ([("before", args.before)] if args.before else []) + [("now", ROOT)]:
        for kind, (health, small) in run(source, kinds).items():
            print(f"{label:6} {kind:8} worst /health {health:6.2f} s   worst small request {small:6.2f} s", flush=True)


if __name__ == "__main__":
    main()
