#!/usr/bin/env python3
"""Where prompt-lookup speculative decoding helps and where it hurts, on this machine.

Prompt lookup drafts the tokens that followed the latest earlier occurrence of a request's last
few tokens, and verifies them in the same decode step. It can only pay when the output repeats
its input (quotes, edits, code) and when a verify row is cheap next to the step (a GPU). On a
CPU every verify row is compute. This bench measures both sides, in the engine itself (no HTTP),
with two engines loaded side by side (``--draft-max 0`` and ``N``) and requests alternating
between them, at the engine's other defaults:

- ``quote``: a lone request whose prompt holds a passage twice and starts it a third time, so a
  model that continues the pattern quotes its input (input-grounded);
- ``free``: a lone request continuing a short prompt (nothing to quote);
- ``busy``: four requests at once (drafting switches itself off when other slots are busy, so
  this should cost nothing).

Each case reports completion tokens per second (greedy, ``ignore_eos``, 128 tokens), the share
of drafted tokens that were accepted, and the ratio with drafts over without.

    bench/.cache/venv-llamacpp-server/bin/python bench/speculative.py    # needs the project venv's packages on the path
    .venv/bin/python bench/speculative.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vramsupply.engine import Engine, EngineOptions, GenerationRequest, SamplingParams  # noqa: E402

TINY_MODEL = REPO / "vramsupply" / "assets" / "stories260K.gguf"
BENCH_MODEL = REPO / "bench" / ".cache" / "bench-llama-768x12-q8_0.gguf"
PASSAGE = (
    "Tom had a big red ball. He liked to play with it in the park every day. One day the ball rolled "
    "into the pond, and a duck swam over to look at it. Tom asked the duck to push the ball back. "
)
CASES = {
    "quote": ([PASSAGE + PASSAGE + PASSAGE[:40]], 1),
    "free": (["Once upon a time"], 1),
    "busy": ([f"Once upon a time, {name}" for name in ("Tom", "Lily", "Sam", "Mia")], 4),
}
MAX_TOKENS = 128
GREEDY = SamplingParams(temperature=0)


async def run_case(engine: Engine, prompts: list[str]) -> tuple[int, float, int, int]:
    """(completion tokens, seconds, drafted, accepted) for ``prompts`` submitted at once."""
    before = engine.stats()
    started = time.perf_counter()
    generations = [
        engine.submit(GenerationRequest(engine.tokenize(p), sampling=GREEDY, max_tokens=MAX_TOKENS, ignore_eos=True)) for p in prompts
    ]
    await asyncio.gather(*(g.collect() for g in generations))
    elapsed = time.perf_counter() - started
    after = engine.stats()
    tokens = sum(g.usage.completion_tokens for g in generations if g.usage)
    return tokens, elapsed, after.draft_tokens_total - before.draft_tokens_total, after.draft_accepted_total - before.draft_accepted_total


async def bench_model(model: Path, draft_max: int, rounds: int) -> dict:
    engines = {0: Engine.load(EngineOptions(model_path=model, draft_max=0)), draft_max: Engine.load(EngineOptions(model_path=model, draft_max=draft_max))}
    try:
        results: dict = {}
        for case, (prompts, _) in CASES.items():
            rows: dict[int, list[tuple[int, float, int, int]]] = {d: [] for d in engines}
            for _ in range(rounds + 1):  # the first round warms both engines up and is dropped
                for d, engine in engines.items():
                    rows[d].append(await run_case(engine, prompts))
            results[case] = summarize(rows, draft_max)
            print(f"  {model.name} {case:6s} {json.dumps(results[case])}", flush=True)
        return results
    finally:
        for engine in engines.values():
            engine.close()


def summarize(rows: dict[int, list[tuple[int, float, int, int]]], draft_max: int) -> dict:
    def best(d: int) -> float:
        return max(tokens / seconds for tokens, seconds, _, _ in rows[d][1:])

    drafted = sum(r[2] for r in rows[draft_max][1:])
    accepted = sum(r[3] for r in rows[draft_max][1:])
    return {
        "tok_s_without": round(best(0), 1),
        "tok_s_with": round(best(draft_max), 1),
        "ratio": round(best(draft_max) / best(0), 3),
        "drafted": drafted,
        "accepted": accepted,
        "acceptance": round(accepted / drafted, 3) if drafted else None,
        "rounds": {str(d): [[t, round(s, 3), dr, ac] for t, s, dr, ac in r[1:]] for d, r in rows.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=f"{TINY_MODEL},{BENCH_MODEL}", help="comma-separated GGUF paths")
    parser.add_argument("--draft-max", type=int, default=8, help="the drafting engine's --draft-max (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per case; the best is reported (default 3)")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/<date>-speculative.json)")
    args = parser.parse_args()
    date = dt.date.today().isoformat()
    out = args.out or REPO / "bench" / "results" / f"{date}-speculative.json"
    report: dict = {"date": date, "load_avg_at_start": os.getloadavg(), "draft_max": args.draft_max, "max_tokens": MAX_TOKENS,
                    "cpus": os.cpu_count(), "models": {}}
    for model in [Path(m) for m in args.models.split(",")]:
        report["models"][model.name] = asyncio.run(bench_model(model, args.draft_max, args.rounds))
    report["load_avg_at_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("\n| model | case | tok/s without drafts | with | ratio | acceptance |\n|---|---|---|---|---|---|")
    for name, cases in report["models"].items():
        for case, r in cases.items():
            print(f"| {name} | {case} | {r['tok_s_without']} | {r['tok_s_with']} | {r['ratio']} | {r['acceptance'] if r['acceptance'] is not None else '–'} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
