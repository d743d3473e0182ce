#!/usr/bin/env python3
"""The stretch target in alternating pairs: vramsupply at 16 streams against llama-batched-bench, a turn each.

The sweep (``run.py``) compares vramsupply's best c=16 round with the best of the raw decode's
rounds, each measured minutes apart, and on this shared VM the raw decode limit itself moves by
10-20 % between rounds of one run. Here vramsupply runs at its defaults, and each pair is one
round of 16 streams of 128 tokens from it (as the sweep's c=16 level: a new connection per
request, tokens over the round's wall time) and one run of ``llama-batched-bench`` at 16 sequences
in each KV layout (a stream per sequence, the target's reference, and one shared cache, the
layout both servers use at their defaults), the order flipping every pair. Each pair's ratio
compares measurements a few seconds apart; the report is their median and quartiles.

The raw tool reports its decode speed alone (``speed_tg``), with no prefill; the round's tokens
over its wall time include each wave's prompts and first tokens, as the sweep's do. The speed
after the round's median first token is given beside it (``decode``), the closer like for like.

    bench/.cache/venv-llamacpp-server/bin/python bench/stretch_pairs.py     # 12 pairs, ~4 min
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client import eos_token_id, request_bodies  # noqa: E402
from pairs import Timing, one_round  # noqa: E402
from run import prepare, raw_decode_limit  # noqa: E402
from servers import BENCH_MODEL, REPO, SERVERS, BenchConfig, RunningServer, machine_info, running_server, versions, write_results  # noqa: E402

STREAMS = 16
LAYOUTS = ("per_sequence", "shared")


def raw_turn(cfg: BenchConfig, model: Path) -> dict[str, float]:
    """One run of llama-batched-bench at ``STREAMS`` sequences in each layout: decode tok/s."""
    return {layout: raw_decode_limit(cfg, model, shared_kv=layout == "shared")[STREAMS] for layout in LAYOUTS}


async def server_turn(server: RunningServer, index: int, cfg: BenchConfig, eos_id: int) -> Timing:
    bodies = request_bodies(server.spec, (index + 1) * STREAMS, cfg.max_tokens, eos_id)[index * STREAMS:]
    return await one_round(server, bodies)


async def stretch_pairs(cfg: BenchConfig, model: Path, count: int) -> dict:
    eos_id = eos_token_id(model)
    rounds: list[Timing] = []
    raw: list[dict[str, float]] = []
    with running_server(SERVERS["vramsupply"], cfg, model) as server:
        await prepare([server], cfg, eos_id)
        for i in range(count):
            if i % 2 == 0:
                rounds.append(await server_turn(server, i, cfg, eos_id))
                raw.append(raw_turn(cfg, model))
            else:
                raw.append(raw_turn(cfg, model))
                rounds.append(await server_turn(server, i, cfg, eos_id))
            print(f"pair {i}: vramsupply {rounds[-1].tok_s:.1f} tok/s (decode {rounds[-1].decode_tok_s:.1f}), "
                  f"raw {raw[-1]['per_sequence']} per sequence / {raw[-1]['shared']} shared", flush=True)
        command = server.command
        peak_rss_mb = round(server.monitor.total_peak_mb(), 1)
        peak_rss_kernel_mb = round(server.monitor.high_water_mb(), 1)  # VmHWM, the load's too
    return {"command": command, "peak_rss_mb": peak_rss_mb, "peak_rss_kernel_mb": peak_rss_kernel_mb, **summary(rounds, raw)}


def summary(rounds: list[Timing], raw: list[dict[str, float]]) -> dict:
    report: dict = {
        "vramsupply_tok_s": [round(t.tok_s, 1) for t in rounds],
        "vramsupply_decode_tok_s": [round(t.decode_tok_s, 1) for t in rounds],
        "vramsupply_ttft_ms_median": [round(1000 * t.ttft_s, 1) for t in rounds],
        "raw_tok_s": {layout: [r[layout] for r in raw] for layout in LAYOUTS},
    }
    for layout in LAYOUTS:
        for name, speeds in (("", [t.tok_s for t in rounds]), ("decode_", [t.decode_tok_s for t in rounds])):
            ratios = [s / r[layout] for s, r in zip(speeds, raw)]
            quartiles = statistics.quantiles(ratios, n=4)
            report[f"{name}over_{layout}_median"] = round(statistics.median(ratios), 3)
            report[f"{name}over_{layout}_quartiles"] = [round(quartiles[0], 3), round(quartiles[2], 3)]
            report[f"{name}over_{layout}_pairs"] = [round(r, 3) for r in ratios]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BENCH_MODEL)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--vramsupply", type=Path, default=REPO / ".venv" / "bin" / "vramsupply")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/<date>-stretch-pairs.json)")
    args = parser.parse_args()
    if args.pairs < 2 or args.max_tokens < 2:
        parser.error("--pairs and --max-tokens must be at least 2")
    # The raw tool's context as the sweep gives it (16 x 512); vramsupply gets no flags (its defaults).
    cfg = BenchConfig(models=(args.model,), servers=("vramsupply",), concurrency=(STREAMS,), requests_per_slot=1,
                      max_tokens=args.max_tokens, rounds=1, parallel=16, context_per_slot=512, threads=os.cpu_count() or 1,
                      vramsupply_bin=args.vramsupply, defaults=True, pin_threads=False)
    report = {"date": dt.date.today().isoformat(), "machine": machine_info(), "versions": versions(cfg), "model": str(args.model),
              "pairs": args.pairs, "streams": STREAMS, "max_tokens": args.max_tokens,
              **asyncio.run(stretch_pairs(cfg, args.model, args.pairs))}
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    out = args.out or REPO / "bench" / "results" / f"{report['date']}-stretch-pairs.json"
    write_results(report, out)
    print(json.dumps({k: v for k, v in report.items() if k.endswith(("_median", "_quartiles"))}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
