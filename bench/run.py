#!/usr/bin/env python3
"""Benchmark vramsupply's OpenAI endpoint against llama.cpp's llama-server and llama-cpp-python's server.

Every server serves the same GGUF with the same slots, per-slot context and threads. The load is
streaming POST /v1/completions (temperature 0, ignore_eos, max_tokens 128, a short prompt) at
concurrency 1, 4 and 16 with 2×c requests per level and a new connection per request.

Absolute numbers differ between machines and runs, so the targets are checked as ratios of numbers
taken in this one run. To keep a busy machine from deciding a ratio, all servers of a model run
side by side (idle ones cost nothing) and are measured in turn, level by level, in a rotated order;
the sweep is repeated for several rounds and each (server, level, metric) reports its best round,
the one least slowed by other processes. Every round's numbers, and the CPU other processes used
during each measurement, are kept in the JSON.

This file is the sweep itself; the servers and the machine are in bench/servers.py, the streaming
client in bench/client.py, and the best rounds, targets, table and chart in bench/report.py.

Prepare with `bench/build_anchors.sh`, then run with the bench venv it creates:
    bench/.cache/venv-llamacpp-server/bin/python bench/run.py            # full run, writes bench/results/
    bench/.cache/venv-llamacpp-server/bin/python bench/run.py --quick    # smoke run, writes bench/.cache/quick/
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import psutil

from client import LevelResult, eos_token_id, percentile_ms, request_bodies, run_level
from report import rereport, summarize, write_outputs
from servers import (
    BENCH_MODEL, CACHE, LLAMA_BIN, REPO, SERVERS, TINY_MODEL, BenchConfig, RunningServer, busy_cpu_seconds, machine_info,
    running_server, versions, wait_ready,
)


async def measure(server: RunningServer, cfg: BenchConfig, round_index: int, concurrency: int, eos_id: int) -> LevelResult:
    """One level against one server, with the CPU that the server, this client and everything else used."""
    bodies = request_bodies(server.spec, cfg.requests_per_slot * concurrency, cfg.max_tokens, eos_id)
    client = psutil.Process()
    server.monitor.start_window()
    server_cpu, client_cpu, machine_cpu = server.monitor.cpu_seconds(), client.cpu_times(), busy_cpu_seconds()
    results, wall_s = await run_level(server.url, bodies, concurrency)
    server_cpu = server.monitor.cpu_seconds() - server_cpu
    client_now = client.cpu_times()
    client_cpu = (client_now.user + client_now.system) - (client_cpu.user + client_cpu.system)
    other_cpu = max(0.0, busy_cpu_seconds() - machine_cpu - server_cpu - client_cpu)

    ok = [r for r in results if r.error is None]
    completed = [r for r in ok if r.finish_reason == "length"]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tokens = sum(r.completion_tokens for r in ok)
    errors = [r.error for r in results if r.error is not None]
    return LevelResult(
        round=round_index,
        concurrency=concurrency,
        requests=len(results),
        completed=len(completed),
        cut_off=len(ok) - len(completed),
        errors=len(errors),
        completion_tokens=tokens,
        wall_s=round(wall_s, 3),
        tok_s=round(tokens / wall_s, 1),
        ttft_p50_ms=percentile_ms(ttfts, 50),
        ttft_p95_ms=percentile_ms(ttfts, 95),
        peak_rss_mb=round(server.monitor.window_peak_mb(), 1),
        server_cpu_s=round(server_cpu, 2),
        client_cpu_s=round(client_cpu, 2),
        other_cpu_cores=round(other_cpu / wall_s, 2),
        tokens_counted_by=",".join(sorted({r.tokens_counted_by for r in ok})) or "-",
        first_error=errors[0] if errors else None,
    )


async def prepare(servers: list[RunningServer], cfg: BenchConfig, eos_id: int) -> None:
    """Wait until every server is ready, then warm each up alone and at full width
    (the first decodes of a new batch shape are slow everywhere)."""
    for server in servers:
        started = time.perf_counter()
        await wait_ready(server)
        server.load_s = round(time.perf_counter() - started, 2)
    for server in servers:
        await run_level(server.url, request_bodies(server.spec, 1, 16, eos_id), 1)
        await run_level(server.url, request_bodies(server.spec, max(cfg.concurrency), 8, eos_id), max(cfg.concurrency))


def raw_decode_limit(cfg: BenchConfig, model: Path, shared_kv: bool = False) -> dict[int, float]:
    """llama-batched-bench on the same build: decode speed with no server in the way.

    By default each sequence gets its own stream of the KV cache, and attends only to its own
    cells: the stretch target's reference. With ``shared_kv`` (``-kvu``) the sequences share one
    cache, the layout of both servers at their defaults (so that one request may use the whole
    context): every token then scans every used cell of all of them, masked."""
    command = [
        str(LLAMA_BIN / "llama-batched-bench"), "-m", str(model), "-c", str(cfg.parallel * cfg.context_per_slot),
        "-b", "2048", "-ub", "512", "-npp", "8", "-ntg", str(cfg.max_tokens),
        "-npl", ",".join(str(c) for c in cfg.concurrency), "-t", str(cfg.threads), "-tb", str(cfg.threads),
        "--output-format", "jsonl", *(["-kvu"] if shared_kv else []),
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {row["pl"]: round(row["speed_tg"], 1) for row in rows}


async def bench_model(cfg: BenchConfig, model: Path) -> dict:
    eos_id = eos_token_id(model)
    raw_rounds: list[dict[int, float]] = []
    shared_rounds: list[dict[int, float]] = []
    with ExitStack() as stack:
        servers = [stack.enter_context(running_server(SERVERS[name], cfg, model)) for name in cfg.servers]
        await prepare(servers, cfg, eos_id)
        for round_index in range(cfg.rounds):
            print(f"{model.name}, round {round_index + 1} of {cfg.rounds}, load average {os.getloadavg()[0]:.2f}", flush=True)
            raw_rounds.append(await asyncio.to_thread(raw_decode_limit, cfg, model))
            shared_rounds.append(await asyncio.to_thread(raw_decode_limit, cfg, model, True))
            print("  raw decode limit: " + ", ".join(f"c={c} {v} tok/s" for c, v in raw_rounds[-1].items())
                  + "; one shared KV cache: " + ", ".join(f"c={c} {v}" for c, v in shared_rounds[-1].items()), flush=True)
            await measure_round(servers, cfg, round_index, eos_id)
        servers_report = {server.spec.name: server_report(server) for server in servers}
    report = {
        "path": str(model),
        "size_mb": round(model.stat().st_size / 2**20, 1),
        "raw_decode_rounds": [{str(c): v for c, v in r.items()} for r in raw_rounds],
        "raw_decode_shared_kv_rounds": [{str(c): v for c, v in r.items()} for r in shared_rounds],
        "servers": servers_report,
    }
    summarize(report, list(cfg.concurrency))
    return report


async def measure_round(servers: list[RunningServer], cfg: BenchConfig, round_index: int, eos_id: int) -> None:
    """Every level of one round, level by level, the servers in turn in an order rotated by one each round."""
    shift = round_index % len(servers)
    for concurrency in cfg.concurrency:
        for server in servers[shift:] + servers[:shift]:
            level = await measure(server, cfg, round_index, concurrency, eos_id)
            server.levels.append(level)
            print(f"  {server.spec.name:28} c={concurrency:<3} {level.tok_s:8.1f} tok/s  "
                  f"TTFT p50 {level.ttft_p50_ms} ms  p95 {level.ttft_p95_ms} ms  RSS {level.peak_rss_mb:.0f} MB  "
                  f"done {level.completed}/{level.requests}  others {level.other_cpu_cores} cores", flush=True)


def server_report(server: RunningServer) -> dict:
    """One server's part of a model's report: how it ran, and every round's levels (summarize adds the best)."""
    return {
        "mode": server.spec.mode,
        "command": server.command,
        "load_s": server.load_s,
        "peak_rss_mb": round(server.monitor.total_peak_mb(), 1),
        "peak_rss_kernel_mb": round(server.monitor.high_water_mb(), 1),  # VmHWM: the load's peak too
        "rounds": [asdict(lvl) for lvl in server.levels],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: stories260K only, one round, c requests per level, 32 tokens, output to bench/.cache/quick")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset of: " + ", ".join(SERVERS))
    parser.add_argument("--models", help="comma-separated GGUF paths (default: the bench model and stories260K)")
    parser.add_argument("--rounds", type=int, help="repeat the sweep this many times and report the best of them (default 4; --quick: 1)")
    parser.add_argument("--defaults", action="store_true",
                        help="start every server with its own defaults (slots, context, threads); the raw limit keeps --threads")
    parser.add_argument("--threads", type=int, help="threads for every server (default: all CPUs; with --defaults: each server's own)")
    parser.add_argument("--parallel", type=int, default=16, help="slots on the batching servers (default 16)")
    parser.add_argument("--context-per-slot", type=int, default=512, help="context per slot (default 512)")
    parser.add_argument("--vramsupply", type=Path, default=REPO / ".venv" / "bin" / "vramsupply",
                        help="the vramsupply command to bench (default: the project venv's)")
    parser.add_argument("--out-dir", type=Path, help="where the JSON and PNG go (default bench/results)")
    parser.add_argument("--rereport", type=Path, metavar="JSON",
                        help="measure nothing: recompute the summary, targets, table and chart from the rounds in a results JSON")
    return parser


