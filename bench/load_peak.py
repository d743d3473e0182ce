#!/usr/bin/env python3
"""Peak memory while a server loads, which a sampled RSS may miss: the kernel's ``VmHWM`` beside it.

llama.cpp zeroes a KV cache in host memory when it makes it (``ggml_backend_buffer_clear``), so
every page of it is committed at load, however little of it is used later. vramsupply hands the
zeroed pages back after its warm-up (``engine/host_pages.py``), so its RSS falls again, but the
peak stays. With one stream of the whole context per slot (``--kv-per-slot``) that buffer is the
slots' number times larger. This starts each configuration in turn, waits until it answers, reads
the kernel's high-water mark and the current RSS, sends one burst of 16 short requests, and reads
both again. vramsupply also runs with llama-server's context (4,096 cells for the bench model), which
tells its larger shared cache's part of the difference from Python's.

    bench/.cache/venv-llamacpp-server/bin/python bench/load_peak.py     # ~3 min
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import BENCH_MODEL, REPO, SERVERS, BenchConfig, RunningServer, machine_info, running_server, status_mb, versions, wait_ready, with_args, write_results  # noqa: E402

CONFIGS = {
    "vramsupply": SERVERS["vramsupply"],
    # llama-server's cache size at its defaults (4,096 cells for this model), to tell the cache's share from Python's
    "vramsupply-context-4096": with_args(SERVERS["vramsupply"], ["--context-length", "4096"], "vramsupply-context-4096"),
    "vramsupply-kv-per-slot-16": with_args(SERVERS["vramsupply"], ["--kv-per-slot", "--parallel", "16"], "vramsupply-kv-per-slot-16"),
    "llama-server": SERVERS["llama-server"],
}


async def burst(url: str, streams: int, max_tokens: int) -> None:
    """``streams`` completions at once, each of ``max_tokens`` tokens (``ignore_eos``), none streamed."""
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        async def one() -> None:
            async with session.post(url + "/v1/completions", json=body) as resp:
                resp.raise_for_status()
                await resp.read()
        await asyncio.gather(*(one() for _ in range(streams)))


def readings(server: RunningServer) -> dict[str, float]:
    """The kernel's peak so far, the RSS now and the monitor's sampled peak, in MB."""
    return {"high_water_mb": round(server.monitor.high_water_mb(), 1), "rss_mb": round(status_mb(server.proc.pid, "VmRSS"), 1),
            "sampled_peak_mb": round(server.monitor.total_peak_mb(), 1)}


async def measure(name: str, cfg: BenchConfig, model: Path, streams: int, max_tokens: int) -> dict:
    with running_server(CONFIGS[name], cfg, model) as server:
        await wait_ready(server)
        await asyncio.sleep(2)
        loaded = readings(server)
        await burst(server.url, streams, max_tokens)
        await asyncio.sleep(1)
        after = readings(server)
    print(f"{name:28} loaded: peak {loaded['high_water_mb']:7.1f} MB, now {loaded['rss_mb']:7.1f} (sampled peak {loaded['sampled_peak_mb']:.1f})"
          f"  after {streams} requests: peak {after['high_water_mb']:7.1f}, now {after['rss_mb']:7.1f}", flush=True)
    return {"command": CONFIGS[name].command(cfg, model, 0), "loaded": loaded, "after_burst": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BENCH_MODEL)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--vramsupply", type=Path, default=REPO / ".venv" / "bin" / "vramsupply")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/<date>-load-peak.json)")
    args = parser.parse_args()
    if min(args.rounds, args.streams, args.max_tokens) < 1:
        parser.error("--rounds, --streams and --max-tokens must be at least 1")
    cfg = BenchConfig(models=(args.model,), servers=tuple(CONFIGS), concurrency=(args.streams,), requests_per_slot=1,
                      max_tokens=args.max_tokens, rounds=args.rounds, parallel=0, context_per_slot=0, threads=os.cpu_count() or 1,
                      vramsupply_bin=args.vramsupply, defaults=True, pin_threads=False)
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name in CONFIGS:
            runs[name].append(asyncio.run(measure(name, cfg, args.model, args.streams, args.max_tokens)))
    report = {"date": dt.date.today().isoformat(), "machine": machine_info(), "versions": versions(cfg), "model": str(args.model),
              "streams": args.streams, "max_tokens": args.max_tokens, "servers": runs}
    out = args.out or REPO / "bench" / "results" / f"{report['date']}-load-peak.json"
    write_results(report, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
