#!/usr/bin/env python3
"""A marketplace-shaped load: multi-turn chats behind a shared system prompt, more conversations than slots.

bench/run.py measures one shape (short prompts, 128 forced tokens). Paid traffic looks different:
conversations resend a growing history behind a shared ~300-token system prompt, prompts run from
50 to 2,000 tokens and answers from 20 to 400, and more conversations are open than a server has
slots. This bench replays one seeded trace of such conversations against each server, at several
Poisson arrival rates, and reports **goodput**: the completion tokens per second of requests that
met the service level a buyer would accept (first token within 1 s, at most 100 ms per output
token after it), and the share of the trace's demanded tokens served so (a server that fails
requests ends those conversations early, which shortens its wall and so raises its goodput, but
not that share), next to plain throughput, TTFT and the servers' peak RSS.

Every server runs at its defaults (only the model, host and port are given; llama_cpp.server
also gets the model's 4096-token context, since its own default of 2048 cannot hold the longest
turns, and queues requests instead of cutting off the running one). The client renders the
conversation as text and uses ``/v1/completions``, so all servers see the same tokens whatever
chat template they would pick. Outputs are forced to their planned length (``ignore_eos``, or a
logit bias against EOS where a server lacks it).

Servers run side by side and take turns per rate (rotated), with other processes' CPU recorded,
like bench/run.py. Each rate uses its own conversations, so no server profits from an earlier run.

    bench/.cache/venv-llamacpp-server/bin/python bench/marketplace.py            # ~20 min
    bench/.cache/venv-llamacpp-server/bin/python bench/marketplace.py --quick    # smoke run on stories260K
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as sweep  # noqa: E402  (bench/run.py: server specs, process monitor, machine info)

TTFT_SLO_S = 1.0
TPOT_SLO_S = 0.100
SYSTEM_TOKENS = 300
MAX_PROMPT_TOKENS = 2000
WORDS = (
    "market order price buyer seller token model answer question provider latency budget contract summary report "
    "data table chart value change reason result draft review update plan risk cost share team client request "
    "service region network memory storage compute energy batch cache queue stream window context history turn"
).split()


@dataclass(frozen=True)
class Turn:
    user_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Conversation:
    index: int
    starts_at: float
    system: bool
    opening: str
    turns: tuple[Turn, ...]
    think_s: tuple[float, ...]


@dataclass
class RequestRecord:
    conversation: int
    turn: int
    prompt_chars: int
    planned_tokens: int
    sent_at: float
    ttft_s: float | None = None
    duration_s: float | None = None
    completion_tokens: int = 0
    cached_tokens: int | None = None
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.duration_s is None or self.completion_tokens < 2:
            return None
        return (self.duration_s - self.ttft_s) / (self.completion_tokens - 1)

    @property
    def good(self) -> bool:
        return (
            self.error is None
            and self.completion_tokens == self.planned_tokens
            and self.ttft_s is not None
            and self.ttft_s <= TTFT_SLO_S
            and (self.tpot_s is None or self.tpot_s <= TPOT_SLO_S)
        )


class Words:
    """Filler text of a wanted token length, measured with the model's own tokenizer."""

    def __init__(self, model: Path) -> None:
        from llama_cpp import Llama

        self._llama = Llama(model_path=str(model), vocab_only=True, verbose=False)

    def count(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode(), add_bos=False))

    def text(self, rng: random.Random, tokens: int) -> str:
        words = [rng.choice(WORDS) for _ in range(tokens)]
        text = " ".join(words)
        while self.count(text) > tokens and words:
            words.pop()
            text = " ".join(words)
        return text


