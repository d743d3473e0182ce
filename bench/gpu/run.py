#!/usr/bin/env python3
"""vramsupply against llama-server on one NVIDIA GPU, both built from the same llama.cpp commit.

Tuned: both servers get the same model, slots and context (64 slots, one KV cache of 64 × 2048
tokens), every layer on the GPU and flash attention as each defaults it; the load is
bench/run.py's (streaming /v1/completions, ignore_eos, temperature 0, 2×c requests per level, a
new connection per request) at c = 1, 4, 16 and 64. llama-server runs twice: with ``-kvu``, the
slots sharing one cache as vramsupply's do, and without (its layout when ``-np`` is given: one
cache stream per slot). vramsupply runs again with ``--backend-sampling`` (every request here is
backend-eligible: greedy, with ignore_eos's logit bias), since sparing each slot's logits the copy
to the host is where upstream measured +48 % at 32 slots, and no CPU can show it; and at c = 1 with
``--draft-max 8`` (prompt lookup drafts only for a request decoding alone).

Defaults: then each server as a new user starts it, with the model and nothing else
(``vramsupply serve --model M`` against ``llama-server -m M``), at c = 1, 4 and 16.

One server runs at a time (two 64-slot servers need not both fit), warmed up alone and at full
width before its levels are measured, best of the rounds; vramsupply's draft counters are read
from its /metrics at the end. Writes a JSON with every round, the GPU (nvidia-smi) and the
llama.cpp build time, and a markdown table, after each server.

Run through bench/gpu/device.sh (the lent machine) or bench/gpu/run.sh (a GPU owner's), which
build everything first.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from client import eos_token_id  # noqa: E402
from report import best_of_rounds, level_of  # noqa: E402
from run import measure, prepare  # noqa: E402
from servers import HOST, BenchConfig, ServerSpec, running_server  # noqa: E402

RATIOS = [  # (numerator, denominator, what the ratio says)
    ("vramsupply", "llama-server-kvu", "vramsupply/llama-server -kvu, tuned"),
    ("vramsupply", "llama-server", "vramsupply/llama-server (a cache stream per slot), tuned"),
    ("vramsupply-bs", "vramsupply", "with/without --backend-sampling"),
    ("vramsupply-draft8", "vramsupply", "with/without prompt-lookup drafts (--draft-max 8)"),
    ("vramsupply-defaults", "llama-server-defaults", "vramsupply/llama-server, both at their defaults"),
]
TUNED_ORDER = ("vramsupply", "llama-server-kvu", "llama-server", "vramsupply-draft8", "vramsupply-bs")
"""The order the tuned servers run in: what matters most first, should the run be stopped early."""


def tuned_specs(llama_server: Path | None) -> dict[str, ServerSpec]:
    def vramsupply_command(cfg: BenchConfig, model: Path, port: int) -> list[str]:
        return [
            # One KV cache of parallel x context_per_slot tokens shared by the slots, as llama-server's -c.
            str(cfg.vramsupply_bin), "serve", "--model", str(model), "--parallel", str(cfg.parallel),
            "--context-length", str(cfg.parallel * cfg.context_per_slot), "--n-gpu-layers", "-1",
            "--no-register", "--host", HOST, "--port", str(port), "--log-level", "INFO",
        ]  # fmt: skip

    def llama_server_command(cfg: BenchConfig, model: Path, port: int) -> list[str]:
        return [
            str(llama_server), "-m", str(model), "-np", str(cfg.parallel), "-c", str(cfg.parallel * cfg.context_per_slot),
            "-ngl", "999", "--host", HOST, "--port", str(port),
        ]  # fmt: skip

    def with_flags(command: Callable[[BenchConfig, Path, int], list[str]], *flags: str) -> Callable[[BenchConfig, Path, int], list[str]]:
        return lambda cfg, model, port: [*command(cfg, model, port), *flags]

    specs = [
        ServerSpec("vramsupply", "continuous batching, all layers on the GPU", "/health", True, vramsupply_command),
        ServerSpec("vramsupply-bs", "the same, sampling in the graph", "/health", True, with_flags(vramsupply_command, "--backend-sampling")),
        ServerSpec("vramsupply-draft8", "the same, prompt-lookup drafts", "/health", True, with_flags(vramsupply_command, "--draft-max", "8")),
    ]
    if llama_server is not None:  # without it: a smoke run of vramsupply alone
        specs += [
            ServerSpec("llama-server-kvu", "continuous batching, -ngl 999, one shared cache", "/health", True,
                       with_flags(llama_server_command, "-kvu")),
            ServerSpec("llama-server", "continuous batching, -ngl 999, a cache stream per slot", "/health", True, llama_server_command),
        ]
    return {spec.name: spec for spec in specs}


def default_specs(llama_server: Path | None) -> dict[str, ServerSpec]:
    """Each server with the model and nothing else that changes how it runs (the address, and
    vramsupply's --no-register since nothing here reaches the platform)."""

    def vramsupply_command(cfg: BenchConfig, model: Path, port: int) -> list[str]:
        return [str(cfg.vramsupply_bin), "serve", "--model", str(model), "--no-register", "--host", HOST, "--port", str(port)]

    def llama_server_command(cfg: BenchConfig, model: Path, port: int) -> list[str]:
        return [str(llama_server), "-m", str(model), "--host", HOST, "--port", str(port)]

    specs = {"vramsupply-defaults": ServerSpec("vramsupply-defaults", "its defaults", "/health", True, vramsupply_command)}
    if llama_server is not None:
        specs["llama-server-defaults"] = ServerSpec("llama-server-defaults", "its defaults", "/health", True, llama_server_command)
    return specs


def nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap", "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError as exc:
        return f"nvidia-smi failed: {exc}"


async def bench_server(cfg: BenchConfig, spec: ServerSpec, model: Path, concurrency: tuple[int, ...], eos_id: int) -> dict:
    """One server: ready, warmed up (the first decodes of each batch shape build CUDA graphs), then
    every level of every round."""
    with ExitStack() as stack:
        server = stack.enter_context(running_server(spec, cfg, model))
        await prepare([server], replace(cfg, concurrency=concurrency), eos_id)  # bench/run.py's: ready, then warm
        rounds = []
        for round_index in range(cfg.rounds):
            for c in concurrency:
                level = await measure(server, cfg, round_index, c, eos_id)
                print(f"  {spec.name:22} c={c:<3} {level.tok_s:9.1f} tok/s  TTFT p50 {level.ttft_p50_ms} ms"
                      f"  done {level.completed}/{level.requests}", flush=True)
                rounds.append(asdict(level))
        levels = [best_of_rounds([r for r in rounds if r["concurrency"] == c]) for c in concurrency]
        report = {"command": server.command, "log": str(server.log_path), "load_s": server.load_s, "rounds": rounds, "levels": levels}
        if spec.name.startswith("vramsupply"):
            report["draft_counters"] = await draft_counters(server.url)
        return report


async def draft_counters(url: str) -> dict[str, float]:
    """vramsupply's prompt-lookup counters from /metrics (all of this server's requests, warm-up too)."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("vramsupply_draft")
    }


async def bench(cfg: BenchConfig, plan: list[tuple[ServerSpec, tuple[int, ...]]], model: Path, out: Path, extra: dict) -> dict:
    """Every server of the plan in turn; the report is written after each, so a run stopped at its
    time limit keeps what it measured."""
    eos_id = eos_token_id(model)
    report: dict = {"model": model.name, "servers": {}, **extra}
    for spec, concurrency in plan:
        try:
            report["servers"][spec.name] = await bench_server(cfg, spec, model, concurrency, eos_id)
        except Exception as exc:  # one server failing must not lose the others' numbers
            print(f"  {spec.name}: FAILED: {exc}", flush=True)
            report["servers"][spec.name] = {"error": str(exc)[-3000:], "levels": []}
        write_report(report, out)
    return report


def write_report(report: dict, out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    table = markdown(report)
    out.with_suffix(".md").write_text(f"GPU: {report['gpu']}\n\n{table}\n")
    return table


def ratios(report: dict) -> list[str]:
    lines = []
    for top, bottom, what in RATIOS:
        a_server, b_server = report["servers"].get(top), report["servers"].get(bottom)
        for level in (a_server or {}).get("levels", []):
            b = level_of(b_server, level["concurrency"]) if b_server else None
            if b and b["tok_s"]:
                lines.append(f"c={level['concurrency']}: {what}: tok/s {level['tok_s'] / b['tok_s']:.2f}")
    return lines


def markdown(report: dict) -> str:
    lines = ["| server | c | tok/s | TTFT p50 | TTFT p95 | completed |", "|---|---|---|---|---|---|"]
    for name, server in report["servers"].items():
        if "error" in server:
            lines.append(f"| {name} | - | failed | | | |")
        for level in server["levels"]:
            lines.append(f"| {name} | {level['concurrency']} | {level['tok_s']} | {level['ttft_p50_ms']} ms | {level['ttft_p95_ms']} ms | {level['completed']}/{level['requests']} |")
    drafts = [
        f"{name}: {server['draft_counters'].get('vramsupply_draft_accepted_tokens_total', 0):.0f} of "
        f"{server['draft_counters'].get('vramsupply_draft_tokens_total', 0):.0f} drafted tokens accepted"
        for name, server in report["servers"].items() if server.get("draft_counters")
    ]
    return "\n".join([*lines, "", *ratios(report), "", *drafts])


def parse_levels(text: str) -> tuple[int, ...]:
    return tuple(int(c) for c in text.split(",") if c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vramsupply", type=Path, required=True, help="the vramsupply command installed with the CUDA build")
    parser.add_argument("--llama-server", type=Path, default=None, help="llama-server built with CUDA (omit for a smoke run of vramsupply alone)")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--concurrency", default="1,4,16,64", help="levels of the tuned runs")
    parser.add_argument("--defaults-concurrency", default="1,4,16", help="levels of the runs at each server's defaults ('' for none)")
    parser.add_argument("--parallel", type=int, default=64)
    parser.add_argument("--context", type=int, default=2048, help="context per slot")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--build", default=None, help="how long the CUDA build of llama.cpp took, and where")
    parser.add_argument("--servers", default="", help="run only these (comma-separated names; default all)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tuned, defaults = parse_levels(args.concurrency), parse_levels(args.defaults_concurrency)
    cfg = BenchConfig(
        models=(args.model,), servers=(), concurrency=tuned, requests_per_slot=2,
        max_tokens=args.max_tokens, rounds=args.rounds, parallel=args.parallel, context_per_slot=args.context, threads=0,
        vramsupply_bin=args.vramsupply,
    )
    tuned_servers = tuned_specs(args.llama_server)
    # Drafts are made only for a request decoding alone: the run with them needs c = 1 alone.
    plan = [(tuned_servers[name], (1,) if name == "vramsupply-draft8" else tuned) for name in TUNED_ORDER if name in tuned_servers]
    if defaults:
        plan += [(spec, defaults) for spec in default_specs(args.llama_server).values()]
    if args.servers:
        plan = [(spec, levels) for spec, levels in plan if spec.name in args.servers.split(",")]
    extra = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": nvidia_smi(),
        "llama_cpp_build": args.build,
        "config": {"concurrency": tuned, "defaults_concurrency": defaults, "parallel": args.parallel,
                   "context_per_slot": args.context, "max_tokens": args.max_tokens, "rounds": args.rounds},
    }
    report = asyncio.run(bench(cfg, plan, args.model, args.out, extra))
    print(write_report(report, args.out))


if __name__ == "__main__":
    main()
