#!/usr/bin/env python3
"""vramsupply against llama-server on one NVIDIA GPU, both built from the same llama.cpp commit.

Both servers get the same model, slots and per-slot context, every layer on the GPU and flash
attention as each defaults it; the load is bench/run.py's (streaming /v1/completions, ignore_eos,
temperature 0, 2×c requests per level, a new connection per request) at c = 1, 4, 16 and 64, the
servers measured in turn level by level, best of the rounds. vramsupply runs a second time with
``--backend-sampling`` (every request here is backend-eligible: greedy, with ignore_eos's logit
bias), since sparing each slot's logits the copy to the host is where upstream measured +48 % at 32
slots, and no CPU can show it. Writes a JSON with every round, the GPU (nvidia-smi), the build time
of the CUDA wheel, and a markdown table.

Run through bench/gpu/run.sh, which builds everything first.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from client import eos_token_id  # noqa: E402
from report import best_of_rounds, level_of  # noqa: E402
from run import measure  # noqa: E402
from servers import HOST, BenchConfig, ServerSpec, running_server, wait_ready  # noqa: E402


def gpu_specs(llama_server: Path | None) -> dict[str, ServerSpec]:
    def vramsupply_command(cfg: BenchConfig, model: Path, port: int) -> list[str]:
        return [
            str(cfg.vramsupply_bin), "serve", "--model", str(model), "--parallel", str(cfg.parallel),
            "--context-length", str(cfg.context_per_slot), "--n-gpu-layers", "-1",
            "--no-register", "--host", HOST, "--port", str(port), "--log-level", "INFO",
        ]  # fmt: skip

    def llama_server_command(cfg: BenchConfig, model: Path, port: int) -> list[str]:
        return [
            str(llama_server), "-m", str(model), "-np", str(cfg.parallel), "-c", str(cfg.parallel * cfg.context_per_slot),
            "-ngl", "999", "--host", HOST, "--port", str(port),
        ]  # fmt: skip

    def backend_sampling_command(cfg: BenchConfig, model: Path, port: int) -> list[str]:
        return [*vramsupply_command(cfg, model, port), "--backend-sampling"]

    specs = {
        "vramsupply": ServerSpec("vramsupply", "continuous batching, all layers on the GPU", "/health", True, vramsupply_command),
        "vramsupply-bs": ServerSpec("vramsupply-bs", "the same, sampling in the graph", "/health", True, backend_sampling_command),
    }
    if llama_server is not None:  # without it: a smoke run of vramsupply alone
        specs["llama-server"] = ServerSpec("llama-server", "continuous batching, -ngl 999", "/health", True, llama_server_command)
    return specs


def nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap", "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError as exc:
        return f"nvidia-smi failed: {exc}"


async def bench(cfg: BenchConfig, specs: dict[str, ServerSpec], model: Path) -> dict:
    eos_id = eos_token_id(model)
    report: dict = {"model": model.name, "servers": {}}
    for name, spec in specs.items():  # one at a time: two 64-slot servers may not both fit in VRAM
        with ExitStack() as stack:
            server = stack.enter_context(running_server(spec, cfg, model))
            await wait_ready(server, timeout_s=900)
            rounds = []
            for round_index in range(cfg.rounds):
                for concurrency in cfg.concurrency:
                    level = await measure(server, cfg, round_index, concurrency, eos_id)
                    print(f"  {name:14} c={concurrency:<3} {level.tok_s:9.1f} tok/s  TTFT p50 {level.ttft_p50_ms} ms", flush=True)
                    rounds.append(asdict(level))
            report["servers"][name] = {"command": server.command, "rounds": rounds}
    for server in report["servers"].values():
        server["levels"] = [best_of_rounds([r for r in server["rounds"] if r["concurrency"] == c]) for c in cfg.concurrency]
    return report


def markdown(report: dict, concurrency: list[int]) -> str:
    lines = ["| server | c | tok/s | TTFT p50 | TTFT p95 | completed |", "|---|---|---|---|---|---|"]
    for name, server in report["servers"].items():
        for level in server["levels"]:
            lines.append(f"| {name} | {level['concurrency']} | {level['tok_s']} | {level['ttft_p50_ms']} ms | {level['ttft_p95_ms']} ms | {level['completed']}/{level['requests']} |")
    ours, theirs = report["servers"].get("vramsupply"), report["servers"].get("llama-server")
    if ours and theirs:
        for c in concurrency:
            a = level_of(ours, c)
            b = level_of(theirs, c)
            if a and b and b["tok_s"]:
                lines.append(f"\nc={c}: vramsupply/llama-server tok/s = {a['tok_s'] / b['tok_s']:.2f}")
    sampled = report["servers"].get("vramsupply-bs")
    if ours and sampled:
        for c in concurrency:
            a, b = level_of(sampled, c), level_of(ours, c)
            if a and b and b["tok_s"]:
                lines.append(f"\nc={c}: with/without --backend-sampling tok/s = {a['tok_s'] / b['tok_s']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vramsupply", type=Path, required=True, help="the vramsupply command installed with the CUDA build")
    parser.add_argument("--llama-server", type=Path, default=None, help="llama-server built with CUDA (omit for a smoke run of vramsupply alone)")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--parallel", type=int, default=64)
    parser.add_argument("--context", type=int, default=2048, help="context per slot")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--build-seconds", type=float, default=None, help="how long the CUDA wheel took to build")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    cfg = BenchConfig(
        models=(args.model,), servers=("vramsupply", "llama-server"), concurrency=tuple(concurrency), requests_per_slot=2,
        max_tokens=args.max_tokens, rounds=args.rounds, parallel=args.parallel, context_per_slot=args.context, threads=0,
        vramsupply_bin=args.vramsupply,
    )
    report = asyncio.run(bench(cfg, gpu_specs(args.llama_server), args.model))
    report.update(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        gpu=nvidia_smi(),
        cuda_wheel_build_s=args.build_seconds,
        config={"concurrency": concurrency, "parallel": args.parallel, "context_per_slot": args.context, "max_tokens": args.max_tokens, "rounds": args.rounds},
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    table = markdown(report, concurrency)
    args.out.with_suffix(".md").write_text(f"GPU: {report['gpu']}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
