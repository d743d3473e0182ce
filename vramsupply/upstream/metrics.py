"""The upstream's load, read from its own Prometheus ``/metrics``.

Each engine names its gauges differently; the platform needs two numbers from any of them:
requests running (our "slots busy") and requests waiting (our "queue depth"); the provider's own
``/metrics`` also shows how full the KV cache is. ``GAUGES`` maps each engine to its names, and
``read_load`` sums the counts over label sets (vLLM labels its gauges by model and engine index, so
a multi-engine deployment has several series) and takes the fullest cache. A value that is not a
finite, non-negative number (an engine's ``NaN`` or ``+Inf``) is skipped: it says nothing of the
load, and a count made of it would break every heartbeat after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class LoadGauges:
    running: tuple[str, ...]
    waiting: tuple[str, ...]
    cache_usage: tuple[str, ...] = ()


GAUGES: dict[str, LoadGauges] = {
    "vllm": LoadGauges(("vllm:num_requests_running",), ("vllm:num_requests_waiting",), ("vllm:kv_cache_usage_perc",)),
    "sglang": LoadGauges(("sglang:num_running_reqs",), ("sglang:num_queue_reqs",), ("sglang:token_usage",)),
    "llama.cpp": LoadGauges(("llamacpp:requests_processing",), ("llamacpp:requests_deferred",), ("llamacpp:kv_cache_usage_ratio",)),
}
"""Per engine kind: vLLM (docs: metrics), SGLang (``--enable-metrics``), llama-server (``--metrics``)."""

ANY_ENGINE = LoadGauges(
    running=tuple(name for gauges in GAUGES.values() for name in gauges.running),
    waiting=tuple(name for gauges in GAUGES.values() for name in gauges.waiting),
    cache_usage=tuple(name for gauges in GAUGES.values() for name in gauges.cache_usage),
)
"""For ``--engine upstream``: whichever of the known names the server exposes."""


MAX_GAUGE = 1e9
"""Far above any engine's requests in flight: beyond it a gauge is nonsense, not load."""


@dataclass(frozen=True)
class UpstreamLoad:
    running: int
    waiting: int
    cache_usage: float | None = None
    """Fraction of the KV cache in use (0 to 1), where the engine reports it."""


def read_load(text: str, gauges: LoadGauges = ANY_ENGINE) -> UpstreamLoad | None:
    """Requests running and waiting from a Prometheus exposition; None when it has neither gauge."""
    totals: dict[str, float] = {}
    fullest: float | None = None
    wanted = set(gauges.running) | set(gauges.waiting)
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not (math.isfinite(sample.value) and 0 <= sample.value <= MAX_GAUGE):
                    continue
                if sample.name in wanted:
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
                elif sample.name in gauges.cache_usage:
                    fullest = sample.value if fullest is None else max(fullest, sample.value)
    except ValueError:
        return None
    running = [totals[name] for name in gauges.running if name in totals]
    waiting = [totals[name] for name in gauges.waiting if name in totals]
    if not running and not waiting:
        return None
    return UpstreamLoad(running=int(min(sum(running), MAX_GAUGE)), waiting=int(min(sum(waiting), MAX_GAUGE)), cache_usage=fullest)
