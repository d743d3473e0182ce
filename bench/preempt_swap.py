#!/usr/bin/env python3
"""Long answers that together outgrow the shared KV cache: what a paused request costs.

Four streams of 1,400 tokens after 600-token prompts, all at once, on the bench model with
vramsupply at its defaults (16 slots, one 4,096-cell KV cache shared by them, host prompt cache
on): they need about 8,000 cells, so requests are paused and resumed (``engine/preempt.py``).
Recorded per run: the wall time, each stream's first token, end and longest gap between two
chunks, and the server's preemption and prefill counters from ``/metrics`` (a paused request that
is recomputed prefills its prompt and what it had generated again). Two builds (``--a``, ``--b``:
vramsupply executables) take turns, the order swapped every repetition, each on a fresh server.

    bench/.cache/venv-llamacpp-server/bin/python bench/preempt_swap.py --a OLD_VRAMSUPPLY --b NEW_VRAMSUPPLY
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prefill  # noqa: E402  (one stream's chunk arrival times)
from market_trace import Words  # noqa: E402
from servers import BENCH_MODEL, HOST, REPO, free_port, machine_info  # noqa: E402

PROMPT_TOKENS, MAX_TOKENS, STREAMS = 600, 1400, 4
COUNTERS = ("vramsupply_preemptions_total", "vramsupply_prefill_tokens_total", "vramsupply_completion_tokens_total")


async def ready(url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} never became ready")


async def stream(session: aiohttp.ClientSession, url: str, prompt: str) -> dict:
    ttft, arrivals = await prefill.stream(session, url, prompt, MAX_TOKENS)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"ttft_s": round(ttft, 3), "chunks": len(arrivals), "max_gap_s": round(max(gaps), 3),
            "done_s": round(arrivals[-1] - arrivals[0] + ttft, 2)}


async def counters(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as resp:
        lines = (await resp.text()).splitlines()
    return {name: sum(float(line.split()[-1]) for line in lines if line.split(" ")[0].split("{")[0] == name) for name in COUNTERS}


async def one_run(name: str, executable: Path, words: Words, seed: int) -> dict:
    port = free_port()
    command = [str(executable), "serve", "--model", str(BENCH_MODEL), "--no-register", "--host", HOST, "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://{HOST}:{port}"
    try:
        await ready(url)
        rng = random.Random(seed)
        prompts = [words.text(rng, PROMPT_TOKENS) for _ in range(STREAMS)]  # built before the clock starts
        async with aiohttp.ClientSession() as session:
            started = time.perf_counter()
            streams = await asyncio.gather(*(stream(session, url, prompt) for prompt in prompts))
            wall = time.perf_counter() - started
            counted = await counters(session, url)
        return {"variant": name, "seed": seed, "wall_s": round(wall, 2), "tok_s": round(STREAMS * MAX_TOKENS / wall, 1),
                "streams": streams, **counted}
    finally:
        server.terminate()
        server.wait()


async def bench(builds: dict[str, Path], seeds: list[int]) -> list[dict]:
    words = Words(BENCH_MODEL)
    runs = []
    for rep, seed in enumerate(seeds):
        order = list(builds.items()) if rep % 2 == 0 else list(reversed(builds.items()))
        for name, executable in order:
            result = await one_run(name, executable, words, seed)
            runs.append(result)
            print(name, seed, f"wall {result['wall_s']} s", {k: result[k] for k in COUNTERS},
                  "longest gaps", [s["max_gap_s"] for s in result["streams"]], flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=Path, required=True, help="the first vramsupply executable (the base)")
    parser.add_argument("--b", type=Path, required=True, help="the second vramsupply executable (the change)")
    parser.add_argument("--seeds", default="1,2", help="prompt seeds, one repetition each")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"{dt.date.today()}-preempt-swap.json")
    args = parser.parse_args()
    runs = asyncio.run(bench({"a": args.a, "b": args.b}, [int(s) for s in args.seeds.split(",")]))
    report = {"date": dt.date.today().isoformat(), "machine": machine_info(), "a": str(args.a), "b": str(args.b), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
