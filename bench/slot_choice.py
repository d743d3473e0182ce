#!/usr/bin/env python3
"""Which idle slot a prompt takes when idle slots keep their KV (``--cache-ram 0``).

Without the host prompt cache an idle slot's KV stays in the shared cache until a prompt takes
the slot, so the choice decides whether a waiting conversation finds its history next turn.
Four chats of four turns run beside one-off prompts that share nothing with them but the BOS
token (or, with ``--system``, a ~300-token system prompt), on the bench model at the engine's
defaults otherwise. From the second turn on, the one-off prompts arrive 50 ms before the chats'
next turns, as unrelated buyers do. Recorded: the chats' cached share of their prompts (mean)
and their first-token times. Two source trees take turns (``--a`` and ``--b``, each a folder
holding ``vramsupply/``, e.g. ``git archive HEAD~1 vramsupply | tar -x -C DIR``), each run in a
process of its own.

    .venv/bin/python bench/slot_choice.py --a /tmp/old --b . --one-offs 8,10 --repeat 2
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = HERE / ".cache" / "bench-llama-768x12-q8_0.gguf"
WORDS = "Apples Boats Clouds Dragons Eagles Forests Giants Horses Islands Jungles Kings Lemons".split()
CHATS, TURNS, ANSWER = 4, 4, 60


async def timed(engine, prompt: list[int], delay: float = 0.0):  # type: ignore[no-untyped-def]
    """One greedy answer of ``ANSWER`` tokens: the generation and its first token's time."""
    from vramsupply.engine import GenerationRequest, SamplingParams

    await asyncio.sleep(delay)
    start = time.perf_counter()
    generation = engine.submit(GenerationRequest(prompt, sampling=SamplingParams(temperature=0), max_tokens=ANSWER, ignore_eos=True))
    first = None
    async for _ in generation:
        first = first if first is not None else time.perf_counter() - start
    return generation, first


async def session(one_offs: int, system_prompt: bool) -> dict[str, float]:
    """The chats' later turns beside ``one_offs`` one-off prompts a turn: cached share and TTFT."""
    from vramsupply.engine import Engine, EngineOptions

    with Engine.load(EngineOptions(model_path=MODEL, cache_ram=0, threads=2)) as engine:
        system = engine.tokenize("You are a helpful assistant who answers briefly. " * 30)
        head = (lambda i: list(system)) if system_prompt else (lambda i: engine.tokenize(f"Chat {i} begins here."))
        histories = [head(i) for i in range(CHATS)]
        shares, firsts = [], []
        for turn in range(TURNS):
            for i, history in enumerate(histories):
                history += engine.tokenize(f" Question {turn} of chat {i}: tell me more about the park.", add_special=False)
            starts = list(system) if system_prompt else engine.tokenize("x")[:1]
            others = [starts + engine.tokenize(f"{WORDS[(turn * one_offs + j) % len(WORDS)]} {turn} {j}: a poem about cats.", add_special=False)
                      for j in range(one_offs)]
            delay = 0.05 if turn else 0.0  # the first turn places the chats; later, the one-offs come first
            results = await asyncio.gather(*(timed(engine, h, delay) for h in histories), *(timed(engine, o) for o in others))
            for history, (generation, first) in zip(histories, results):
                if turn:
                    shares.append(generation.usage.cached_tokens / generation.usage.prompt_tokens)
                    firsts.append(first)
                history += generation.token_ids
    return {"cached_share_mean": statistics.mean(shares), "ttft_ms_median": 1000 * statistics.median(firsts),
            "ttft_ms_mean": 1000 * statistics.mean(firsts), "ttft_ms_max": 1000 * max(firsts)}


def run_in(tree: str, one_offs: int, system_prompt: bool) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    args = [sys.executable, __file__, "--child", str(one_offs)] + (["--system"] if system_prompt else [])
    return json.loads(subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", default="."), parser.add_argument("--b", default=".")
    parser.add_argument("--one-offs", default="8,10"), parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--system", action="store_true"), parser.add_argument("--child", type=int)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(asyncio.run(session(args.child, args.system))))
        return
    runs = []
    for repeat in range(args.repeat):
        for one_offs in map(int, args.one_offs.split(",")):
            for name in (["a", "b"] if repeat % 2 == 0 else ["b", "a"]):
                result = run_in(getattr(args, name), one_offs, args.system)
                runs.append({"build": name, "tree": getattr(args, name), "one_offs": one_offs, "system_prompt": args.system, **result})
                print(json.dumps(runs[-1]), flush=True)
    out = HERE / "results" / f"{dt.date.today()}-slot-choice{'-system' if args.system else ''}.json"
    out.write_text(json.dumps({"model": MODEL.name, "chats": CHATS, "turns": TURNS, "answer_tokens": ANSWER, "runs": runs}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
