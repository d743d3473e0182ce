#!/usr/bin/env python3
"""How much can one accepted request slow everyone else? The largest gap in a plain stream.

A "victim" stream (plain completion, streamed) runs on `vramsupply serve` at default settings.
Once it is under way, the most expensive request of one kind that the server still accepts is
sent next to it; the victim's largest gap between two chunks while that request runs is the cost
it imposes on every other buyer. The same victim alone, over a window as long, is the baseline.

Kinds (each the most expensive the limits allow, see README "Limits"):
  schema      json_schema with the largest enum accepted (MAX_ALTERNATIVES long strings)
  schema_repetition  a string of up to MAX_REPETITION characters (the deepest grammar accepted)
  stop        16 stop strings of MAX_STOP_CHARS characters each, the model pushed to keep matching them
  logit_bias  a bias for every token of the vocabulary
  n           16 choices
  long_prompt a prompt filling the context: with the slots sharing one KV cache it no longer fits
              beside the stream, so it is paused until the stream ends (``preempt.py``)
  half_context_prompt  a prompt of half the context, which fits beside the stream: chunked
              prefill next to a generating slot (``pacing.py``)

usage: .venv/bin/python bench/worst_case.py [--model bench/.cache/bench-llama-768x12-q8_0.gguf]
Results: bench/results/worst-case-<date>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from agent_process import free_port, wait_healthy

from vramsupply.chat.limits import MAX_ALTERNATIVES, MAX_REPETITION, SchemaTooComplex, schema_grammar
from vramsupply.server.schemas import MAX_STOP_CHARS, MAX_STOP_STRINGS

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "bench" / ".cache" / "bench-llama-768x12-q8_0.gguf"
TARGET_GAP_SECONDS = 0.25
VICTIM = {"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True, "stream": True, "temperature": 0}


def largest_accepted_enum() -> dict[str, Any]:
    """The longest enum strings that still pass every schema limit, at MAX_ALTERNATIVES entries."""
    length = 512
    while length > 1:
        schema = {"enum": [f"{i:04d} " + "x" * length for i in range(MAX_ALTERNATIVES)]}
        try:
            schema_grammar(schema)
            return schema
        except SchemaTooComplex:
            length //= 2
    raise RuntimeError("no enum of MAX_ALTERNATIVES entries is accepted")


def expensive_requests(vocab: int, n_ctx: int, round_: int = 0) -> dict[str, tuple[str, dict[str, Any]]]:
    """The most expensive accepted request of each kind; the long prompt differs per round, so the
    prompt cache never serves it."""
    long_stop = "a" * MAX_STOP_CHARS
    return {
        "schema": (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "Pick one."}],
                "max_tokens": 64,
                "response_format": {"type": "json_schema", "json_schema": {"name": "pick", "schema": largest_accepted_enum()}},
            },
        ),
        "schema_repetition": (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "Write."}],
                "max_tokens": 128,
                "response_format": {"type": "json_schema", "json_schema": {"name": "text", "schema": {"type": "string", "maxLength": MAX_REPETITION}}},
            },
        ),
        "stop": ("/v1/completions", {"prompt": "aaaa", "max_tokens": 256, "stop": [long_stop[: MAX_STOP_CHARS - i] for i in range(MAX_STOP_STRINGS)], "logit_bias": {"29874": 100}}),
        "logit_bias": ("/v1/completions", {"prompt": "Once", "max_tokens": 256, "logit_bias": {str(t): ((t * 7919) % 200 - 100) / 10 for t in range(vocab)}}),
        "n": ("/v1/completions", {"prompt": "Once upon a time there was", "max_tokens": 64, "n": 16, "ignore_eos": True}),
        "long_prompt": ("/v1/completions", {"prompt": list(range(100 + round_, 100 + round_ + n_ctx - 32)), "max_tokens": 16, "ignore_eos": True}),
        "half_context_prompt": ("/v1/completions", {"prompt": list(range(5000 + round_, 5000 + round_ + n_ctx // 2)), "max_tokens": 16, "ignore_eos": True}),
    }


async def victim(http: aiohttp.ClientSession, url: str, arrivals: list[float], stop: asyncio.Event) -> None:
    async with http.post(url + "/v1/completions", json=VICTIM) as response:
        async for line in response.content:
            if line.startswith(b"data: {"):
                arrivals.append(time.monotonic())
            if stop.is_set():
                return


def largest_gap(arrivals: list[float], start: float, end: float) -> float:
    times = [t for t in arrivals if start <= t <= end]
    return max((b - a for a, b in zip(times, times[1:])), default=float("inf"))


async def measure(http: aiohttp.ClientSession, url: str, kind: str | None, route: str, body: dict[str, Any]) -> dict[str, Any]:
    arrivals: list[float] = []
    stop = asyncio.Event()
    stream = asyncio.create_task(victim(http, url, arrivals, stop))
    while len(arrivals) < 20:
        await asyncio.sleep(0.05)
    start = time.monotonic()
    status = None
    if kind is None:
        await asyncio.sleep(5.0)
    else:
        async with http.post(url + route, json=body) as response:
            status = response.status
            await response.read()
    end = time.monotonic()
    await asyncio.sleep(0.3)
    stop.set()
    await stream
    gap = largest_gap(arrivals, start, end + 0.3)
    return {"kind": kind or "baseline", "status": status, "seconds": round(end - start, 3), "largest_gap_ms": round(gap * 1000, 1)}


async def run(model: Path, rounds: int, only: set[str] | None) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "vramsupply", "serve", "--model", str(model), "--no-register", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            await wait_healthy(http, url, process)
            from gguf import GGUFReader

            vocab = len(GGUFReader(model).fields["tokenizer.ggml.tokens"].data)
            results: list[dict[str, Any]] = []
            for round_ in range(rounds):
                kinds = expensive_requests(vocab, n_ctx=4096, round_=round_)
                results.append({**await measure(http, url, None, "", {}), "round": round_})
                for kind, (route, body) in kinds.items():
                    if only and kind not in only:
                        continue
                    results.append({**await measure(http, url, kind, route, body), "round": round_})
                    print(json.dumps(results[-1]), flush=True)
    finally:
        process.terminate()
        process.wait(60)
    best: dict[str, float] = {}
    worst: dict[str, float] = {}
    for row in results:
        best[row["kind"]] = min(best.get(row["kind"], float("inf")), row["largest_gap_ms"])
        worst[row["kind"]] = max(worst.get(row["kind"], 0.0), row["largest_gap_ms"])
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
        "model": model.name,
        "target_gap_ms": TARGET_GAP_SECONDS * 1000,
        "rounds": results,
        "best_largest_gap_ms": best,
        "worst_largest_gap_ms": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=2, help="each kind's best round (least disturbed by other processes) and its worst are reported")
    parser.add_argument("--kinds", help="comma-separated kinds to measure (default: all)")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/worst-case-<date>.json)")
    args = parser.parse_args()
    only = {k.strip() for k in args.kinds.split(",")} if args.kinds else None
    report = asyncio.run(run(args.model, args.rounds, only))
    out = args.out or REPO / "bench" / "results" / f"worst-case-{dt.date.today().isoformat()}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n| kind | largest gap in a concurrent stream, best of {args.rounds} | worst of {args.rounds} |\n|---|---|---|")
    for kind, gap in report["best_largest_gap_ms"].items():
        print(f"| {kind} | {gap:.0f} ms | {report['worst_largest_gap_ms'][kind]:.0f} ms |")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
