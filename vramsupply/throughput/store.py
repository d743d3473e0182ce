"""Measured throughput, kept in the data dir (``bench.json``) so `serve` can report it as capacity.

One result per model and quant: the newest measurement replaces the older one. A result is only
reported for the model it measured; the slot count it was measured at travels with it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from pydantic import BaseModel, ValidationError

from vramsupply.config import data_dir

log = logging.getLogger("vramsupply.throughput")

BENCH_FILE_NAME = "bench.json"


class Capacity(BaseModel):
    """This machine's measured decode speed for one model (tokens per second are not money: floats are fine)."""

    model: str
    quant: str | None = None
    parallel: int
    single_stream_tokens_per_second: float
    all_slots_tokens_per_second: float
    measured_at: float
    seconds: float
    agent_version: str

    @property
    def key(self) -> str:
        return f"{self.model}|{self.quant or ''}"


def default_bench_path() -> Path:
    return data_dir() / BENCH_FILE_NAME


def read_all(path: Path) -> dict[str, Capacity]:
    """Every stored result; an absent or unreadable file holds none (the agent then reports no capacity)."""
    try:
        raw = json.loads(path.read_text())
        return {key: Capacity.model_validate(value) for key, value in raw.get("results", {}).items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, ValidationError, AttributeError) as exc:
        log.warning("ignoring the throughput results in %s: %s", path, exc)
        return {}


def save(path: Path, capacity: Capacity) -> None:
    """Replace this model's result, atomically, keeping the others."""
    results = read_all(path)
    results[capacity.key] = capacity
    document = {"results": {key: value.model_dump() for key, value in sorted(results.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".bench-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(document, fh, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def capacity_for(path: Path, model: str, quant: str | None) -> Capacity | None:
    return read_all(path).get(f"{model}|{quant or ''}")
