#!/usr/bin/env python3
"""vramsupply against llama-server in many alternating pairs: a c=1 (or c=N) ratio that noise cannot decide.

bench/run.py measures c=1 as two 128-token requests per server per round: about two seconds, and on
a shared VM the speed of the machine itself drifts by more than the gap between the servers within
a minute (its raw decode limit moved 132-146 tok/s between rounds of one run). Here both servers
run side by side at their defaults and take turns, one request each, for many pairs, the order
flipping every pair. Each pair's ratio compares two requests a second apart, so a slow drift of the
machine cancels out. The report is the median of the pair ratios with its quartiles, next to the
plain ratio of the summed tokens over the summed time, and the same split in two: the time to the
first token, and the speed of the tokens after it (the per-token path alone).

With ``--concurrency N`` a turn is one round of N streams, one request each, started together (as
run.py's levels, a new connection per request): its tok/s is the completion tokens over the
round's wall time, its time to first token the median of the N, and the speed after it is the
tokens after each first token over the round's time after its median first token.

    bench/.cache/venv-llamacpp-server/bin/python bench/pairs.py                  # 40 pairs, ~2 min
    bench/.cache/venv-llamacpp-server/bin/python bench/pairs.py --concurrency 4  # <date>-pairs-c4.json

``--against pinned`` and ``--against-args '--stream-interval-ms 12'`` put vramsupply against itself
with one setting changed: what a default costs or gains, in the same alternation.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client import eos_token_id, request_bodies, run_level, stream_completion  # noqa: E402
from run import prepare  # noqa: E402
from servers import (  # noqa: E402
    BENCH_MODEL, REPO, SERVERS as SERVER_SPECS, BenchConfig, RunningServer, ServerSpec, decode_threads, machine_info, running_server, with_args,
    write_results,
)

SERVERS = ("vramsupply", "llama-server")


def vramsupply_with(extra: list[str], name: str) -> ServerSpec:
    """vramsupply at its defaults but for ``extra`` serve arguments (the setting under test)."""
    return with_args(SERVER_SPECS["vramsupply"], extra, name)


def pinned_vramsupply() -> ServerSpec:
    """vramsupply at its defaults but ``--threads`` = the physical cores: the default threads,
    held fixed (no ``engine/thread_tuner.py``), to see what the tuner costs a machine alone."""
    return vramsupply_with(["--threads", str(decode_threads())], "vramsupply-pinned")


@dataclass(frozen=True)
class Timing:
    tok_s: float
    """Completion tokens over the whole request, first byte sent to last byte received."""
    ttft_s: float
    decode_tok_s: float
    """The tokens after the first over the time after it: the per-token path alone."""


async def one(session: aiohttp.ClientSession, server: RunningServer, body: dict) -> Timing:
    started = time.perf_counter()
    result = await stream_completion(session, server.url, body)
    elapsed = time.perf_counter() - started
    if result.error or not result.completion_tokens or result.ttft_s is None:
        raise RuntimeError(f"{server.spec.name}: {result.error or 'no tokens'}")
    return Timing(result.completion_tokens / elapsed, result.ttft_s, (result.completion_tokens - 1) / (elapsed - result.ttft_s))


async def one_round(server: RunningServer, bodies: list[dict]) -> Timing:
    """``len(bodies)`` streams at once, one request each: the round's tok/s and its median first token."""
    results, wall_s = await run_level(server.url, bodies, len(bodies))
    failed = [r for r in results if r.error or not r.completion_tokens or r.ttft_s is None]
    if failed:
        raise RuntimeError(f"{server.spec.name}: {failed[0].error or 'no tokens'}")
    tokens = sum(r.completion_tokens for r in results)
    ttft_s = statistics.median(r.ttft_s for r in results)
    return Timing(tokens / wall_s, ttft_s, (tokens - len(results)) / (wall_s - ttft_s))


async def turn(session: aiohttp.ClientSession, server: RunningServer, index: int, concurrency: int,
               max_tokens: int, eos_id: int) -> Timing:
    """One server's turn of pair ``index``: one request, or one round of ``concurrency`` streams."""
    bodies = request_bodies(server.spec, (index + 1) * concurrency, max_tokens, eos_id)[index * concurrency:]
    if concurrency == 1:
        return await one(session, server, bodies[0])
    return await one_round(server, bodies)


