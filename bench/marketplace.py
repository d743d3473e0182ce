#!/usr/bin/env python3
"""A marketplace-shaped load: multi-turn chats behind a shared system prompt, more conversations than slots.

bench/run.py measures one shape (short prompts, 128 forced tokens). Paid traffic looks different:
conversations resend a growing history behind a shared ~300-token system prompt, prompts run from
50 to 2,000 tokens and answers from 20 to 400, and more conversations are open than a server has
slots. This bench replays one seeded trace of such conversations against each server, at several
Poisson arrival rates, and reports **goodput**: the completion tokens per second of requests that
met the service level a buyer would accept (first token within 1 s, at most 100 ms per output
token after it), over the trace's sending window (the same seconds for every server), and the
share of the trace's demanded tokens served so, next to plain throughput, TTFT and the servers'
peak RSS. Goodput over each server's own wall is kept beside it (``goodput_wall_tok_s``, the
goodput of results before the 49th session of wave 2): there a server that failed requests ended
those conversations early, finished sooner and so could score higher, and one that served late
requests to the end scored lower for it.

Every server runs at its defaults (only the model, host and port are given; llama_cpp.server
also gets the model's 4096-token context, since its own default of 2048 cannot hold the longest
turns, and queues requests instead of cutting off the running one). The client renders the
conversation as text and uses ``/v1/completions``, so all servers see the same tokens whatever
chat template they would pick. Outputs are forced to their planned length (``ignore_eos``, or a
logit bias against EOS where a server lacks it).

Servers run side by side and take turns per rate (rotated), with other processes' CPU recorded,
like bench/run.py. Each rate uses its own conversations, so no server profits from an earlier run.
One run's ratio moved by 2x with the hour on the shared bench VM (the same build gave 12.6 to 30.6
tok/s of goodput on one trace), so ``--repeat N`` replays every rate N times, each time on a fresh
trace and with the other server first, and the report gives each repeat's ratio and their median.

This file runs the servers and writes the results; the trace is drawn in bench/market_trace.py,
played and scored in bench/market_client.py, and tabled and charted in bench/market_report.py.

    bench/.cache/venv-llamacpp-server/bin/python bench/marketplace.py            # 3 servers, 4 rates: ~50 min
    bench/.cache/venv-llamacpp-server/bin/python bench/marketplace.py --quick    # smoke run on stories260K
    bench/.cache/venv-llamacpp-server/bin/python bench/marketplace.py --servers vramsupply,llama-server \
        --rates 0.1,0.2,0.4                                                      # ~26 min
    bench/.cache/venv-llamacpp-server/bin/python bench/marketplace.py --servers vramsupply --rates 0.2 \
        --against-args '--context-length 8192'                                   # a setting against its default
    bench/.cache/venv-llamacpp-server/bin/python bench/marketplace.py --servers vramsupply --rates 0.4 \
        --repeat 2 --against-ref HEAD~1                                          # a change against the code before it

A trace of 48 conversations (the default: three times vramsupply's 16 slots) runs about 48 / rate
seconds of arrivals and reaches a steady state; the earlier traces of 12 were mostly a ramp.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client import eos_token_id, request_bodies, run_level  # noqa: E402
from contention import hogs  # noqa: E402
from market_client import TPOT_SLO_S, TTFT_SLO_S, run_rate  # noqa: E402
from market_report import plot, summary_table  # noqa: E402
from market_trace import MAX_PROMPT_TOKENS, SYSTEM_TOKENS, Words  # noqa: E402
from servers import (  # noqa: E402
    BENCH_MODEL, CACHE, HOST, LLAMA_BIN, REPO, SERVERS, TINY_MODEL, BenchConfig, ServerSpec, machine_info, running_server,
    at_ref, versions, wait_ready, with_args, write_results,
)

REPEAT_SEED_STEP = 100
"""Seeds apart between repeats of a rate: rates take consecutive seeds, so this keeps every trace
of a run distinct for up to 100 rates."""


def default_command(name: str, threads: int | None):
    """Each server at its defaults: model, host and port only (see the module docstring for
    llama_cpp.server), plus the same thread count for all when ``--threads`` is given."""
    def command(cfg: BenchConfig, model: Path, port: int) -> list[str]:
        if name == "vramsupply":
            tuned = ["--threads", str(threads)] if threads else []
            return [str(cfg.vramsupply_bin), "serve", "--model", str(model), "--no-register", "--host", HOST,
                    "--port", str(port), *tuned]
        if name == "llama-server":
            tuned = ["-t", str(threads), "-tb", str(threads)] if threads else []
            return [str(LLAMA_BIN / "llama-server"), "-m", str(model), "--host", HOST, "--port", str(port), *tuned]
        tuned = ["--n_threads", str(threads), "--n_threads_batch", str(threads)] if threads else []
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_ctx", "4096",
                "--interrupt_requests", "False", "--host", HOST, "--port", str(port), *tuned]
    return command


def default_spec(name: str, runs: str | None = None) -> ServerSpec:
    """Server ``runs`` (default: ``name``) at its defaults, reported as ``name``: two builds of
    vramsupply side by side are two names that both run "vramsupply"."""
    runs = runs or name
    return ServerSpec(name, "defaults", SERVERS[runs].ready_path, SERVERS[runs].accepts_ignore_eos, default_command(runs, None))


def schedule(rates: list[float], repeats: int, first_seed: int, n_servers: int) -> list[tuple[int, float, int, int]]:
    """(repeat, rate, seed, first server's index) for every trace replayed: each rate gets seed
    ``first_seed`` + its index, plus ``REPEAT_SEED_STEP`` per repeat (a fresh trace, so no server finds
    the last repeat's conversations cached), and the server that goes first rotates with the rate and
    the repeat, so with two servers and an even number of repeats each goes first as often at each
    rate."""
    return [(rep, rate, first_seed + i + REPEAT_SEED_STEP * rep, (i + rep) % n_servers)
            for rep in range(repeats) for i, rate in enumerate(rates)]


def bench_specs(names: tuple[str, ...], threads: int | None, against_args: str | None, against_ref: str | None = None) -> list[ServerSpec]:
    """Each named server at its defaults, and with ``against_args`` a second vramsupply that gets
    those serve arguments too (named "vramsupply-with-args"): a setting against its default, on
    the same traces in the same minutes; with ``against_ref`` one running the code of that git
    ref (named "vramsupply-at-<commit>"): a change against the code before it."""
    def spec(name: str) -> ServerSpec:
        return ServerSpec(name, "defaults", SERVERS[name].ready_path, SERVERS[name].accepts_ignore_eos, default_command(name, threads))

    specs = [spec(name) for name in names]
    if against_args:
        specs.append(with_args(spec("vramsupply"), against_args.split(), "vramsupply-with-args"))
    if against_ref:
        specs.append(at_ref(spec("vramsupply"), against_ref))
    return specs


async def bench(cfg: BenchConfig, model: Path, rates: list[float], conversations: int, cap_s: float,
                threads: int | None, first_seed: int = 1000, repeats: int = 1, busy: int = 0,
                against_args: str | None = None, against_ref: str | None = None) -> dict:
    eos_id = eos_token_id(model)
    words = Words(model)
    specs = bench_specs(cfg.servers, threads, against_args, against_ref)
    results: dict[str, list[dict]] = {spec.name: [] for spec in specs}
    with ExitStack() as stack:
        servers = [stack.enter_context(running_server(spec, cfg, model)) for spec in specs]
        for server in servers:
            await wait_ready(server)
            await run_level(server.url, request_bodies(server.spec, 2, 8, eos_id), 2)
        stack.callback(lambda programs: [p.kill() for p in programs], hogs(busy))  # after the warm-up
        for rep, rate, seed, shift in schedule(rates, repeats, first_seed, len(servers)):
            for server in servers[shift:] + servers[:shift]:
                result = await run_rate(server, words, rate, conversations, seed=seed, eos_id=eos_id, cap_s=cap_s)
                results[server.spec.name].append(asdict(result) | {"repeat": rep, "seed": seed})
                print(f"  rate {rate:<5} {server.spec.name:18} goodput {result.goodput_tok_s:6.1f} tok/s  "
                      f"throughput {result.throughput_tok_s:6.1f}  met {result.good}/{result.requests}  "
                      f"TTFT p50 {result.ttft_p50_s} s  TPOT p50 {result.tpot_p50_ms} ms  RSS {result.peak_rss_mb:.0f} MB  "
                      f"wall {result.wall_s} s  others {result.other_cpu_cores} cores  err {result.errors} {result.first_error or ''}",
                      flush=True)
        peaks = {server.spec.name: round(server.monitor.total_peak_mb(), 1) for server in servers}
        kernel_peaks = {server.spec.name: round(server.monitor.high_water_mb(), 1) for server in servers}  # VmHWM, the load's too
        commands = {server.spec.name: server.command for server in servers}
    return {
        name: {"command": commands[name], "peak_rss_mb": peaks[name], "peak_rss_kernel_mb": kernel_peaks[name], "rates": rs}
        for name, rs in results.items()
    }


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run on stories260K: one low rate, 6 conversations")
    parser.add_argument("--model", type=Path, help="GGUF to serve (default: the bench model)")
    parser.add_argument("--servers", default="vramsupply,llama-server,llama_cpp.server")
    parser.add_argument("--rates", default="0.1,0.2,0.4,0.8",
                        help="conversation arrivals per second, comma-separated (0.8 overloads the 2-core bench VM)")
    parser.add_argument("--conversations", type=positive, default=48,
                        help="conversations per rate (default 48: 3x vramsupply's 16 default slots, the issue's "
                             "'at least 3x more conversations than slots'; the traces before 2026-12-05 had 12, 3x llama-server's 4)")
    parser.add_argument("--cap", type=float, default=60.0, help="seconds after the last arrival before unsent turns are dropped")
    parser.add_argument("--first-seed", type=int, default=1000, help="the first rate's trace seed; each next rate adds one (replay one rate's trace alone)")
    parser.add_argument("--repeat", type=positive, default=1,
                        help="replay each rate this many times, each on a fresh trace, the server going first alternating; "
                             "the report gives each repeat's ratio and their median (one run's ratio moves 2x with the hour)")
    parser.add_argument("--threads", type=int, help="give every server this many threads (default: each server's own default)")
    parser.add_argument("--against-args", metavar="ARGS",
                        help="also run vramsupply with these serve arguments (quoted), as \"vramsupply-with-args\": "
                             "e.g. '--parallel 4', a setting against its default on the same traces")
    parser.add_argument("--against-ref", metavar="REF",
                        help="also run vramsupply at this git ref (a worktree in bench/.cache/worktrees), as "
                             "\"vramsupply-at-<commit>\": a change against the code before it on the same traces")
    parser.add_argument("--busy", type=int, default=0,
                        help="run this many busy programs (while True: pass, a session of their own) beside the servers, after their warm-up")
    parser.add_argument("--vramsupply", type=Path, default=REPO / ".venv" / "bin" / "vramsupply")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/<date>-marketplace.json; the chart beside it)")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="measure nothing: redraw the table and chart of a results JSON")
    return parser


def replot(path: Path) -> None:
    report = json.loads(path.read_text())
    print(summary_table(report))
    plot(report, path.with_suffix(".png"))


def main() -> None:
    args = build_parser().parse_args()
    if args.replot:
        replot(args.replot)
        return
    model = args.model or (TINY_MODEL if args.quick else BENCH_MODEL)
    rates = [0.5] if args.quick else [float(r) for r in args.rates.split(",")]
    conversations = 6 if args.quick else args.conversations
    servers = tuple(s.strip() for s in args.servers.split(",") if s.strip())
    cfg = BenchConfig(models=(model,), servers=servers, concurrency=(1,), requests_per_slot=1, max_tokens=0,
                      rounds=1, parallel=0, context_per_slot=0, threads=0, vramsupply_bin=args.vramsupply)
    date = dt.date.today().isoformat()
    out = args.out or (CACHE / "quick" / "marketplace.json" if args.quick else REPO / "bench" / "results" / f"{date}-marketplace.json")
    print(f"load average {os.getloadavg()}, model {model.name}, rates {rates}, {conversations} conversations each", flush=True)
    started = time.perf_counter()
    report = {
        "date": date,
        "machine": machine_info(),
        "versions": versions(cfg),
        "config": {"model": str(model), "rates": rates, "conversations": conversations, "cap_s": args.cap,
                   "ttft_slo_s": TTFT_SLO_S, "tpot_slo_s": TPOT_SLO_S, "system_tokens": SYSTEM_TOKENS,
                   "max_prompt_tokens": MAX_PROMPT_TOKENS, "endpoint": "/v1/completions, streaming, temperature 0.7",
                   "threads": args.threads or "each server's default", "repeats": args.repeat, "busy_programs": args.busy, "against_args": args.against_args, "against_ref": args.against_ref},
        "servers": asyncio.run(bench(cfg, model, rates, conversations, args.cap, args.threads, args.first_seed, args.repeat, args.busy,
                                     args.against_args, args.against_ref)),
    }
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    report["duration_s"] = round(time.perf_counter() - started, 1)
    write_outputs(report, out)


def write_outputs(report: dict, out: Path) -> None:
    write_results(report, out)
    plot(report, out.with_suffix(".png"))
    print()
    print(summary_table(report))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
