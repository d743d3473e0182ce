#!/usr/bin/env python3
"""Two vramsupply builds side by side at one concurrency level, in alternating rounds.

bench/run.py measures each server in turn, and this VM's speed drifts between minutes by more
than a scheduling change moves it. Here both builds serve the bench model at their defaults at the
same time (idle between their turns) and take turns, one round each (``--requests-per-slot``
requests per stream, ``--concurrency`` streams, a new connection per request, as run.py's levels),
the order flipping every round. Reported per build: every round's tok/s, TTFT p50/p95 and peak RSS
(and the RSS once loaded, before any request), their medians, and the median of the
per-round-pair ratios (B over A).

    bench/.cache/venv-llamacpp-server/bin/python bench/ab_level.py --a OLD_VRAMSUPPLY --b NEW_VRAMSUPPLY --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client import RequestResult, eos_token_id, percentile_ms, request_bodies, run_level  # noqa: E402
from servers import BENCH_MODEL, SERVERS, BenchConfig, RunningServer, machine_info, running_server, wait_ready  # noqa: E402


def level_summary(results: list[RequestResult], wall_s: float) -> dict:
    tokens = sum(r.completion_tokens for r in results)
    ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
    return {"tok_s": round(tokens / wall_s, 1), "ttft_mean_ms": round(1000 * sum(ttfts) / max(len(ttfts), 1), 1),
            "ttft_p50_ms": percentile_ms(ttfts, 50), "ttft_p95_ms": percentile_ms(ttfts, 95)}


async def alternate(servers: dict[str, RunningServer], args: argparse.Namespace, eos_id: int) -> dict[str, list[dict]]:
    for server in servers.values():
        await wait_ready(server)
    idle = {}
    for name, server in servers.items():  # loaded, nothing served yet
        server.monitor.start_window()
        idle[name] = round(server.monitor.window_peak_mb(), 1)
    spec = next(iter(servers.values())).spec
    warm = request_bodies(spec, args.concurrency, 16, eos_id)
    for body in warm[1:]:  # prompts long enough (>= 16 tokens) for the engine to learn a prompt token's cost, as any real traffic teaches it
        body["prompt"] = " ".join([body["prompt"]] * 12)
    for server in servers.values():
        await run_level(server.url, warm, args.concurrency)
    rounds: dict[str, list[dict]] = {name: [] for name in servers}
    names = list(servers)
    for index in range(args.rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            bodies = request_bodies(spec, args.requests_per_slot * args.concurrency, args.max_tokens, eos_id)
            servers[name].monitor.start_window()
            results, wall_s = await run_level(servers[name].url, bodies, args.concurrency)
            rounds[name].append({**level_summary(results, wall_s), "peak_rss_mb": round(servers[name].monitor.window_peak_mb(), 1), "idle_rss_mb": idle[name]})
            print(f"round {index} {name}: {rounds[name][-1]}", flush=True)
    return rounds


def report(rounds: dict[str, list[dict]]) -> dict:
    a, b = rounds["a"], rounds["b"]
    out = {}
    for name, levels in rounds.items():
        out[name] = {key: statistics.median(level[key] for level in levels) for key in ("tok_s", "ttft_mean_ms", "ttft_p50_ms", "ttft_p95_ms", "peak_rss_mb", "idle_rss_mb")}
    out["b_over_a_tok_s_median_pair"] = round(statistics.median(y["tok_s"] / x["tok_s"] for x, y in zip(a, b)), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=Path, required=True, help="the first vramsupply executable (the baseline)")
    parser.add_argument("--b", type=Path, required=True, help="the second vramsupply executable")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests-per-slot", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    args = parser.parse_args()
    model = BENCH_MODEL
    cfg = BenchConfig(models=(model,), servers=("vramsupply",), concurrency=(args.concurrency,), requests_per_slot=args.requests_per_slot,
                      max_tokens=args.max_tokens, rounds=args.rounds, parallel=0, context_per_slot=0, threads=0, vramsupply_bin=args.a, defaults=True)
    spec = SERVERS["vramsupply"]
    eos_id = eos_token_id(model)
    with ExitStack() as stack:
        servers = {name: stack.enter_context(running_server(replace(spec, name=f"vramsupply-{name}"), replace(cfg, vramsupply_bin=binary), model))
                   for name, binary in (("a", args.a), ("b", args.b))}
        rounds = asyncio.run(alternate(servers, args, eos_id))
    result = {"date": dt.date.today().isoformat(), "machine": machine_info(), "a": str(args.a), "b": str(args.b),
              "concurrency": args.concurrency, "requests_per_slot": args.requests_per_slot, "max_tokens": args.max_tokens,
              "rounds": rounds, "summary": report(rounds)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
