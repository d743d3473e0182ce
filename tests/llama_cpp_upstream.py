"""A real third-party OpenAI-compatible server to sell through the agent: llama-cpp-python's own
``python -m llama_cpp.server`` serving the tiny model, in a child process on a free port."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conftest import TINY_MODEL
from live_platform import free_port

DOUBLES = Path(__file__).resolve().parent / "doubles"
FAKE_ENGINE = DOUBLES / "fake_engine.py"


def request_json(url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def wait_until(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: never happened")
        time.sleep(0.1)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except (OSError, urllib.error.HTTPError):
        return False


class LlamaCppServer:
    """``python -m llama_cpp.server --model stories260K.gguf`` with a 512-token context."""

    def __init__(self, n_ctx: int = 512, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(TINY_MODEL), "--host", "127.0.0.1", "--port", str(self.port),
             "--n_ctx", str(n_ctx), "--interrupt_requests", "False", "--verbose", "False"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> LlamaCppServer:
        deadline = time.monotonic() + 60
        while not answers(self.base_url + "/models"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"llama_cpp.server did not start: {self.process.stderr.read().decode() if self.process.stderr else ''}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