def build_trace(words: Words, rng: random.Random, conversations: int, rate: float) -> tuple[str, list[Conversation]]:
    """Conversation starts are a Poisson process at ``rate`` per second; each has 1-4 turns.

    Four in five chats share the system prompt; the rest are one-off questions without it. A
    conversation ends before its prompt would pass MAX_PROMPT_TOKENS.
    """
    system = "System: You are a helpful assistant on the vram.supply marketplace. " + words.text(rng, SYSTEM_TOKENS - 16)
    trace, clock = [], 0.0
    for index in range(conversations):
        clock += rng.expovariate(rate)
        has_system = rng.random() < 0.8
        history = SYSTEM_TOKENS if has_system else 0
        turns = []
        for number in range(rng.randint(1, 4) if has_system else 1):
            user = rng.randint(50, 600) if number == 0 else rng.randint(20, 300)
            output = min(400, max(20, int(rng.lognormvariate(4.3, 0.8))))
            if history + user > MAX_PROMPT_TOKENS:
                break
            turns.append(Turn(user, output))
            history += user + output
        think = tuple(rng.expovariate(1 / 3.0) for _ in turns)
        trace.append(Conversation(index, clock, has_system, words.text(rng, turns[0].user_tokens), tuple(turns), think))
    return system, trace


async def run_conversation(
    session: aiohttp.ClientSession, url: str, spec: sweep.ServerSpec, words: Words, rng: random.Random,
    system: str, conversation: Conversation, eos_id: int, t0: float, records: list[RequestRecord], deadline: float,
) -> None:
    await asyncio.sleep(max(0.0, t0 + conversation.starts_at - time.perf_counter()))
    history = (system + "\n") if conversation.system else ""
    user = conversation.opening
    for number, turn in enumerate(conversation.turns):
        history += f"User: {user}\nAssistant:"
        record = RequestRecord(conversation.index, number, len(history), turn.output_tokens, time.perf_counter() - t0)
        records.append(record)
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            record.error = "not sent: the run's time cap was reached"
            return
        reply = await complete(session, url, spec, history, turn.output_tokens, eos_id, record, remaining)
        if record.error is not None:
            return
        history += reply + "\n"
        await asyncio.sleep(conversation.think_s[number])
        if number + 1 < len(conversation.turns):
            user = words.text(rng, conversation.turns[number + 1].user_tokens)


async def complete(
    session: aiohttp.ClientSession, url: str, spec: sweep.ServerSpec, prompt: str, max_tokens: int, eos_id: int,
    record: RequestRecord, timeout_s: float,
) -> str:
    body: dict = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7, "seed": record.turn,
                  "stream": True, "stream_options": {"include_usage": True}}
    if spec.accepts_ignore_eos:
        body["ignore_eos"] = True
    else:
        body["logit_bias"] = {str(eos_id): -100}
    start, parts, chunks, finish = time.perf_counter(), [], 0, None
    try:
        async with session.post(f"{url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                record.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return ""
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("error"):  # an error after the 200 status, inside the stream
                    record.error = f"in-stream error: {json.dumps(chunk['error'])}"[:200]
                    break
                if chunk.get("usage"):
                    record.completion_tokens = chunk["usage"]["completion_tokens"]
                    details = chunk["usage"].get("prompt_tokens_details") or {}
                    record.cached_tokens = details.get("cached_tokens")
                for choice in chunk.get("choices", []):
                    if choice.get("text"):
                        if record.ttft_s is None:
                            record.ttft_s = time.perf_counter() - start
                        parts.append(choice["text"])
                        chunks += 1
                    finish = choice.get("finish_reason") or finish
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:200]
    record.duration_s = time.perf_counter() - start
    if not record.completion_tokens and finish == "length":
        record.completion_tokens = max_tokens  # servers without usage in streams: length means all of them
    return "".join(parts)


@dataclass
class RateResult:
    rate: float
    conversations: int
    requests: int
    good: int
    errors: int
    wall_s: float
    completion_tokens: int
    goodput_tok_s: float
    throughput_tok_s: float
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    tpot_p50_ms: float | None
    prompt_chars_mean: float
    cached_tokens_total: int | None
    peak_rss_mb: float
    server_cpu_s: float
    other_cpu_cores: float
    first_error: str | None = None
    demand_tokens: int = 0
    """Completion tokens the whole trace asks for, turns never sent included (an error ends a
    conversation, and a server that fails requests also has fewer to serve and a shorter wall)."""
    served_well: float = 0.0
    """Of ``demand_tokens``, the share that came within the service level: unlike goodput, not
    raised by ending conversations early."""
    records: list[dict] = field(default_factory=list)


