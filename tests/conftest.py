"""Shared fixtures: an isolated HOME/config for every test, and a way to run the real CLI."""

from __future__ import annotations

import compileall
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = REPO / "vramsupply" / "assets" / "stories260K.gguf"
# Captured before any test swaps HOME, so child pip runs can reuse the wheels already built here.
REAL_PIP_CACHE = os.environ.get("PIP_CACHE_DIR") or str(
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip"
)


def pytest_configure(config: pytest.Config) -> None:
    """Compile the package once, before any test runs the CLI or an agent in a child process.

    Those children import it from its sources, and where ``PYTHONDONTWRITEBYTECODE`` is set (as on
    CI's machines) none of them writes what it compiled: each one compiled every module it imported
    again, a tenth to a quarter of a second of each of hundreds of children. Only the controlling
    process compiles (xdist's workers start once it has), so no two write one file at once.
    """
    if not hasattr(config, "workerinput"):
        compileall.compile_dir(REPO / "vramsupply", quiet=2)


@contextmanager
def scheduler_held(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Engines loaded inside start their scheduler thread (and its warm-up) only when the test
    calls ``engine._scheduler.start()``, so that the requests submitted before wait together."""
    from vramsupply.engine.scheduler import Scheduler

    with monkeypatch.context() as patch:
        patch.setattr(Scheduler, "start", lambda self: None)
        yield


def buyer_leaves_just_before_the_end(monkeypatch: pytest.MonkeyPatch, app: web.Application | None = None) -> None:
    """The buyer's connection closes right before the stream's end is written: a race that a
    random run over HTTP met once in about 600 requests, made certain here. aiohttp then raises
    ``ConnectionResetError`` from the write instead of cancelling the handler. ``app``: only its
    streams (a test double in the same process streams too)."""
    write_eof = web.StreamResponse.write_eof

    async def closing_first(self: web.StreamResponse, data: bytes = b"") -> None:
        request = self._req
        if self.headers.get("Content-Type", "").startswith("text/event-stream") and request is not None and request.transport is not None and app in (None, request.app):
            request.transport.close()
        await write_eof(self, data)

    monkeypatch.setattr(web.StreamResponse, "write_eof", closing_first)


async def lines_of_a_cut_stream(response: aiohttp.ClientResponse) -> list[bytes]:
    """Every line a stream sent before its body ended without its last chunk (see above)."""
    lines = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async for line in response.content:
            lines.append(line)
    return lines


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads or writes the developer's real config, cache or environment."""
    home = tmp_path_factory.mktemp("home")
    for name in list(os.environ):
        if name.startswith("VRAM_SUPPLY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("VRAM_SUPPLY_CONFIG", str(home / ".config" / "vramsupply" / "config.toml"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # The decode at the agent's own priority, in child agents (the environment) and in this process's
    # engines built with EngineOptions' default (the module global): beside the other xdist worker's
    # busy CLI children, at normal priority, a decode 10 nice levels down got about a tenth of a core,
    # and the engine-heavy tests ran 5-10x slower (two busy loops beside two such files: 130.7 s
    # with the offset, 33.1 s without). test_engine_priority.py sets the offset back where it tests it.
    monkeypatch.setenv("VRAM_SUPPLY_DECODE_NICE", "0")
    monkeypatch.setattr("vramsupply.engine.priority.COMPUTE_NICE_OFFSET", 0)
    return home


@pytest.fixture(scope="module")
def checker() -> Iterator[object]:
    """llama.cpp's grammar engine asked whether it accepts a text (``gbnf_check.GrammarChecker``), one per module."""
    from gbnf_check import GrammarChecker

    checker = GrammarChecker()
    yield checker
    checker.close()


@pytest.fixture(scope="session")
def chat_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model with a Qwen3- (Hermes calls), a Qwen3.5- (XML calls), a Llama-3- and a
    Mistral-style chat template (see chat_models.py)."""
    from chat_models import FAMILIES, write_chat_model

    directory = tmp_path_factory.mktemp("chat-models")
    return {family: write_chat_model(family, directory) for family in FAMILIES}


@pytest.fixture
def config_file(isolated_env: Path) -> Path:
    return Path(os.environ["VRAM_SUPPLY_CONFIG"])


def run_cli(*args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `vramsupply ARGS` as a user would, in a child process with the test's environment."""
    return subprocess.run(
        [sys.executable, "-m", "vramsupply", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        input=input,
        timeout=timeout,
    )
