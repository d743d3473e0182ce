"""The upstream's load, read from its own Prometheus ``/metrics``.

Each engine names its gauges differently; the platform only needs two numbers from any of them:
requests running (our "slots busy") and requests waiting (our "queue depth"). ``GAUGES`` maps each
engine to its names, and ``read_load`` sums them over label sets (vLLM labels its gauges by model
and engine index, so a multi-engine deployment has several series).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class LoadGauges:
    running: tuple[str, ...]
    waiting: tuple[str, ...]


GAUGES: dict[str, LoadGauges] = {
    "vllm": LoadGauges(running=("vllm:num_requests_running",), waiting=("vllm:num_requests_waiting",)),
    "sglang": LoadGauges(running=("sglang:num_running_reqs",), waiting=("sglang:num_queue_reqs",)),
    "llama.cpp": LoadGauges(running=("llamacpp:requests_processing",), waiting=("llamacpp:requests_deferred",)),
}
"""Per engine kind: vLLM (docs: metrics), SGLang (``--enable-metrics``), llama-server (``--metrics``)."""

ANY_ENGINE = LoadGauges(
    running=tuple(name for gauges in GAUGES.values() for name in gauges.running),
    waiting=tuple(name for gauges in GAUGES.values() for name in gauges.waiting),
)
"""For ``--engine upstream``: whichever of the known names the server exposes."""


@dataclass(frozen=True)
class UpstreamLoad:
    running: int
    waiting: int


def read_load(text: str, gauges: LoadGauges = ANY_ENGINE) -> UpstreamLoad | None:
    """Requests running and waiting from a Prometheus exposition; None when it has neither gauge."""
    totals: dict[str, float] = {}
    wanted = set(gauges.running) | set(gauges.waiting)
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted:
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    except ValueError:
        return None
    running = [totals[name] for name in gauges.running if name in totals]
    waiting = [totals[name] for name in gauges.waiting if name in totals]
    if not running and not waiting:
        return None
    return UpstreamLoad(running=int(sum(running)), waiting=int(sum(waiting)))