def pct(values: list[float], q: float, scale: float = 1.0) -> float | None:
    return round(float(np.percentile(values, q)) * scale, 3) if values else None


async def run_rate(server: sweep.RunningServer, words: Words, rate: float, conversations: int, seed: int,
                   eos_id: int, cap_s: float) -> RateResult:
    rng = random.Random(seed)
    system, trace = build_trace(words, rng, conversations, rate)
    records: list[RequestRecord] = []
    server.monitor.start_window()
    server_cpu, busy = server.monitor.cpu_seconds(), sweep.busy_cpu_seconds()
    client = psutil.Process()
    client_cpu = sum(client.cpu_times()[:2])
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        deadline = t0 + trace[-1].starts_at + cap_s
        await asyncio.gather(*(
            run_conversation(session, server.url, server.spec, words, random.Random(seed * 1000 + c.index), system, c,
                             eos_id, t0, records, deadline)
            for c in trace
        ))
        wall = time.perf_counter() - t0
    server_cpu = server.monitor.cpu_seconds() - server_cpu
    client_cpu = sum(client.cpu_times()[:2]) - client_cpu
    other = max(0.0, sweep.busy_cpu_seconds() - busy - server_cpu - client_cpu)
    ok = [r for r in records if r.error is None]
    good = [r for r in records if r.good]
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    errors = [r.error for r in records if r.error]
    return RateResult(
        rate=rate, conversations=conversations, requests=len(records), good=len(good), errors=len(errors),
        wall_s=round(wall, 2), completion_tokens=sum(r.completion_tokens for r in ok),
        goodput_tok_s=round(sum(r.completion_tokens for r in good) / wall, 1),
        throughput_tok_s=round(sum(r.completion_tokens for r in ok) / wall, 1),
        ttft_p50_s=pct([r.ttft_s for r in ok if r.ttft_s is not None], 50),
        ttft_p90_s=pct([r.ttft_s for r in ok if r.ttft_s is not None], 90),
        tpot_p50_ms=pct([r.tpot_s for r in ok if r.tpot_s is not None], 50, 1000),
        prompt_chars_mean=round(float(np.mean([r.prompt_chars for r in records])), 0) if records else 0,
        cached_tokens_total=sum(cached) if cached else None,
        peak_rss_mb=round(server.monitor.window_peak_mb(), 1),
        server_cpu_s=round(server_cpu, 1), other_cpu_cores=round(other / wall, 2),
        first_error=errors[0] if errors else None,
        demand_tokens=(demand := sum(turn.output_tokens for c in trace for turn in c.turns)),
        served_well=round(sum(r.completion_tokens for r in good) / demand, 3) if demand else 0.0,
        records=[{**asdict(r), "tpot_s": r.tpot_s, "good": r.good} for r in records],
    )


def default_command(name: str, threads: int | None):
    """Each server at its defaults: model, host and port only (see the module docstring for
    llama_cpp.server), plus the same thread count for all when ``--threads`` is given."""
    def command(cfg: sweep.BenchConfig, model: Path, port: int) -> list[str]:
        if name == "vramsupply":
            tuned = ["--threads", str(threads)] if threads else []
            return [str(cfg.vramsupply_bin), "serve", "--model", str(model), "--no-register", "--host", sweep.HOST,
                    "--port", str(port), *tuned]
        if name == "llama-server":
            tuned = ["-t", str(threads), "-tb", str(threads)] if threads else []
            return [str(sweep.LLAMA_BIN / "llama-server"), "-m", str(model), "--host", sweep.HOST, "--port", str(port), *tuned]
        tuned = ["--n_threads", str(threads), "--n_threads_batch", str(threads)] if threads else []
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_ctx", "4096",
                "--interrupt_requests", "False", "--host", sweep.HOST, "--port", str(port), *tuned]
    return command


