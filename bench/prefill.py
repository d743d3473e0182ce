#!/usr/bin/env python3
"""A prompt arriving while others are busy: its first token, and the stall it puts in a stream.

The marketplace bench (bench/marketplace.py) scores a request by its first token, and requests
arrive while other buyers' answers are streaming. This bench isolates the two situations that
decide it, on each server at its defaults:

* **next to a stream**: a plain stream of 200 tokens is under way when a prompt of 400 or 1000
  uncached tokens arrives; recorded are that prompt's time to first token and the stream's
  largest gap between two chunks while it runs (the stall it costs the other buyer);
* **two at once**: a 1200-token and a 200-token prompt are sent together to an idle server, the
  long one first; recorded is each one's time to first token.

Prompts are built before each measurement, so the client's own work (it tokenizes to size them)
never competes with the server for the two cores. Servers take turns per repetition.

    bench/.cache/venv-llamacpp-server/bin/python bench/prefill.py     # ~3 min
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from market_trace import Words  # noqa: E402
from marketplace import default_spec  # noqa: E402
from servers import BENCH_MODEL, REPO, defaults_config, machine_info, running_server, wait_ready  # noqa: E402

STREAM_TOKENS = 200
BESIDE_SIZES = (400, 1000)
TOGETHER = (1200, 200)


async def stream(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> tuple[float, list[float]]:
    """Time to first token, and the arrival time of every chunk (perf_counter)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7, "stream": True, "ignore_eos": True}
    sent, arrivals = time.perf_counter(), []
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.strip()
            if line.startswith(b"data:") and line != b"data: [DONE]":
                if any(choice.get("text") for choice in json.loads(line[5:]).get("choices", [])):
                    arrivals.append(time.perf_counter())
    return arrivals[0] - sent, arrivals


async def beside_a_stream(session: aiohttp.ClientSession, url: str, stream_prompt: str, prompt: str) -> dict:
    running = asyncio.create_task(stream(session, url, stream_prompt, STREAM_TOKENS))
    await asyncio.sleep(0.8)
    started = time.perf_counter()
    ttft, _ = await stream(session, url, prompt, 1)
    ended = time.perf_counter()
    _, arrivals = await running
    during = [b - a for a, b in zip(arrivals, arrivals[1:]) if b > started and a < ended]
    return {"ttft_s": round(ttft, 3), "stream_largest_gap_s": round(max(during, default=0.0), 3)}


async def two_at_once(session: aiohttp.ClientSession, url: str, long_prompt: str, short_prompt: str, gap: float = 0.01) -> dict:
    """The long prompt, then the short one ``gap`` seconds later; each one's time to first token."""
    long = asyncio.create_task(stream(session, url, long_prompt, 1))
    await asyncio.sleep(gap)
    short_ttft, _ = await stream(session, url, short_prompt, 1)
    long_ttft, _ = await long
    return {"long_ttft_s": round(long_ttft, 3), "short_ttft_s": round(short_ttft, 3)}


async def bench(names: list[str], reps: int, vramsupply: Path) -> dict[str, list[dict]]:
    model = BENCH_MODEL
    words, rng = Words(model), random.Random(11)
    specs = [default_spec(n) for n in names]
    cfg = defaults_config(model, vramsupply)
    results: dict[str, list[dict]] = {name: [] for name in names}

    def text(tag: str, tokens: int) -> str:  # a unique head, so no server finds it cached
        return f"{tag} {rng.random()} " + words.text(rng, tokens)

    with ExitStack() as stack:
        servers = [stack.enter_context(running_server(spec, cfg, model)) for spec in specs]
        # A fresh connection per request: llama-server closes idle keep-alive connections, and a
        # request sent on one it just closed fails ("Cannot write to closing transport").
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for server in servers:
                await wait_ready(server)
                await stream(session, server.url, text("warm", 50), 4)
            for rep in range(reps):
                for server in servers if rep % 2 == 0 else servers[::-1]:
                    for size in BESIDE_SIZES:
                        prompts = text("stream", 100), text("beside", size)
                        row = await beside_a_stream(session, server.url, *prompts)
                        results[server.spec.name].append({"case": f"{size} beside a stream", "rep": rep, **row})
                        print(server.spec.name, results[server.spec.name][-1], flush=True)
                    prompts = text("long", TOGETHER[0]), text("short", TOGETHER[1])
                    row = await two_at_once(session, server.url, *prompts)
                    results[server.spec.name].append({"case": f"{TOGETHER[0]} and {TOGETHER[1]} at once", "rep": rep, **row})
                    print(server.spec.name, results[server.spec.name][-1], flush=True)
    return results


def medians(results: dict[str, list[dict]]) -> dict[str, dict[str, dict[str, float]]]:
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, rows in results.items():
        for case in dict.fromkeys(row["case"] for row in rows):
            picked = [row for row in rows if row["case"] == case]
            keys = [k for k in picked[0] if k not in ("case", "rep")]
            table.setdefault(case, {})[name] = {k: round(float(np.median([row[k] for row in picked])), 3) for k in keys}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="vramsupply,llama-server")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--vramsupply", type=Path, default=REPO / ".venv" / "bin" / "vramsupply")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"{dt.date.today()}-prefill.json")
    args = parser.parse_args()
    results = asyncio.run(bench([s.strip() for s in args.servers.split(",")], args.reps, args.vramsupply))
    report = {"date": dt.date.today().isoformat(), "machine": machine_info(), "stream_tokens": STREAM_TOKENS,
              "medians": medians(results), "runs": results}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["medians"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
