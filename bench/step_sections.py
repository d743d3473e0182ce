#!/usr/bin/env python3
"""The scheduler's Python between two decodes, section by section, at 1, 4 and 16 greedy streams.

At four streams vramsupply trails llama-server by about 1.5 % (README, "Both servers' threads"),
and what it does beyond llama-server there is the serial part of a step: the Python that runs on
the scheduler thread between one ``llama_decode`` and the next, while the decode's other thread
spins. Served tok/s on the 2-core bench VM spreads by more than that part weighs, so this bench
times it directly: the engine runs in this process (no HTTP), ``--streams`` greedy 128-token
requests at a time on the event loop ``serve`` runs on (uvloop), and every section of ``Scheduler._serve_once`` is wrapped with a timer (wall
and this thread's CPU). Reported per section: calls per step, microseconds per step (the sum over
the run divided by the decode steps) and the median call; and the gap between two decodes of
the streams alone (the steady state, no prompt rows), which is the serial time itself.

The wrappers add about a microsecond a call, so the sections sum to a little more than the gap.
On a GPU the decode is shorter and the same Python weighs more; this measures the CPU build.

``--against-raw N`` puts the engine's steps beside the stretch target's reference: each level runs
N times, each time after ``llama-batched-bench`` at as many sequences (per-sequence KV, then one
shared KV cache, ``-kvu``, the layout the engine uses), so the VM's drift falls on both alike. Per
time: the engine's step (the median decode plus the median gap) against the raw tool's time per
generated token of each sequence.

    .venv/bin/python bench/step_sections.py                 # ~2 min; bench/results/<date>-step-sections.json
    .venv/bin/python bench/step_sections.py --streams 16 --rounds 2 --against-raw 3   # ~2 min
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import llama_cpp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from vramsupply.engine import admission, outbox, pacing, rows, sampling, scheduler, step  # noqa: E402
from vramsupply.engine.engine import Engine  # noqa: E402
from vramsupply.engine.types import EngineOptions, GenerationRequest, SamplingParams  # noqa: E402
from vramsupply.server import loop  # noqa: E402

BENCH_MODEL = REPO / "bench" / ".cache" / "bench-llama-768x12-q8_0.gguf"
BATCHED_BENCH = REPO / "bench" / ".cache" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "build" / "bin" / "llama-batched-bench"
"""Built by bench/build_anchors.sh from the llama.cpp commit the project's llama-cpp-python vendors."""
SECTIONS = [
    (scheduler.Scheduler, "_drain_inbox"), (admission.Admission, "admit"), (scheduler.Scheduler, "_take_sampled"),
    (pacing.PrefillPacer, "plan"), (step.StepRunner, "_fill_batch"), (rows.RowSampler, "sample"),
    (sampling.StepWinners, "_take"), (outbox.Outbox, "token"), (pacing.PrefillPacer, "observe"),
    (step.StepRunner, "_make_checkpoints"), (outbox.Outbox, "flush"),
]
"""What ``_serve_once`` does around the decode; ``_take`` (the step's argmax) and ``token`` (text
and events, ``outbox.py``) run inside ``sample``."""