async def pairs(cfg: BenchConfig, model: Path, count: int, max_tokens: int, concurrency: int = 1,
                against: ServerSpec | None = None) -> dict:
    """vramsupply against ``against`` (default llama-server); ratios are vramsupply's over the other's."""
    eos_id = eos_token_id(model)
    specs = [SERVER_SPECS["vramsupply"], against or SERVER_SPECS["llama-server"]]
    ours, theirs = (spec.name for spec in specs)
    timings: dict[str, list[Timing]] = {spec.name: [] for spec in specs}
    with ExitStack() as stack:
        servers = [stack.enter_context(running_server(spec, cfg, model)) for spec in specs]
        await prepare(servers, cfg, eos_id)
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
            for i in range(count):
                for server in servers if i % 2 == 0 else servers[::-1]:
                    timings[server.spec.name].append(await turn(session, server, i, concurrency, max_tokens, eos_id))
        commands = {server.spec.name: server.command for server in servers}
    speeds = {name: [t.tok_s for t in values] for name, values in timings.items()}
    ratios = [a / b for a, b in zip(speeds[ours], speeds[theirs])]
    decode_ratios = [a.decode_tok_s / b.decode_tok_s for a, b in zip(timings[ours], timings[theirs])]
    quartiles = statistics.quantiles(ratios, n=4)
    return {
        "commands": commands,
        "tok_s": {name: [round(v, 1) for v in values] for name, values in speeds.items()},
        "median_tok_s": {name: round(statistics.median(values), 1) for name, values in speeds.items()},
        "pair_ratio_median": round(statistics.median(ratios), 3),
        "pair_ratio_quartiles": [round(quartiles[0], 3), round(quartiles[2], 3)],
        "pairs_vramsupply_ahead": sum(r > 1 for r in ratios),
        "ratio_of_harmonic_means": round(statistics.harmonic_mean(speeds[ours]) / statistics.harmonic_mean(speeds[theirs]), 3),
        "ttft_ms_median": {name: round(1000 * statistics.median(t.ttft_s for t in values), 2) for name, values in timings.items()},
        "decode_tok_s_median": {name: round(statistics.median(t.decode_tok_s for t in values), 1) for name, values in timings.items()},
        "decode_pair_ratio_median": round(statistics.median(decode_ratios), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BENCH_MODEL)
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=1, help="streams per turn (default 1)")
    parser.add_argument("--vramsupply", type=Path, default=REPO / ".venv" / "bin" / "vramsupply")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/<date>-pairs-c<concurrency>.json)")
    parser.add_argument("--against", choices=("llama-server", "pinned"), default="llama-server",
                        help="the other server: llama-server (default), or vramsupply with its threads pinned")
    parser.add_argument("--against-args", help="instead, vramsupply at its defaults but for these serve arguments (quoted), "
                                                "e.g. '--stream-interval-ms 12': a setting's default against another value")
    args = parser.parse_args()
    cfg = BenchConfig(models=(args.model,), servers=SERVERS, concurrency=(args.concurrency,), requests_per_slot=1, max_tokens=args.max_tokens,
                      rounds=1, parallel=0, context_per_slot=0, threads=os.cpu_count() or 1, vramsupply_bin=args.vramsupply,
                      defaults=True, pin_threads=False)
    date = dt.date.today().isoformat()
    report = {"date": date, "machine": machine_info(), "model": str(args.model), "pairs": args.pairs, "concurrency": args.concurrency,
              "max_tokens": args.max_tokens, "settings": "both servers at their own defaults"}
    against = pinned_vramsupply() if args.against == "pinned" else None
    if against:
        report["settings"] = "vramsupply at its defaults against vramsupply with --threads = the physical cores"
    if args.against_args:
        against = vramsupply_with(args.against_args.split(), "vramsupply-with-args")
        report["settings"] = f"vramsupply at its defaults against vramsupply with {args.against_args}"
    report.update(asyncio.run(pairs(cfg, args.model, args.pairs, args.max_tokens, args.concurrency, against)))
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    out = args.out or REPO / "bench" / "results" / f"{date}-pairs-c{args.concurrency}.json"
    write_results(report, out)
    keys = ("median_tok_s", "pair_ratio_median", "pair_ratio_quartiles", "pairs_vramsupply_ahead", "ratio_of_harmonic_means",
            "ttft_ms_median", "decode_tok_s_median", "decode_pair_ratio_median")
    summary = {k: report[k] for k in keys}
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
