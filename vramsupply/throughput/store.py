"""Measured throughput, kept in the data dir (``bench.json``) so `serve` can report it as capacity.

One result per model and quant: the newest measurement replaces the older one. A result is only
reported for the model it measured; the slot count it was measured at travels with it.

The file is the provider's record, and may be edited by hand, so reading it is entry by entry: an
entry that is no measurement (null, NaN, a negative slot count, a time in the future) is skipped
with one warning line naming it, and every other model's result is still reported. Nothing that
could not be read is destroyed: before `bench` rewrites a file holding something unreadable (a
whole file that is not JSON, or only some bad entries) it keeps the file as it was next to it,
``bench.json.bad-<time>``, and says so. Refusing to save instead would throw away a measurement
the provider waited for, over a file they may not even know is broken.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from vramsupply.config import Settings, data_dir, file_in_the_way, make_private_dirs, write_private_file

log = logging.getLogger("vramsupply.throughput")

BENCH_FILE_NAME = "bench.json"
MAX_SLOTS = 256  # the parallel setting's own limit (config.Settings.parallel)
PROBE_ROOM = 4096
"""Bytes beyond bench.json's size that must fit before measuring: room for the new result (a few hundred)."""
CLOCK_SKEW_SECONDS = 86400.0
"""A measurement dated later than now by more than this is no measurement (and no datetime can hold 1e300)."""
SPEED_SETTINGS = (
    "parallel", "kv_per_slot", "n_gpu_layers", "n_batch", "n_ubatch", "flash_attention", "threads", "draft_max", "backend_sampling",
    "decode_nice", "cache_type_k", "cache_type_v", "split_mode", "tensor_split", "devices",
)  # fmt: skip
"""The settings that change how fast one model decodes on one machine, recorded as given (before the
memory plan): a result measured with others is not the capacity of what `serve` runs."""


class Capacity(BaseModel):
    """This machine's measured decode speed for one model (tokens per second are not money: floats are fine)."""

    model_config = ConfigDict(allow_inf_nan=False)  # JSON has no NaN or Infinity, and no speed is either

    model: str = Field(min_length=1)
    quant: str | None = None
    parallel: StrictInt = Field(ge=1, le=MAX_SLOTS)
    single_stream_tokens_per_second: float = Field(ge=0)
    all_slots_tokens_per_second: float = Field(ge=0)
    measured_at: float = Field(gt=0)
    seconds: float = Field(gt=0)
    agent_version: str
    settings: dict[str, Any] | None = None
    """``SPEED_SETTINGS`` as bench was given them (None: a result from before they were recorded)."""

    @field_validator("measured_at")
    @classmethod
    def _not_in_the_future(cls, value: float) -> float:
        if value > time.time() + CLOCK_SKEW_SECONDS:
            raise ValueError("a time in the future")
        return value

    @property
    def key(self) -> str:
        return f"{self.model}|{self.quant or ''}"


@dataclass
class Stored:
    """What ``bench.json`` holds: its good results, the keys of its bad entries (with why), and why
    the file as a whole could not be read (``None``: it was read, or there is none)."""

    results: dict[str, Capacity] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)
    unreadable: str | None = None

    def problem(self, path: Path) -> str | None:
        """One line on what in ``path`` is not a measurement, or None when all of it is."""
        if self.unreadable is not None:
            return f"{path} is not a bench result file ({self.unreadable})"
        if self.bad:
            named = "; ".join(f"{key[:80]!r}: {why}" for key, why in list(self.bad.items())[:3])
            more = f" and {len(self.bad) - 3} more" if len(self.bad) > 3 else ""
            return f"{len(self.bad)} {'entry' if len(self.bad) == 1 else 'entries'} in {path} {'is' if len(self.bad) == 1 else 'are'} no measurement ({named}{more})"
        return None


def default_bench_path() -> Path:
    return data_dir() / BENCH_FILE_NAME


