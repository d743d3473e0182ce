"""The marketplace bench's client: it plays a trace's conversations against one server and scores every request.

A buyer accepts an answer whose first token came within 1 s and whose later tokens came at most
100 ms apart; **goodput** counts the completion tokens of such requests only, over the trace's
sending window (the same seconds for every server, so a ratio of goodputs is a ratio of good
tokens; over each server's own wall, a server that failed requests ended those conversations early
and so finished sooner, and a failure could raise its goodput). The client renders
each conversation as text and uses ``/v1/completions``, so all servers see the same tokens whatever
chat template they would pick, and forces every output to its planned length (``ignore_eos``, or a
logit bias against EOS where a server lacks it). A failed request ends its conversation, so the
share of the trace's demand served well is reported beside goodput.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field

import aiohttp
import numpy as np
import psutil

from market_trace import Conversation, Words, build_trace
from servers import RunningServer, ServerSpec, busy_cpu_seconds

TTFT_SLO_S = 1.0
TPOT_SLO_S = 0.100


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
    prompt_tokens: int | None = None
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


async def run_conversation(
    session: aiohttp.ClientSession, url: str, spec: ServerSpec, words: Words, rng: random.Random,
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
    session: aiohttp.ClientSession, url: str, spec: ServerSpec, prompt: str, max_tokens: int, eos_id: int,
    record: RequestRecord, timeout_s: float,
) -> str:
    body = completion_body(spec, prompt, max_tokens, eos_id, record.turn)
    start, parts, finish = time.perf_counter(), [], None
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
                finish = take_chunk(record, chunk, start, parts) or finish
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:200]
    record.duration_s = time.perf_counter() - start
    if not record.completion_tokens and finish == "length":
        record.completion_tokens = max_tokens  # servers without usage in streams: length means all of them
    return "".join(parts)


def completion_body(spec: ServerSpec, prompt: str, max_tokens: int, eos_id: int, seed: int) -> dict:
    body: dict = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7, "seed": seed,
                  "stream": True, "stream_options": {"include_usage": True}}
    if spec.accepts_ignore_eos:
        body["ignore_eos"] = True
    else:
        body["logit_bias"] = {str(eos_id): -100}
    return body


def take_chunk(record: RequestRecord, chunk: dict, start: float, parts: list[str]) -> str | None:
    """Count one stream chunk into ``record`` and its text into ``parts``; the finish reason it carries, if any."""
    if chunk.get("usage"):
        record.completion_tokens = chunk["usage"]["completion_tokens"]
        record.prompt_tokens = chunk["usage"].get("prompt_tokens")
        details = chunk["usage"].get("prompt_tokens_details") or {}
        record.cached_tokens = details.get("cached_tokens")
    finish = None
    for choice in chunk.get("choices", []):
        if choice.get("text"):
            if record.ttft_s is None:
                record.ttft_s = time.perf_counter() - start
            parts.append(choice["text"])
        finish = choice.get("finish_reason") or finish
    return finish


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
    """Good completion tokens over ``window_s``, the same seconds for every server on a trace."""
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
    window_s: float = 0.0
    """The trace's sending window: from the start to the last conversation's start plus the cap,
    after which no request is sent. It depends on the trace alone, so goodput ratios between servers
    are ratios of good tokens."""
    goodput_wall_tok_s: float = 0.0
    """Good completion tokens over ``wall_s`` (the goodput of results before 2026-12-07's 49th session):
    a server that takes longer to finish late requests, or fails requests and so ends their
    conversations early, moves its own wall, so a failed request could raise it."""
    records: list[dict] = field(default_factory=list)


def pct(values: list[float], q: float, scale: float = 1.0) -> float | None:
    return round(float(np.percentile(values, q)) * scale, 3) if values else None


async def run_rate(server: RunningServer, words: Words, rate: float, conversations: int, seed: int,
                   eos_id: int, cap_s: float) -> RateResult:
    rng = random.Random(seed)
    system, trace = build_trace(words, rng, conversations, rate)
    records: list[RequestRecord] = []
    server.monitor.start_window()
    server_cpu, busy = server.monitor.cpu_seconds(), busy_cpu_seconds()
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
    other = max(0.0, busy_cpu_seconds() - busy - server_cpu - client_cpu)
    window = trace[-1].starts_at + cap_s
    return rate_result(rate, conversations, trace, records, (wall, window), server_cpu, other, server.monitor.window_peak_mb())


def rate_result(rate: float, conversations: int, trace: list[Conversation], records: list[RequestRecord],
                seconds: tuple[float, float], server_cpu: float, other: float, peak_rss_mb: float) -> RateResult:
    """One rate's numbers from its records: goodput counts only the requests that met the service
    level, over the trace's window (``seconds``: the wall, then the window)."""
    wall, window = seconds
    ok = [r for r in records if r.error is None]
    good = [r for r in records if r.good]
    good_tokens = sum(r.completion_tokens for r in good)
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    errors = [r.error for r in records if r.error]
    demand = sum(turn.output_tokens for c in trace for turn in c.turns)
    return RateResult(
        rate=rate, conversations=conversations, requests=len(records), good=len(good), errors=len(errors),
        wall_s=round(wall, 2), completion_tokens=sum(r.completion_tokens for r in ok),
        goodput_tok_s=round(good_tokens / window, 1), window_s=round(window, 2), goodput_wall_tok_s=round(good_tokens / wall, 1),
        throughput_tok_s=round(sum(r.completion_tokens for r in ok) / wall, 1),
        ttft_p50_s=pct([r.ttft_s for r in ok if r.ttft_s is not None], 50),
        ttft_p90_s=pct([r.ttft_s for r in ok if r.ttft_s is not None], 90),
        tpot_p50_ms=pct([r.tpot_s for r in ok if r.tpot_s is not None], 50, 1000),
        prompt_chars_mean=round(float(np.mean([r.prompt_chars for r in records])), 0) if records else 0,
        cached_tokens_total=sum(cached) if cached else None,
        peak_rss_mb=round(peak_rss_mb, 1),
        server_cpu_s=round(server_cpu, 1), other_cpu_cores=round(other / wall, 2),
        first_error=errors[0] if errors else None,
        demand_tokens=demand,
        served_well=round(good_tokens / demand, 3) if demand else 0.0,
        records=[{**asdict(r), "tpot_s": r.tpot_s, "good": r.good} for r in records],
    )
