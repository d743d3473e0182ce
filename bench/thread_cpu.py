#!/usr/bin/env python3
"""Whose CPU a token costs: each server's threads, read from /proc, at one concurrency.

The profile (bench/profile.py) samples vramsupply alone; this compares both servers at their
defaults on the same load. Each turn streams ``--requests`` 128-token completions at
``--concurrency`` (run.py's short prompts, a new connection each) to one server, the servers taking
turns, and reads every thread's user and system CPU time (psutil) before and after. A server's
busiest threads, as many as the machine has physical cores (both servers' default thread count),
are the ones that compute the graph: the thread that calls ``llama_decode`` and its OpenMP
workers. So their CPU includes whatever that calling thread does between decodes; every other
thread serves HTTP. Both are reported per completion token.

    bench/.cache/venv-llamacpp-server/bin/python bench/thread_cpu.py --concurrency 4   # ~3 min
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client import eos_token_id, request_bodies, run_level  # noqa: E402
from marketplace import default_spec  # noqa: E402
from servers import BENCH_MODEL, REPO, defaults_config, machine_info, running_server, wait_ready  # noqa: E402

COMPUTE_THREADS = psutil.cpu_count(logical=False) or os.cpu_count() or 1


def thread_times(pid: int) -> dict[int, tuple[float, float]]:
    """(user, system) CPU seconds of every thread of ``pid``."""
    return {thread.id: (thread.user_time, thread.system_time) for thread in psutil.Process(pid).threads()}


def split(before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]) -> dict[str, float]:
    """Milliseconds of CPU: the compute threads together, and the other threads' user and system."""
    used = sorted(((u - before.get(t, (0, 0))[0], s - before.get(t, (0, 0))[1]) for t, (u, s) in after.items()),
                  key=lambda pair: -sum(pair))
    compute, rest = used[:COMPUTE_THREADS], used[COMPUTE_THREADS:]
    return {"compute_ms": sum(u + s for u, s in compute) * 1000,
            "serving_user_ms": sum(u for u, _ in rest) * 1000,
            "serving_system_ms": sum(s for _, s in rest) * 1000}


async def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    cfg, eos = defaults_config(BENCH_MODEL, args.vramsupply), eos_token_id(BENCH_MODEL)
    totals: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        servers = [stack.enter_context(running_server(default_spec(name), cfg, BENCH_MODEL))
                   for name in ("vramsupply", "llama-server")]
        for server in servers:
            await wait_ready(server)
        for turn in range(args.rounds):
            for server in servers if turn % 2 == 0 else servers[::-1]:
                before = thread_times(server.proc.pid)
                results, wall = await run_level(server.url, request_bodies(server.spec, args.requests, 128, eos), args.concurrency)
                used = split(before, thread_times(server.proc.pid))
                total = totals.setdefault(server.spec.name, {"tokens": 0, "wall_s": 0.0})
                total["tokens"] += sum(result.completion_tokens for result in results)
                total["wall_s"] += wall
                for key, value in used.items():
                    total[key] = total.get(key, 0.0) + value
    return totals


def per_token(totals: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    report = {}
    for name, total in totals.items():
        tokens = total["tokens"]
        report[name] = {"tok_s": round(tokens / total["wall_s"], 1),
                        **{key.replace("_ms", "_ms_per_token"): round(total[key] / tokens, 4)
                           for key in ("compute_ms", "serving_user_ms", "serving_system_ms")}}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8, help="requests a turn (default 8)")
    parser.add_argument("--rounds", type=int, default=16, help="turns of each server (default 16)")
    parser.add_argument("--vramsupply", type=Path, default=REPO / ".venv" / "bin" / "vramsupply")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/<date>-thread-cpu-c<N>.json)")
    args = parser.parse_args()
    if min(args.concurrency, args.requests, args.rounds) < 1:
        parser.error("--concurrency, --requests and --rounds must be at least 1")
    out = args.out or REPO / "bench" / "results" / f"{dt.date.today()}-thread-cpu-c{args.concurrency}.json"
    report = per_token(asyncio.run(measure(args)))
    out.write_text(json.dumps({"date": dt.date.today().isoformat(), "machine": machine_info(), "concurrency": args.concurrency,
                               "requests_per_turn": args.requests, "rounds": args.rounds, "per_token": report}, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
