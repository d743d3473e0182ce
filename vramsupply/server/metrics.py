"""Prometheus metrics of one server, in a registry of its own.

A per-app ``CollectorRegistry`` (not prometheus-client's global one) lets several apps live in one
process, as they do in tests, without clashing metric names. Slot and queue gauges and the token
counters are read from the engine at scrape time, so they are never stale, and the token counts
are the very numbers heartbeats report: one source for what the platform bills. A request's own
clock (``RequestClock``: its first text, each choice's first and last token) feeds the TTFT and
per-token histograms.
"""

from __future__ import annotations

import dataclasses
import time

from collections.abc import Callable

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from vramsupply.engine import EngineStats, Usage

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """Counters the handlers update and gauges sampled from ``stats`` (``None`` while loading)."""

    def __init__(self, stats: Callable[[], EngineStats | None], ledger_failure: Callable[[], str | None] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        self._stats = stats
        self.requests = Counter(
            "vramsupply_requests", "HTTP requests answered, by route and status code", ["route", "status"], registry=self.registry
        )
        self.registry.register(EngineCounters(stats))
        self.ttft = Histogram(
            "vramsupply_time_to_first_token_seconds",
            "Seconds from receiving a request to its first generated text",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "vramsupply_time_per_output_token_seconds",
            "Mean seconds between generated tokens after the first, one observation per choice",
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self._gauge("vramsupply_model_loaded", "1 once the model is loaded and requests are served", lambda s: 1)
        self._gauge("vramsupply_slots_total", "Slots (requests decoded concurrently)", lambda s: s.slots_total)
        self._gauge("vramsupply_slots_busy", "Slots working on a request", lambda s: s.slots_busy)
        self._gauge("vramsupply_queue_depth", "Requests waiting for a free slot", lambda s: s.queue_depth)
        self._gauge("vramsupply_prompt_cache_bytes", "Host memory the prompt cache holds (within --cache-ram)", lambda s: s.prompt_cache_bytes)
        self._gauge("vramsupply_prompt_cache_entries", "Prompts kept in the host prompt cache", lambda s: s.prompt_cache_entries)
        self._gauge("vramsupply_prompt_cache_bound_bytes", "Host memory the prompt cache keeps to: what recent restores reach, within --cache-ram",
                    lambda s: s.prompt_cache_bound_bytes)
        self._gauge("vramsupply_checkpoint_bytes", "Host memory of the recurrent-state checkpoints the slots keep (outside --cache-ram)",
                    lambda s: s.checkpoint_bytes)
        self._gauge("vramsupply_cpu_threads", "CPU threads the decode uses now: fewer than the cores while other programs keep them busy",
                    lambda s: s.cpu_threads)
        self._gauge("vramsupply_engine_healthy", "1 while the engine can serve; 0 once it failed (see /health)", lambda s: s.failure is None)
        Gauge("vramsupply_ledger_healthy", "1 while the earnings ledger records what is served; 0 while it cannot (the reason is in /health's warnings)",
              registry=self.registry).set_function(lambda: float(ledger_failure() is None))

    def _gauge(self, name: str, documentation: str, read: Callable[[EngineStats], int]) -> None:
        def sample() -> float:
            stats = self._stats()
            return 0.0 if stats is None else float(read(stats))

        Gauge(name, documentation, registry=self.registry).set_function(sample)

    def observe_choice(self, usage: Usage | None, first_token_at: float | None, last_token_at: float | None) -> None:
        """Per-token latency of one finished choice: the mean gap between its tokens."""
        if usage is None or first_token_at is None or last_token_at is None or usage.completion_tokens < 2:
            return
        self.tpot.observe((last_token_at - first_token_at) / (usage.completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCounters:
    """The engine's token counters as Prometheus counters, sampled at scrape time."""

    COUNTERS = (
        ("vramsupply_prompt_tokens", "Prompt tokens served (a request's prompt counts once, whatever its n)", "prompt_tokens_total"),
        ("vramsupply_cached_prompt_tokens", "Prompt tokens reused from a slot's KV cache", "cached_tokens_total"),
        ("vramsupply_prefill_tokens", "Prompt tokens actually decoded (cached and shared prompts are not)", "prefill_tokens_total"),
        ("vramsupply_completion_tokens", "Completion tokens generated", "completion_tokens_total"),
        ("vramsupply_preemptions", "Requests paused because the shared KV cache was full, resumed from the host prompt cache (else by recomputing)", "preemptions_total"),
        ("vramsupply_prompt_cache_saves", "Slots' KV copied to the host prompt cache", "prompt_cache_saves_total"),
        ("vramsupply_prompt_cache_skipped_saves", "Slots' KV dropped, not saved: the copy would cost more than its expected reuse spares",
         "prompt_cache_skipped_saves_total"),
        ("vramsupply_checkpoints", "Recurrent states (Mamba, Qwen3.5's linear layers) copied near a prompt's end or shared start",
         "checkpoints_total"),
        ("vramsupply_checkpoint_restores", "Prompts of a recurrent model started from a checkpoint instead of from nothing",
         "checkpoint_restores_total"),
        ("vramsupply_draft_tokens", "Tokens drafted by prompt lookup (--draft-max) and verified in a decode step", "draft_tokens_total"),
        ("vramsupply_draft_accepted_tokens", "Drafted tokens the model confirmed (each one saved a decode step)", "draft_accepted_total"),
        ("vramsupply_cpu_thread_switches", "Times the decode changed its CPU threads for a busy or a freed machine", "thread_switches_total"),
    )

    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for name, documentation, field in self.COUNTERS:
            yield CounterMetricFamily(name, documentation, value=0 if stats is None else getattr(stats, field))


@dataclasses.dataclass
class ChoiceTiming:
    first_token_at: float | None = None
    last_token_at: float | None = None


@dataclasses.dataclass
class RequestClock:
    """When the request arrived and, per choice, when text came: the TTFT and per-token metrics."""

    started: float
    first_text_at: float | None = None
    choices: dict[int, ChoiceTiming] = dataclasses.field(default_factory=dict)

    def mark(self, index: int, metrics: ServerMetrics) -> None:
        at = time.monotonic()
        if self.first_text_at is None:
            self.first_text_at = at
            metrics.ttft.observe(at - self.started)
        timing = self.choices.get(index)
        if timing is None:
            timing = self.choices[index] = ChoiceTiming(first_token_at=at)
        timing.last_token_at = at
