"""`vramsupply serve` in a child process, driven the way a user, a script or systemd drives it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO

READY = re.compile(r"^vramsupply ready: serving (\S+) at (http://\S+/v1) ")


class AgentProcess:
    """The real agent process; its stdout and stderr lines are collected as they arrive."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, program: list[str] | None = None) -> None:
        """``program`` replaces ``python -m vramsupply``, e.g. with a test double around the real CLI."""
        self.process = subprocess.Popen(
            [*(program or [sys.executable, "-m", "vramsupply"]), "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # One decode thread unless a test says otherwise: ggml's workers spin at a barrier after
            # every op, so on a machine shared with other jobs 2 threads ran stories260K 100-300x
            # slower than 1 (a descheduled thread stalls its partner for a whole time slice).
            env={"VRAM_SUPPLY_THREADS": "1", **os.environ, **(env or {})},
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._collect, args=(stream, lines), daemon=True)
            for stream, lines in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr))
        ]
        for reader in self._readers:
            reader.start()

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    @staticmethod
    def _collect(stream: IO[str], lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{what}: never happened; stdout={self.stdout} stderr={self.stderr}")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 60) -> None:
        self.wait_for(lambda: self._ready_match() is not None, "the ready line", timeout)

    def _ready_match(self) -> re.Match[str] | None:
        return next((match for line in list(self.stdout) if (match := READY.match(line))), None)

    @property
    def model_id(self) -> str:
        match = self._ready_match()
        return match.group(1) if match else ""

    @property
    def base_url(self) -> str:
        match = self._ready_match()
        return match.group(2) if match else ""

    def printed(self, text: str) -> bool:
        return any(text in line for line in self.stdout)

    def send_signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:  # say what the agent was doing, not only that it hung
            self.kill()
            raise AssertionError(f"the agent did not exit within {timeout} s; its last lines:\n" + "\n".join(self.stderr[-40:])) from None
        for reader in self._readers:  # the pipes reach EOF once the process is gone: every last line is read
            reader.join(timeout)
        return code

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> int:
        self.send_signal(sig)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def log(self) -> str:
        return "\n".join(self.stderr)

    @property
    def output(self) -> str:
        return "\n".join(self.stdout + self.stderr)


def demo_until_its_answer() -> AgentProcess:
    """`vramsupply serve --demo --port 0` run until the platform has counted its bought answer, then
    stopped with Ctrl-C, which must exit 0."""
    demo = AgentProcess("--demo", "--port", "0")
    try:
        demo.wait_for(lambda: demo.printed("demo: the platform counted"), "the demo buyer's answer", timeout=90)
        assert demo.stop(signal.SIGINT) == 0
    finally:
        demo.kill()
    return demo
