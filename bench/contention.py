#!/usr/bin/env python3
"""Both servers at their defaults on a machine that is busy with something else.

A provider's CPU box may run other work. Each server is started at its defaults on the bench
model, then measured at c = 1 and 4 (2 x c requests of 64 tokens) alone and beside two busy
processes in a session of their own (``while True: pass``; on a 2-core VM that leaves each
server's group about one core, since the kernel groups threads by session). Prints the tok/s.
``--threads N`` gives both servers N threads instead of their defaults.

    bench/.cache/venv-llamacpp-server/bin/python bench/contention.py
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client import eos_token_id, request_bodies, run_level  # noqa: E402
from servers import BENCH_MODEL, REPO, SERVERS, defaults_config, running_server, wait_ready  # noqa: E402

HOGS = 2
LEVELS = (1, 4)


def hogs(count: int) -> list[subprocess.Popen]:
    """Busy programs in a session of their own (so the kernel schedules them as a group apart)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(count)]


async def tok_s(server, concurrency: int, eos_id: int) -> float:
    bodies = request_bodies(server.spec, 2 * concurrency, 64, eos_id)
    results, wall_s = await run_level(server.url, bodies, concurrency)
    return round(sum(r.completion_tokens for r in results) / wall_s, 1)


async def measure(name: str, eos_id: int, threads: int | None) -> dict[str, dict[int, float]]:
    """One server at its defaults (but ``threads``, if given): every level alone, then every level
    beside the busy programs."""
    cfg = defaults_config(BENCH_MODEL, REPO / ".venv" / "bin" / "vramsupply")
    if threads:
        cfg = dataclasses.replace(cfg, threads=threads, pin_threads=True)
    results = {}
    with running_server(SERVERS[name], cfg, BENCH_MODEL) as server:
        await wait_ready(server)
        await tok_s(server, 1, eos_id)  # warm-up
        for count in (0, HOGS):
            busy = hogs(count)
            time.sleep(0.5)
            try:
                results[f"{name} hogs={count}"] = {c: await tok_s(server, c, eos_id) for c in LEVELS}
            finally:
                for process in busy:
                    process.kill()
            print(f"{name:14} beside {count} busy programs: {results[f'{name} hogs={count}']}", flush=True)
    return results


async def main(threads: int | None) -> None:
    eos_id = eos_token_id(BENCH_MODEL)
    report = {}
    for name in ("vramsupply", "llama-server"):
        report.update(await measure(name, eos_id, threads))
    print(json.dumps(report))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="give both servers this many threads (default: their own defaults)")
    asyncio.run(main(parser.parse_args().threads))