def parse_args() -> tuple[BenchConfig, Path] | Path:
    parser = build_parser()
    args = parser.parse_args()
    if args.rereport:
        return args.rereport

    servers = tuple(name.strip() for name in args.servers.split(",") if name.strip())
    unknown = [name for name in servers if name not in SERVERS]
    if unknown:
        parser.error(f"unknown server(s) {', '.join(unknown)}; choose from {', '.join(SERVERS)}")
    if args.models:
        models = tuple(Path(m).resolve() for m in args.models.split(","))
    else:
        models = (TINY_MODEL,) if args.quick else (BENCH_MODEL, TINY_MODEL)
    needed = list(models) + [LLAMA_BIN / "llama-server", LLAMA_BIN / "llama-batched-bench"]
    if "vramsupply" in servers:
        needed.append(args.vramsupply)
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        parser.error(f"missing {', '.join(missing)}; run bench/build_anchors.sh first")
    cfg = BenchConfig(
        models=models,
        servers=servers,
        concurrency=(1, 4, 16),
        requests_per_slot=1 if args.quick else 2,
        max_tokens=32 if args.quick else 128,
        rounds=args.rounds or (1 if args.quick else 4),
        parallel=args.parallel,
        context_per_slot=args.context_per_slot,
        threads=args.threads or os.cpu_count(),
        vramsupply_bin=args.vramsupply,
        defaults=args.defaults,
        pin_threads=args.threads is not None,
    )
    out_dir = args.out_dir or (CACHE / "quick" if args.quick else REPO / "bench" / "results")
    return cfg, out_dir


def main() -> None:
    parsed = parse_args()
    if isinstance(parsed, Path):
        rereport(parsed)
        return
    cfg, out_dir = parsed
    date = dt.date.today().isoformat()
    report: dict = {
        "date": date,
        "machine": machine_info(),
        "versions": versions(cfg),
        "config": {**asdict(cfg), "models": [str(m) for m in cfg.models], "vramsupply_bin": str(cfg.vramsupply_bin),
                   "prompt": "a short distinct prompt per request (~5 tokens)", "temperature": 0,
                   "stream": True, "new_connection_per_request": True},
        "models": {},
    }
    print(f"load average {report['machine']['load_avg_at_start']}, {cfg.threads} threads", flush=True)
    started = time.perf_counter()
    for model in cfg.models:
        report["models"][model.name] = asyncio.run(bench_model(cfg, model))
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    report["duration_s"] = round(time.perf_counter() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_outputs(report, out_dir / f"{date}{'-defaults' if cfg.defaults else ''}.json")


if __name__ == "__main__":
    main()