def load(path: Path) -> Stored:
    """Read ``path`` entry by entry; never raises for what the file holds."""
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return Stored()
    except (OSError, ValueError) as exc:  # not UTF-8, not JSON, a directory, no permission
        return Stored(unreadable=_one_line(exc))
    results = document.get("results", {}) if isinstance(document, dict) else None
    if not isinstance(results, dict):
        return Stored(unreadable='not a JSON object with a "results" object')
    stored = Stored()
    for key, value in results.items():
        why = _why_not(key, value)
        if why is None:
            stored.results[key] = Capacity.model_validate(value)
        else:
            stored.bad[key] = why
    return stored


def _why_not(key: str, value: Any) -> str | None:
    """Why this entry is no measurement, or None when it is one."""
    try:
        capacity = Capacity.model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        return _one_line(f"{where}: {error['msg']}" if where else error["msg"])
    if capacity.key != key:
        return f"it measured {capacity.key!r}"
    return None


def _one_line(what: object) -> str:
    return " ".join(str(what).split())[:200]


def read_all(path: Path) -> dict[str, Capacity]:
    """Every stored result; a bad entry is skipped (one warning line), an unreadable file holds none."""
    stored = load(path)
    problem = stored.problem(path)
    if problem is not None:
        log.warning("%s: skipped; run `vramsupply bench` to measure again", problem)
    return stored.results


def writable_problem(path: Path) -> str | None:
    """Why a result could not be saved at ``path``, found before measuring; None when it can be."""
    blocking = file_in_the_way(path)
    if blocking is not None:
        return f"{blocking} is a file, not a directory"
    try:
        make_private_dirs(path.parent)
        if path.exists() and not path.is_file():
            return "it is not a regular file"
        _write_probe(path.parent, (path.stat().st_size if path.exists() else 0) + PROBE_ROOM)
    except OSError as exc:
        return exc.strerror or _one_line(exc)
    return None


def _write_probe(folder: Path, size: int) -> None:
    """Write and delete ``size`` bytes in ``folder``; OSError if they do not fit. Bytes, not an empty
    file: a full disk still has inodes for empty files, and would fail only the save, after measuring."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".bench-", suffix=".probe")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(bytes(size))
    finally:
        os.unlink(probe)


def save(path: Path, capacity: Capacity) -> Path | None:
    """Replace this model's result, atomically, keeping the others; the copy kept of what could
    not be read, when the file held any (see the module docstring). OSError: it cannot be written."""
    stored = load(path)
    kept = _keep_copy(path) if stored.problem(path) is not None else None
    if kept is not None:
        log.warning("%s: dropped from it; the file as it was is kept in %s", stored.problem(path), kept)
    results = {**stored.results, capacity.key: capacity}
    document = {"results": {key: _entry(value) for key, value in sorted(results.items())}}
    text = json.dumps(document, indent=2, allow_nan=False)
    write_private_file(path, text)
    return kept


def _entry(capacity: Capacity) -> dict[str, Any]:
    """A result as stored; one from before settings were recorded is kept as it was written."""
    return capacity.model_dump(exclude={"settings"} if capacity.settings is None else None)


def _keep_copy(path: Path) -> Path:
    """Copy ``path`` as it is to a name of its own next to it, never over an earlier copy."""
    data = path.read_bytes()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for attempt in range(100):
        copy = path.with_name(f"{path.name}.bad-{stamp}" + (f"-{attempt}" if attempt else ""))
        try:
            with open(copy, "xb") as fh:
                fh.write(data)
            return copy
        except FileExistsError:
            continue
    raise FileExistsError(f"too many copies of {path} kept already")


def speed_settings(settings: Settings) -> dict[str, Any]:
    return settings.model_dump(mode="json", include=set(SPEED_SETTINGS))


def measured_otherwise(capacity: Capacity, settings: Settings) -> list[str]:
    """The settings ``capacity`` was measured with that ``settings`` give otherwise, in words."""
    then, now = capacity.settings or {}, speed_settings(settings)
    return [f"{key} {_shown(then[key])} (serving with {_shown(now.get(key))})" for key in SPEED_SETTINGS if key in then and then[key] != now.get(key)]


def _shown(value: Any) -> str:
    return "the default" if value is None else json.dumps(value)


def capacity_for(path: Path, model: str, quant: str | None) -> Capacity | None:
    return read_all(path).get(f"{model}|{quant or ''}")
