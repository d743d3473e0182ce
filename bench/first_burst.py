#!/usr/bin/env python3
"""A burst of 16 short prompts at once, the first right after the engine loaded and then again.

Right after ``serve`` starts, the pacer knows no prefill speed (``engine/pacing.py``): it learns it
from steps of at least ``MIN_CHUNK`` prompt rows. This times, in one process and without HTTP, when
each of 16 greedy requests of 9 prompt tokens (8 answer tokens each) gets its first token, for the
first burst after load and for the bursts after it, and which rows each of the first decode steps
held. The bench's other scripts warm every server up before they measure, so they never see the
first burst.

    .venv/bin/python bench/first_burst.py                  # ~30 s; bench/results/<date>-first-burst.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from vramsupply.engine.engine import Engine  # noqa: E402
from vramsupply.engine.types import EngineOptions, GenerationRequest, SamplingParams  # noqa: E402
from vramsupply.server import loop  # noqa: E402
from step_sections import BENCH_MODEL, Timings  # noqa: E402

STEPS_SHOWN = 6
timings = Timings()  # its decodes: (rows, start, end) of every llama_decode


async def burst(engine: Engine, index: int) -> dict:
    requests = [GenerationRequest(prompt=engine.tokenize(f"Once upon a time {index} {i}"), sampling=SamplingParams(temperature=0),
                                  max_tokens=8, ignore_eos=True) for i in range(16)]
    timings.clear()
    start, firsts = time.perf_counter(), []

    async def one(request: GenerationRequest) -> None:
        generation = engine.submit(request)
        async for _ in generation:
            firsts.append(round(1000 * (time.perf_counter() - start), 1))
            break
        await generation.collect()

    await asyncio.gather(*(one(request) for request in requests))
    firsts.sort()
    steps = [{"rows": rows, "start_ms": round(1000 * (a - start), 1), "ms": round(1000 * (b - a), 1)} for rows, a, b in timings.decodes[:STEPS_SHOWN]]
    return {"burst": index, "first_token_ms": firsts, "median_ms": firsts[len(firsts) // 2], "last_ms": firsts[-1], "steps": steps}


async def run(model: Path, bursts: int) -> list[dict]:
    with Engine.load(EngineOptions(model_path=model)) as engine:
        results = []
        for index in range(bursts):
            results.append(await burst(engine, index))
            print(f"burst {index}: first tokens median {results[-1]['median_ms']} ms, the 16th {results[-1]['last_ms']} ms; "
                  f"first steps' rows {[s['rows'] for s in results[-1]['steps']]}", flush=True)
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BENCH_MODEL)
    parser.add_argument("--bursts", type=int, default=4, help="bursts in one process, the first right after load (default 4)")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/<date>-first-burst.json)")
    args = parser.parse_args()
    if not args.model.exists():
        sys.exit(f"bench model not found: {args.model} (run bench/build_anchors.sh)")
    if args.bursts < 1:
        sys.exit("--bursts must be at least 1")
    timings.wrap_decode()
    results = loop.run(run(args.model, args.bursts))
    out = args.out or REPO / "bench" / "results" / f"{dt.date.today().isoformat()}-first-burst.json"
    out.write_text(json.dumps({"date": dt.date.today().isoformat(), "model": str(args.model), "bursts": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
