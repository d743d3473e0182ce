#!/usr/bin/env python3
"""The first prompts a freshly started server sees: a long one, and a shorter one arriving meanwhile.

A provider's server restarts (an upgrade, a reboot, the service restarted) while buyers keep
coming. The server knows nothing yet of its own prefill speed then, and in a marketplace replay
two first turns arrived 0.4 s apart right after start, about 950 and 345 tokens to prefill: the
second answered in 1.72 s, over the 1 s first-token target, because it waited for the first one's
first step, a whole 512-row micro-batch of about a second on the 2-core bench CPU. Here every round
starts each server anew at its defaults on the bench model, sends the long prompt, then the short
one ``--gap`` seconds later, and records each one's time to first token. The servers take turns,
the order flipping every round; prompts are built before each server starts, so the client's
tokenizer never competes with the server for the cores. ``--base`` adds a second vramsupply build
(for an A/B of a change).

    bench/.cache/venv-llamacpp-server/bin/python bench/cold_start.py --base OLD_VRAMSUPPLY   # ~3 min
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from market_trace import Words  # noqa: E402
from marketplace import default_spec  # noqa: E402
from prefill import two_at_once  # noqa: E402
from servers import BENCH_MODEL, REPO, ServerSpec, defaults_config, machine_info, running_server, wait_ready  # noqa: E402

LONG_TOKENS, SHORT_TOKENS = 950, 345
TTFT_TARGET_S = 1.0


def specs(base: Path | None) -> list[tuple[ServerSpec, Path | None]]:
    """(server, the vramsupply executable it runs, if any) for each server compared."""
    chosen: list[tuple[ServerSpec, Path | None]] = [(default_spec("vramsupply"), None), (default_spec("llama-server"), None)]
    return chosen + ([(default_spec("vramsupply-base", "vramsupply"), base)] if base else [])


async def bench(args: argparse.Namespace) -> dict[str, list[dict]]:
    words, rng = Words(BENCH_MODEL), random.Random(7)
    cfg = defaults_config(BENCH_MODEL, args.vramsupply)
    chosen = specs(args.base)
    results: dict[str, list[dict]] = {spec.name: [] for spec, _ in chosen}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for rnd in range(args.rounds):
            for spec, executable in chosen if rnd % 2 == 0 else chosen[::-1]:
                prompts = tuple(f"{tag} {rng.random()} " + words.text(rng, size)
                                for tag, size in (("long", LONG_TOKENS), ("short", SHORT_TOKENS)))
                with running_server(spec, replace(cfg, vramsupply_bin=executable or args.vramsupply), BENCH_MODEL) as server:
                    await wait_ready(server)
                    row = await two_at_once(session, server.url, *prompts, gap=args.gap)
                results[spec.name].append({"round": rnd, **row})
                print(spec.name, results[spec.name][-1], flush=True)
    return results


def summary(rows: list[dict]) -> dict:
    return {
        "long_ttft_s_median": round(statistics.median(r["long_ttft_s"] for r in rows), 3),
        "short_ttft_s_median": round(statistics.median(r["short_ttft_s"] for r in rows), 3),
        "short_within_target": sum(r["short_ttft_s"] <= TTFT_TARGET_S for r in rows),
        "long_within_target": sum(r["long_ttft_s"] <= TTFT_TARGET_S for r in rows),
        "rounds": len(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--gap", type=float, default=0.4, help="seconds between the long and the short prompt")
    parser.add_argument("--vramsupply", type=Path, default=REPO / ".venv" / "bin" / "vramsupply")
    parser.add_argument("--base", type=Path, help="a second vramsupply executable to compare (the baseline)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"{dt.date.today()}-cold-start.json")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    results = asyncio.run(bench(args))
    report = {"date": dt.date.today().isoformat(), "machine": machine_info(),
              "prompt_tokens": {"long": LONG_TOKENS, "short": SHORT_TOKENS}, "gap_s": args.gap,
              "summary": {name: summary(rows) for name, rows in results.items()}, "runs": results}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
