"""`vramsupply bench`: measure this machine's throughput for the configured model and keep it for `serve`.

``serve`` reports the stored result to the platform as the instance's capacity (registration and
heartbeats), and `vramsupply demand` turns it into dollars per hour at market prices.

Where the result will be kept is checked before measuring (up to ten minutes of it): a data dir
that cannot be written is said at once, not after the measurement, which would then be lost.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from pathlib import Path

from vramsupply import __version__
from vramsupply.config import Settings
from vramsupply.engine import Engine, EngineError
from vramsupply.throughput.measure import BenchError, Speeds, measure
from vramsupply.throughput.store import Capacity, capacity_for, default_bench_path, read_all, save, speed_settings, writable_problem

DEFAULT_SECONDS = 30.0
SETUP_SHARE = 0.2
"""Of the time asked for, the share left for loading and warm-up; the rest is split between the two phases."""

__all__ = ["DEFAULT_SECONDS", "BenchError", "Capacity", "Speeds", "measured_speeds", "capacity_for", "default_bench_path", "read_all", "run_bench", "save"]


def measured_speeds() -> dict[str, tuple[float, int]]:
    """Per model id (any quant, the newest measurement): all-slots tokens per second and the slot count."""
    newest: dict[str, Capacity] = {}
    for result in read_all(default_bench_path()).values():
        current = newest.get(result.model.lower())
        if current is None or result.measured_at > current.measured_at:
            newest[result.model.lower()] = result
    return {model: (c.all_slots_tokens_per_second, c.parallel) for model, c in newest.items()}


async def run_bench(settings: Settings, seconds: float = DEFAULT_SECONDS, progress: Callable[[str], None] = lambda _: None) -> Capacity:
    """Resolve and load the configured model, measure it, store and return the result."""
    from vramsupply.serve.backend import fit_to_memory, load_engine, resolve_model
    from vramsupply.serve.options import ServeError, engine_options

    path = default_bench_path()
    given = speed_settings(settings)  # as serve will be given them, before the memory plan
    problem = writable_problem(path)
    if problem is not None:
        raise BenchError(f"cannot save the result to {path}: {problem}; fix that before measuring")
    try:  # the same memory plan as `serve`, so the measured configuration is the served one
        explicit = set(settings.model_fields_set)
        settings = await fit_to_memory(settings, explicit)
        model = await resolve_model(settings)
        settings = await fit_to_memory(settings, explicit, model)
        progress(f"loading {model.model_id} ({settings.parallel} slot{'' if settings.parallel == 1 else 's'})")
        engine: Engine = await load_engine(engine_options(settings, model))
    except ServeError as exc:
        raise BenchError(str(exc)) from None
    phase = max(1.0, seconds * (1 - SETUP_SHARE) / 2)
    try:
        speeds = await measure(engine, phase, progress)
    except EngineError as exc:
        raise BenchError(f"the benchmark failed: {exc}") from None
    finally:
        await asyncio.to_thread(engine.close)
    capacity = Capacity(
        model=model.model_id,
        quant=model.quant,
        parallel=engine.parallel,
        single_stream_tokens_per_second=round(speeds.single_stream, 1),
        all_slots_tokens_per_second=round(speeds.all_slots, 1),
        measured_at=time.time(),
        seconds=round(phase, 3),  # each phase's length (--seconds 3 gave 1.2000000000000002 in the JSON)
        agent_version=__version__,
        settings=given,
    )
    try:
        save(path, capacity)
    except OSError as exc:  # the disk filled or the data dir changed while measuring
        raise BenchError(_not_saved(capacity, path, exc)) from None
    return capacity


def _not_saved(capacity: Capacity, path: Path, exc: OSError) -> str:
    """One line with the figures measured (up to ten minutes of measuring stay in sight), why
    they are not kept, and what to do: serve reports only a saved result."""
    slots = "1 slot" if capacity.parallel == 1 else f"{capacity.parallel} slots"
    fix = "free some space there" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"make {path.parent} writable"
    return (
        f"measured {capacity.single_stream_tokens_per_second:,.1f} tok/s with 1 stream and {capacity.all_slots_tokens_per_second:,.1f} tok/s "
        f"with {slots} busy, but cannot save it to {path}: {exc.strerror or exc}; {fix} and run vramsupply bench again (serve reports only a saved result)"
    )
