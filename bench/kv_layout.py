#!/usr/bin/env python3
"""What one shared KV cache costs the decode itself: llama-batched-bench in both layouts, in turns.

Both servers at their defaults keep one KV cache for all their slots (llama.cpp's ``kv_unified``),
so that any one request may use the whole context. llama-batched-bench, the stretch target's
reference, gives each sequence a stream of its own by default. With one shared cache every token's
attention runs over every cell in use, all sequences' together, masked; with a stream each, over
its own sequence's cells only. This runs the two layouts in alternating pairs (the order flipping
every pair, as bench/pairs.py does for servers) and reports each pair's ratio, shared over
per-sequence, so the VM's drift from minute to minute cancels out.

    bench/.cache/venv-llamacpp-server/bin/python bench/kv_layout.py     # 10 pairs at 16 sequences, ~2 min
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import raw_decode_limit  # noqa: E402
from servers import BENCH_MODEL, REPO, BenchConfig, machine_info  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BENCH_MODEL)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/<date>-kv-layout.json)")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    cfg = BenchConfig(models=(args.model,), servers=(), concurrency=(args.sequences,), requests_per_slot=1, max_tokens=128,
                      rounds=1, parallel=16, context_per_slot=512, threads=threads, vramsupply_bin=REPO / ".venv" / "bin" / "vramsupply")  # unused: no server runs
    speeds: dict[str, list[float]] = {"per_sequence": [], "shared": []}
    for i in range(args.pairs):
        for shared in (False, True) if i % 2 == 0 else (True, False):
            tok_s = raw_decode_limit(cfg, args.model, shared_kv=shared)[args.sequences]
            speeds["shared" if shared else "per_sequence"].append(tok_s)
            print(f"pair {i}: {'shared' if shared else 'per-sequence'} {tok_s} tok/s", flush=True)
    ratios = [s / p for s, p in zip(speeds["shared"], speeds["per_sequence"])]
    report = {
        "date": dt.date.today().isoformat(), "machine": machine_info(), "model": str(args.model),
        "sequences": args.sequences, "threads": threads, "context": cfg.parallel * cfg.context_per_slot,
        "tok_s": speeds, "shared_over_per_sequence_median_pair": round(statistics.median(ratios), 3),
        "pair_ratios": [round(r, 3) for r in ratios],
    }
    out = args.out or REPO / "bench" / "results" / f"{report['date']}-kv-layout.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("shared_over_per_sequence_median_pair", "pair_ratios")}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
