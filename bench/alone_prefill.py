#!/usr/bin/env python3
"""One long prompt on an idle server: its time to first token, against llama-server and a bare decode loop.

At the marketplace's lowest rate a request misses the 1 s first-token target mostly when its
prompt is too long for this CPU to prefill in time, so the speed of prefilling alone decides it.
Each round sends one prompt of ``--tokens`` fresh tokens (a unique head, so nothing is cached) to
every server at its defaults, one after another with the order flipping every round, and also
decodes the same number of tokens in this process with a bare ``llama_decode`` loop on a context
made as vramsupply makes its own (4096 shared cells, 17 sequences, micro-batches of 512, two
threads, flash attention ``auto``), in micro-batches of 512 and of 192 rows. All of it runs in the
same minutes, so the VM's drift touches each alike. ``--also NAME=EXECUTABLE`` adds a vramsupply
build (an A/B of a change).

    bench/.cache/venv-llamacpp-server/bin/python bench/alone_prefill.py   # ~4 min
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import aiohttp
import llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from market_trace import Words  # noqa: E402
from marketplace import default_spec  # noqa: E402
from prefill import stream  # noqa: E402
from servers import BENCH_MODEL, REPO, ServerSpec, defaults_config, machine_info, running_server, wait_ready  # noqa: E402

RAW_CHUNKS = (512, 192)


class BareDecode:
    """A context like vramsupply's default one, decoding a prompt in fixed chunks, timed."""

    def __init__(self, model: Path) -> None:
        llama_cpp.llama_backend_init()
        self._model = llama_cpp.llama_model_load_from_file(str(model).encode(), llama_cpp.llama_model_default_params())
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 4096, 2048, 512, 17
        params.kv_unified, params.n_threads, params.n_threads_batch = True, 2, 2
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(2048, 0, 1)

    def seconds(self, tokens: int, chunk: int) -> float:
        """Decode ``tokens`` prompt tokens from an empty cache on a thread of its own (as the
        scheduler thread decodes), logits for the last only."""
        result: list[float] = []
        worker = threading.Thread(target=lambda: result.append(self._decode(tokens, chunk)))
        worker.start()
        worker.join()
        return result[0]

    def _decode(self, tokens: int, chunk: int) -> float:
        llama_cpp.llama_memory_clear(self._memory, True)
        batch, pos, started = self._batch, 0, time.perf_counter()
        while pos < tokens:
            size = min(chunk, tokens - pos)
            batch.n_tokens = size
            for i in range(size):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = 100 + (pos + i) % 20000, pos + i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, pos + i == tokens - 1
            if llama_cpp.llama_decode(self._ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            pos += size
        llama_cpp.llama_synchronize(self._ctx)
        return time.perf_counter() - started


def server_specs(also: list[str]) -> list[tuple[ServerSpec, Path | None]]:
    """(server, the vramsupply executable it runs, if any) for each server compared."""
    chosen: list[tuple[ServerSpec, Path | None]] = [(default_spec("vramsupply"), None), (default_spec("llama-server"), None)]
    for item in also:
        name, _, executable = item.partition("=")
        chosen.append((default_spec(name, "vramsupply"), Path(executable)))
    return chosen


async def bench(args: argparse.Namespace) -> dict[str, list[float]]:
    words, rng = Words(BENCH_MODEL), random.Random(3)
    cfg = defaults_config(BENCH_MODEL, args.vramsupply)
    chosen = server_specs(args.also)
    results: dict[str, list[float]] = {spec.name: [] for spec, _ in chosen}
    results.update({f"bare llama_decode, {chunk}-row chunks": [] for chunk in RAW_CHUNKS})
    with ExitStack() as stack:
        servers = [(stack.enter_context(running_server(spec, replace(cfg, vramsupply_bin=exe or args.vramsupply), BENCH_MODEL)), spec)
                   for spec, exe in chosen]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for server, _ in servers:
                await wait_ready(server)
                await stream(session, server.url, "warm " + words.text(rng, 300), 2)
            bare = BareDecode(BENCH_MODEL)
            bare.seconds(64, 64)
            for rnd in range(args.rounds):
                for server, spec in servers if rnd % 2 == 0 else servers[::-1]:
                    prompt = f"x {rng.random()} " + words.text(rng, args.tokens)
                    ttft, _ = await stream(session, server.url, prompt, 1)
                    results[spec.name].append(round(ttft, 3))
                    await asyncio.sleep(0.3)
                for chunk in RAW_CHUNKS:
                    results[f"bare llama_decode, {chunk}-row chunks"].append(round(bare.seconds(args.tokens, chunk), 3))
                print({name: values[-1] for name, values in results.items()}, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=950)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--vramsupply", type=Path, default=REPO / ".venv" / "bin" / "vramsupply")
    parser.add_argument("--also", action="append", default=[], help="NAME=EXECUTABLE: another vramsupply build")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"{dt.date.today()}-alone-prefill.json")
    args = parser.parse_args()
    if args.rounds < 1 or args.tokens < 1:
        parser.error("--rounds and --tokens must be at least 1")
    results = asyncio.run(bench(args))
    medians = {name: round(statistics.median(values), 3) for name, values in results.items()}
    report = {"date": dt.date.today().isoformat(), "machine": machine_info(), "prompt_tokens": args.tokens,
              "medians_s": medians, "runs": results}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(medians, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
