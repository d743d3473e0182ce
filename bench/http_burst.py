#!/usr/bin/env python3
"""Waves of short questions that arrive together, over HTTP: how soon each wave's first tokens come.

bench/run.py's c=16 level sends its requests in waves (all of a level's requests force the same
length, so they end in the same step and the next ones arrive together), and there vramsupply's
first tokens came later than llama-server's (TTFT p50 94 against 62 ms, tuned, 16 slots each).
bench/first_burst.py times such bursts inside one process, without HTTP, where they came in
57-76 ms: all 16 reach the engine at once there, and one admission pass seats them all before any
idle slot is parked to the prompt cache. This bench serves them over HTTP with every server's
serving defaults, so that what happens between connections, admission and the prompt cache is
in the measurement: waves of ``--streams`` streaming /v1/completions requests ("Once upon a time
N", greedy, ``--max-tokens`` forced), each on a new connection, 0.3 s apart; per wave the median
first token. The servers take turns for ``--runs`` runs of ``--waves`` waves each, each run in a
fresh process; the first wave of a run (a cold server) is left out of its median.

llama-server gets 16 slots and vramsupply's 8,192-token context (``-np 16 -c 8192``): at its own 4
slots, 12 of 16 questions wait for a whole answer. ``--against-ref REF`` adds vramsupply at an
earlier commit (a git worktree), to time a change against the code before it.

    bench/.cache/venv-llamacpp-server/bin/python bench/http_burst.py                 # ~3 min
    bench/.cache/venv-llamacpp-server/bin/python bench/http_burst.py --against-ref 6d48d71
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client import stream_completion  # noqa: E402
from servers import BENCH_MODEL, REPO, SERVERS, BenchConfig, ServerSpec, at_ref, machine_info, running_server, wait_ready, with_args, write_results  # noqa: E402

WAVE_GAP_S = 0.3


def bodies(first: int, streams: int, max_tokens: int) -> list[dict]:
    return [{"prompt": f"Once upon a time {first + i}", "max_tokens": max_tokens, "temperature": 0, "stream": True,
             "ignore_eos": True} for i in range(streams)]


async def wave(url: str, requests: list[dict]) -> list[float]:
    """One wave, every request on a new connection; the first-token times in ms, sorted."""
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        results = await asyncio.gather(*(stream_completion(session, url, body) for body in requests))
    failed = [r for r in results if r.error or r.ttft_s is None]
    if failed:
        raise RuntimeError(failed[0].error or "no text")
    return sorted(round(1000 * r.ttft_s, 1) for r in results)


async def one_run(spec: ServerSpec, cfg: BenchConfig, model: Path, waves: int, streams: int, max_tokens: int) -> dict:
    with running_server(spec, cfg, model) as server:
        await wait_ready(server)
        medians = []
        for index in range(waves):
            firsts = await wave(server.url, bodies(index * streams, streams, max_tokens))
            medians.append(statistics.median(firsts))
            await asyncio.sleep(WAVE_GAP_S)
    warm = medians[1:]
    return {"ttft_p50_ms": round(statistics.median(warm), 1), "wave_medians_ms": medians}


async def bench(specs: list[ServerSpec], cfg: BenchConfig, model: Path, runs: int, waves: int, streams: int, max_tokens: int) -> dict:
    results: dict[str, list[dict]] = {spec.name: [] for spec in specs}
    for run in range(runs):
        for spec in specs if run % 2 == 0 else specs[::-1]:
            result = await one_run(spec, cfg, model, waves, streams, max_tokens)
            results[spec.name].append(result)
            print(f"run {run + 1}: {spec.name:24} first tokens p50 {result['ttft_p50_ms']} ms; waves {result['wave_medians_ms']}", flush=True)
    return {name: {"runs": rs, "ttft_p50_ms_by_run": [r["ttft_p50_ms"] for r in rs]} for name, rs in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BENCH_MODEL)
    parser.add_argument("--runs", type=int, default=3, help="runs per server, in turns (default 3)")
    parser.add_argument("--waves", type=int, default=12, help="waves per run (default 12)")
    parser.add_argument("--streams", type=int, default=16, help="requests per wave (default 16)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--against-ref", help="also run vramsupply at this git ref")
    parser.add_argument("--vramsupply", type=Path, default=REPO / ".venv" / "bin" / "vramsupply")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/<date>-http-burst.json)")
    args = parser.parse_args()
    if min(args.runs, args.streams, args.max_tokens) < 1 or args.waves < 2:
        parser.error("--runs, --streams and --max-tokens must be at least 1, --waves at least 2")
    cfg = BenchConfig(models=(args.model,), servers=("vramsupply", "llama-server"), concurrency=(args.streams,), requests_per_slot=1,
                      max_tokens=args.max_tokens, rounds=1, parallel=0, context_per_slot=0, threads=os.cpu_count() or 1,
                      vramsupply_bin=args.vramsupply, defaults=True, pin_threads=False)
    specs = [SERVERS["vramsupply"], with_args(SERVERS["llama-server"], ["-np", "16", "-c", "8192"], "llama-server-16-slots")]
    if args.against_ref:
        specs.append(at_ref(SERVERS["vramsupply"], args.against_ref))
    started = time.perf_counter()
    report = {"date": dt.date.today().isoformat(), "machine": machine_info(), "model": str(args.model), "runs": args.runs,
              "waves": args.waves, "streams": args.streams, "max_tokens": args.max_tokens, "wave_gap_s": WAVE_GAP_S,
              "servers": asyncio.run(bench(specs, cfg, args.model, args.runs, args.waves, args.streams, args.max_tokens))}
    report["duration_s"] = round(time.perf_counter() - started, 1)
    out = args.out or REPO / "bench" / "results" / f"{report['date']}-http-burst.json"
    write_results(report, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
