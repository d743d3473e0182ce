"""The frame every `vramsupply doctor` check runs in: what a check returns, the probes checks share,
and one screen of results.

Apart from the checks themselves (``doctor.py`` for this machine, ``doctor_platform.py`` for the
marketplace) so that each file holds one concern: a check is one decorated function,
``@check("name")``, taking the shared ``Context`` and returning ``Result(ok, detail, fix)``; checks run
in registration order. A check that raises is reported as failed with the exception, so one broken
probe never hides the others.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import httpx2

from vramsupply.config import Settings
from vramsupply.gpu.devices import Device, NoAnswer, PresentGpu, build_has_gpu_backend, gpus_listed, list_devices

PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Result:
    ok: bool
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class PlatformProbe:
    """One authenticated GET to the platform, shared by the reachability, key and clock checks."""

    status: int | None
    date: str | None
    error: str | None
    seconds: float


@dataclass
class Context:
    settings: Settings
    _cache: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def devices(self) -> list[Device]:
        return list_devices()

    @cached_property
    def listing(self) -> list[PresentGpu] | NoAnswer:
        """What the vendor tools list, or the one that did not answer (a hung driver)."""
        return gpus_listed()

    @cached_property
    def present(self) -> list[PresentGpu]:
        return [] if isinstance(self.listing, NoAnswer) else self.listing

    @cached_property
    def gpu_backend(self) -> bool:
        return build_has_gpu_backend()

    @cached_property
    def platform(self) -> PlatformProbe:
        from vramsupply.platform import api

        key = self.settings.api_key.get_secret_value() if self.settings.api_key else ""
        started = time.monotonic()
        try:
            response = httpx2.get(self.settings.platform_url + api.RAILS_PATH, headers={"Authorization": f"Bearer {key}"}, timeout=PROBE_TIMEOUT)
        except httpx2.HTTPError as exc:
            return PlatformProbe(None, None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, time.monotonic() - started)
        return PlatformProbe(response.status_code, response.headers.get("Date"), None, time.monotonic() - started)


Check = Callable[[Context], Result]
CHECKS: list[tuple[str, Check]] = []


def check(name: str) -> Callable[[Check], Check]:
    def register(function: Check) -> Check:
        CHECKS.append((name, function))
        return function

    return register


def run_checks(settings: Settings) -> list[CheckResult]:
    context = Context(settings)
    results = []
    for name, function in CHECKS:
        try:
            result = function(context)
        except Exception as exc:  # a broken probe is a failed check, never a traceback
            result = Result(False, f"the check itself failed: {type(exc).__name__}: {exc}", "report this as a vramsupply bug")
        results.append(CheckResult(name, result.ok, result.detail, "" if result.ok else result.fix))
    return results


def doctor_text(results: list[CheckResult]) -> list[Any]:
    """One line per check, ✓ or ✗ with the detail, and the fix under each failure; ``ok`` and
    ``FAIL`` where standard output cannot write those marks (both came out as ``?``)."""
    from rich.text import Text

    passed, failed_mark = _marks()
    width = max(len(r.name) for r in results)
    lines: list[Any] = []
    for r in results:
        mark = Text(passed, style="green") if r.ok else Text(failed_mark, style="bold red")
        lines.append(Text.assemble(mark, " ", (r.name.ljust(width), "bold"), "  ", r.detail))
        if not r.ok and r.fix:
            lines.append(Text.assemble(" " * (width + 4), ("fix: ", "yellow"), r.fix))
    failed = sum(not r.ok for r in results)
    lines.append(Text(f"{failed} of {len(results)} checks failed" if failed else f"all {len(results)} checks passed", style="bold red" if failed else "bold green"))
    return lines


def _marks() -> tuple[str, str]:
    """A passed and a failed check's marks, as standard output can write them."""
    try:
        "✓✗".encode(sys.stdout.encoding or "ascii")
    except (LookupError, UnicodeEncodeError):
        return "ok  ", "FAIL"
    return "✓", "✗"