def summary_table(report: dict) -> str:
    lines = ["| rate (conv/s) | server | goodput tok/s | demand served well | throughput tok/s | met SLO | TTFT p50 | TTFT p90 | "
             "TPOT p50 | cached tokens | peak RSS | others' CPU |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rate in report["config"]["rates"]:
        for name, server in report["servers"].items():
            r = next(x for x in server["rates"] if x["rate"] == rate)
            lines.append(
                f"| {rate} | {name} | {r['goodput_tok_s']} | {r.get('served_well', 0):.0%} | {r['throughput_tok_s']} | {r['good']}/{r['requests']} | "
                f"{r['ttft_p50_s']} s | {r['ttft_p90_s']} s | {r['tpot_p50_ms']} ms | {r['cached_tokens_total'] or '–'} | "
                f"{r['peak_rss_mb']:.0f} MB | {r['other_cpu_cores']} cores |")
    lines += ["", "| rate | goodput ÷ llama-server | goodput ÷ llama_cpp.server | served well ÷ llama-server |", "|---|---|---|---|"]
    servers = report["servers"]
    for rate in report["config"]["rates"]:
        ours = next(x for x in servers["vramsupply"]["rates"] if x["rate"] == rate)["goodput_tok_s"] if "vramsupply" in servers else None
        ratios = []
        for ref in ("llama-server", "llama_cpp.server"):
            theirs = next((x for x in servers.get(ref, {}).get("rates", []) if x["rate"] == rate), None)
            ratios.append(f"{ours / theirs['goodput_tok_s']:.2f}" if ours is not None and theirs and theirs["goodput_tok_s"] else "–")
        ratios.append(served_ratio(servers, rate))
        lines.append(f"| {rate} | {ratios[0]} | {ratios[1]} | {ratios[2]} |")
    return "\n".join(lines)


def served_ratio(servers: dict, rate: float) -> str:
    """vramsupply's share of the demand served well over llama-server's, at ``rate``."""
    shares = [next((x.get("served_well") for x in servers.get(name, {}).get("rates", []) if x["rate"] == rate), None)
              for name in ("vramsupply", "llama-server")]
    return f"{shares[0] / shares[1]:.2f}" if shares[0] is not None and shares[1] else "–"


def plot(report: dict, path: Path) -> None:
    """Goodput, throughput and TTFT p50 against the arrival rate, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = report["config"]["rates"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, server in report["servers"].items():
        by_rate = {r["rate"]: r for r in server["rates"]}
        axes[0].plot(rates, [by_rate[r]["goodput_tok_s"] for r in rates], marker="o", label=name)
        axes[1].plot(rates, [by_rate[r]["throughput_tok_s"] for r in rates], marker="o", label=name)
        axes[2].plot(rates, [by_rate[r]["ttft_p50_s"] for r in rates], marker="o", label=name)
    titles = (f"goodput tok/s (TTFT <= {TTFT_SLO_S:g} s, TPOT <= {TPOT_SLO_S * 1000:g} ms)", "throughput tok/s", "TTFT p50 (s, log)")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("conversation arrivals per second")
        ax.set_xticks(rates, [str(r) for r in rates])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(bottom=0)
    axes[2].set_yscale("log")
    fig.suptitle(f"vramsupply marketplace bench {report['date']}: {report['config']['conversations']} conversations per rate, "
                 f"{report['machine']['cpu']}, threads: {report['config']['threads']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def bench(cfg: sweep.BenchConfig, model: Path, rates: list[float], conversations: int, cap_s: float,
                threads: int | None, first_seed: int = 1000) -> dict:
    eos_id = sweep.eos_token_id(model)
    words = Words(model)
    specs = [sweep.ServerSpec(name, "defaults", sweep.SERVERS[name].ready_path, sweep.SERVERS[name].accepts_ignore_eos,
                              default_command(name, threads)) for name in cfg.servers]
    results: dict[str, list[RateResult]] = {spec.name: [] for spec in specs}
    with ExitStack() as stack:
        servers = [stack.enter_context(sweep.running_server(spec, cfg, model)) for spec in specs]
        for server in servers:
            await sweep.wait_ready(server)
            await sweep.run_level(server.url, sweep.request_bodies(server.spec, 2, 8, eos_id), 2)
        for i, rate in enumerate(rates):
            shift = i % len(servers)
            for server in servers[shift:] + servers[:shift]:
                result = await run_rate(server, words, rate, conversations, seed=first_seed + i, eos_id=eos_id, cap_s=cap_s)
                results[server.spec.name].append(result)
                print(f"  rate {rate:<5} {server.spec.name:18} goodput {result.goodput_tok_s:6.1f} tok/s  "
                      f"throughput {result.throughput_tok_s:6.1f}  met {result.good}/{result.requests}  "
                      f"TTFT p50 {result.ttft_p50_s} s  TPOT p50 {result.tpot_p50_ms} ms  RSS {result.peak_rss_mb:.0f} MB  "
                      f"wall {result.wall_s} s  others {result.other_cpu_cores} cores  err {result.errors} {result.first_error or ''}",
                      flush=True)
        peaks = {server.spec.name: round(server.monitor.total_peak_mb(), 1) for server in servers}
        commands = {server.spec.name: server.command for server in servers}
    return {
        name: {"command": commands[name], "peak_rss_mb": peaks[name], "rates": [asdict(r) for r in rs]}
        for name, rs in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run on stories260K: one low rate, 6 conversations")
    parser.add_argument("--model", type=Path, help="GGUF to serve (default: the bench model)")
    parser.add_argument("--servers", default="vramsupply,llama-server,llama_cpp.server")
    parser.add_argument("--rates", default="0.1,0.2,0.4,0.8",
                        help="conversation arrivals per second, comma-separated (0.8 overloads the 2-core bench VM)")
    parser.add_argument("--conversations", type=int, default=12, help="conversations per rate (default 12: 3x llama-server's 4 default slots; vramsupply has 16)")
    parser.add_argument("--cap", type=float, default=60.0, help="seconds after the last arrival before unsent turns are dropped")
    parser.add_argument("--first-seed", type=int, default=1000, help="the first rate's trace seed; each next rate adds one (replay one rate's trace alone)")
    parser.add_argument("--threads", type=int, help="give every server this many threads (default: each server's own default)")
    parser.add_argument("--vramsupply", type=Path, default=sweep.REPO / ".venv" / "bin" / "vramsupply")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/<date>-marketplace.json; the chart beside it)")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="measure nothing: redraw the table and chart of a results JSON")
    args = parser.parse_args()
    if args.replot:
        report = json.loads(args.replot.read_text())
        print(summary_table(report))
        plot(report, args.replot.with_suffix(".png"))
        return
    model = args.model or (sweep.TINY_MODEL if args.quick else sweep.BENCH_MODEL)
    rates = [0.5] if args.quick else [float(r) for r in args.rates.split(",")]
    conversations = 6 if args.quick else args.conversations
    servers = tuple(s.strip() for s in args.servers.split(",") if s.strip())
    cfg = sweep.BenchConfig(models=(model,), servers=servers, concurrency=(1,), requests_per_slot=1, max_tokens=0,
                            rounds=1, parallel=0, context_per_slot=0, threads=0, vramsupply_bin=args.vramsupply)
    date = dt.date.today().isoformat()
    out = args.out or (sweep.CACHE / "quick" / "marketplace.json" if args.quick else sweep.REPO / "bench" / "results" / f"{date}-marketplace.json")
    print(f"load average {os.getloadavg()}, model {model.name}, rates {rates}, {conversations} conversations each", flush=True)
    started = time.perf_counter()
    report = {
        "date": date,
        "machine": sweep.machine_info(),
        "versions": sweep.versions(cfg),
        "config": {"model": str(model), "rates": rates, "conversations": conversations, "cap_s": args.cap,
                   "ttft_slo_s": TTFT_SLO_S, "tpot_slo_s": TPOT_SLO_S, "system_tokens": SYSTEM_TOKENS,
                   "max_prompt_tokens": MAX_PROMPT_TOKENS, "endpoint": "/v1/completions, streaming, temperature 0.7",
                   "threads": args.threads or "each server's default"},
        "servers": asyncio.run(bench(cfg, model, rates, conversations, args.cap, args.threads, args.first_seed)),
    }
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    report["duration_s"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out.with_suffix(".png"))
    print()
    print(summary_table(report))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