class Timings:
    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = collections.defaultdict(list)
        self.cpu: dict[str, list[float]] = collections.defaultdict(list)
        self.decodes: list[tuple[int, float, float]] = []  # (rows, start, end)

    def wrap(self, owner: type, name: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.wall[name].append(time.perf_counter() - wall)
                self.cpu[name].append(time.thread_time() - cpu)

        setattr(owner, name, timed)

    def wrap_decode(self) -> None:
        decode = llama_cpp.llama_decode

        def timed(ctx, batch):
            start = time.perf_counter()
            status = decode(ctx, batch)
            self.decodes.append((batch.n_tokens, start, time.perf_counter()))
            return status

        llama_cpp.llama_decode = timed

    def clear(self) -> None:
        self.wall.clear()
        self.cpu.clear()
        self.decodes.clear()

    def report(self, streams: int) -> dict:
        steps = len(self.decodes)
        steady = [(a, b) for a, b in zip(self.decodes, self.decodes[1:]) if a[0] == streams and b[0] == streams]
        sections = {
            name: {"calls_per_step": round(len(self.wall[name]) / steps, 2),
                   "us_per_step": round(1e6 * sum(self.wall[name]) / steps, 1),
                   "cpu_us_per_step": round(1e6 * sum(self.cpu[name]) / steps, 1),
                   "median_call_us": round(1e6 * statistics.median(self.wall[name]), 1)}
            for _, name in SECTIONS if self.wall[name]
        }
        return {
            "streams": streams, "steps": steps,
            "gap_between_decodes_us_median": round(1e6 * statistics.median(b[1] - a[2] for a, b in steady), 1),
            "decode_ms_median": round(1e3 * statistics.median(d[2] - d[1] for d in self.decodes if d[0] == streams), 2),
            "sections": sections,
        }


async def measure(engine: Engine, timings: Timings, streams: int, rounds: int) -> dict:
    for round_index in range(rounds + 1):  # the first round warms up and is not counted
        if round_index == 1:
            timings.clear()
        requests = [
            GenerationRequest(prompt=engine.tokenize(f"Once upon a time {round_index} {i}"), sampling=SamplingParams(temperature=0),
                              max_tokens=128, ignore_eos=True)
            for i in range(streams)
        ]
        await asyncio.gather(*(engine.submit(request).collect() for request in requests))
    return timings.report(streams)


def raw_step_ms(model: Path, sequences: int, shared: bool) -> float:
    """llama-batched-bench's milliseconds per generation step of ``sequences`` sequences (run.py's flags)."""
    command = [str(BATCHED_BENCH), "-m", str(model), "-c", "8192", "-b", "2048", "-ub", "512", "-npp", "8", "-ntg", "128",
               "-npl", str(sequences), "-t", str(os.cpu_count()), "-tb", str(os.cpu_count()), "--output-format", "jsonl", *(["-kvu"] if shared else [])]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    row = next(json.loads(line) for line in out.splitlines() if line.startswith("{"))
    return round(1000 * row["t_tg"] / row["tg"], 2)


async def level(engine: Engine, timings: Timings, model: Path, streams: int, rounds: int, against_raw: int) -> dict:
    """One level; with ``against_raw``, that many times, each after the raw tool in both layouts."""
    if not against_raw:
        return await measure(engine, timings, streams, rounds)
    times = []
    for _ in range(against_raw):
        raw = {"per_sequence": await asyncio.to_thread(raw_step_ms, model, streams, False),
               "shared": await asyncio.to_thread(raw_step_ms, model, streams, True)}
        result = await measure(engine, timings, streams, rounds)
        step = round(result["decode_ms_median"] + result["gap_between_decodes_us_median"] / 1000, 2)
        times.append({"raw_ms_per_step": raw, "engine_step_ms": step, **result})
        print(f"{streams:3} streams: raw {raw['per_sequence']} ms per step (per sequence), {raw['shared']} ms (shared); "
              f"engine {step} ms (decode {result['decode_ms_median']})", flush=True)
    return {"streams": streams, "times": times,
            "engine_over_raw_shared_median": round(statistics.median(t["raw_ms_per_step"]["shared"] / t["engine_step_ms"] for t in times), 3),
            "engine_over_raw_per_sequence_median": round(statistics.median(t["raw_ms_per_step"]["per_sequence"] / t["engine_step_ms"] for t in times), 3)}


async def run(model: Path, levels: list[int], rounds: int, against_raw: int = 0) -> list[dict]:
    timings = Timings()
    for owner, name in SECTIONS:
        timings.wrap(owner, name)
    timings.wrap_decode()
    results = []
    with Engine.load(EngineOptions(model_path=model)) as engine:
        for streams in levels:
            result = await level(engine, timings, model, streams, rounds, against_raw)
            if against_raw:
                print(f"{streams:3} streams: the engine's speed over the raw decode's, median of {against_raw}: "
                      f"{result['engine_over_raw_shared_median']} (shared), {result['engine_over_raw_per_sequence_median']} (per sequence)")
            else:
                print(f"{streams:3} streams: {result['gap_between_decodes_us_median']:7.1f} us between decodes, "
                      f"decode {result['decode_ms_median']} ms", flush=True)
                for name, section in sorted(result["sections"].items(), key=lambda item: -item[1]["us_per_step"]):
                    print(f"      {name:18} {section['us_per_step']:7.1f} us/step  (median call {section['median_call_us']} us)")
            results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BENCH_MODEL)
    parser.add_argument("--streams", default="1,4,16", help="comma-separated stream counts (default 1,4,16)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of 128-token requests per level, after one to warm up")
    parser.add_argument("--against-raw", type=int, default=0, metavar="N",
                        help="run each level N times, each after llama-batched-bench at as many sequences (both KV layouts)")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/<date>-step-sections.json)")
    args = parser.parse_args()
    if not args.model.exists():
        sys.exit(f"bench model not found: {args.model} (run bench/build_anchors.sh)")
    if args.rounds < 1:
        sys.exit("--rounds must be at least 1")
    if args.against_raw and not BATCHED_BENCH.exists():
        sys.exit(f"llama-batched-bench not found: {BATCHED_BENCH} (run bench/build_anchors.sh)")
    levels = [int(s) for s in args.streams.split(",") if s.strip()]
    results = loop.run(run(args.model, levels, args.rounds, args.against_raw))  # the event loop serve runs on (uvloop)
    out = args.out or REPO / "bench" / "results" / f"{dt.date.today().isoformat()}-step-sections.json"
    out.write_text(json.dumps({"date": dt.date.today().isoformat(), "model": str(args.model), "rounds": args.rounds, "against_raw": args.against_raw,
                               "levels": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
