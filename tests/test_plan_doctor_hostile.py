"""`plan`, `bench` and `doctor` as a provider meets them on a bad day: a Hub that is down or gated,
a truncated or unloadable model file, a host setting that is not this machine's, a platform
whose Date header is odd, and a terminal 80 columns wide (or narrower)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from email.utils import formatdate
from pathlib import Path

import pytest
from aiohttp import web

from conftest import TINY_MODEL, run_cli
from fakehub import FakeHub, standard_repos
from live_platform import free_port
from test_gpu_doctor import doctor
from test_hub_cli import env_for


class FlakyHub(FakeHub):
    """The fake Hub, whose file downloads answer `ranged_status` to a ranged GET (the way the
    plan reads a model's header) while it is set: a Hub that is down, or rate-limiting."""

    ranged_status: int | None = None

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        if self.ranged_status is not None and request.method == "GET" and "Range" in request.headers:
            self._log(request)
            return web.Response(status=self.ranged_status, text="upstream unavailable")
        return await super()._resolve(request)


@pytest.fixture
def hub() -> Iterator[FlakyHub]:
    with FlakyHub(standard_repos()) as fake:
        yield fake


def one_line_error(result: object) -> str:
    stderr = str(getattr(result, "stderr")).strip()
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
    return stderr


def test_a_hub_down_while_the_header_is_read_falls_back_to_the_cached_copy(hub: FlakyHub, tmp_path: Path) -> None:
    """Before, the 503 was a plain read error: bench and serve refused a model they had verified."""
    env = env_for(hub, tmp_path / "hf")
    pulled = run_cli("models", "pull", "acme/Widget-7B", "--quant", "Q4_K_M", env=env)
    assert pulled.returncode == 0, pulled.stderr

    hub.ranged_status = 503
    bench = run_cli("bench", "--model", "acme/Widget-7B", "--quant", "Q4_K_M", "--seconds", "3", "--json", env=env, timeout=180)
    assert bench.returncode == 0, bench.stderr
    assert any("Range" in r.headers for r in hub.downloads_of("Widget-7B-Q4_K_M.gguf")), "the header read was tried"

    hub.ranged_status = 429
    planned = run_cli("plan", "--model", "acme/Widget-7B", env=env)
    assert planned.returncode == 1
    error = one_line_error(planned)
    assert error == "error: acme/Widget-7B-GGUF/Widget-7B-Q4_K_M.gguf: HTTP 429 while reading the header", error


def test_a_gated_repo_gets_the_licence_and_token_advice(hub: FlakyHub, tmp_path: Path) -> None:
    planned = run_cli("plan", "--model", "gatedco/Locked-GGUF", env=env_for(hub, tmp_path / "hf"))
    assert planned.returncode == 1
    error = one_line_error(planned)
    assert f"access to gatedco/Locked-GGUF was refused: accept the model's licence at {hub.url}/gatedco/Locked-GGUF" in error
    assert "set HF_TOKEN" in error and "HTTP 401" not in error


def test_a_truncated_model_file_is_refused_not_planned(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(TINY_MODEL.read_bytes()[:100_000])

    planned = run_cli("plan", "--model", str(truncated))

    assert planned.returncode == 1 and "yes" not in planned.stdout
    error = one_line_error(planned)
    assert f"{truncated} is truncated: its tensor '" in error and "but the file has 100,000 bytes; download it again" in error


def test_an_architecture_llama_cpp_does_not_know_is_refused(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    model = tmp_path / "fooarch.gguf"
    writer = gguf.GGUFWriter(str(model), "fooarch")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    planned = run_cli("plan", "--model", str(model))

    assert planned.returncode == 1
    assert "llama.cpp does not know architecture 'fooarch'" in one_line_error(planned)


@pytest.mark.parametrize("kind", ["directory", "fifo", "device", "dangling link"])
def test_something_that_is_not_a_model_file_is_named_for_what_it_is(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.gguf"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path = Path("/dev/zero")
    else:
        path.symlink_to(tmp_path / "gone.gguf")

    error = one_line_error(run_cli("plan", "--model", str(path)))

    if kind == "dangling link":
        assert error == f"error: model file {path} does not exist: it is a symbolic link to {tmp_path / 'gone.gguf'}, which does not exist"
    elif kind == "directory":
        assert error == f"error: {path} is a directory, not a .gguf file"
    else:
        assert error == f"error: {path} is not a file"


def test_the_plan_table_is_readable_at_80_columns_and_narrower(tmp_path: Path) -> None:
    """Before, every cell was cut with "…" at 80 columns ("unkno…", "1.1 M…") and the table was
    empty at 20."""
    wide = run_cli("plan", "--model", str(TINY_MODEL), env={"COLUMNS": "80"})
    narrow = run_cli("plan", "--model", str(TINY_MODEL), env={"COLUMNS": "20"})

    for result in (wide, narrow):
        assert result.returncode == 0, result.stderr
        assert "…" not in result.stdout
        assert "1.1 MiB" in result.stdout and "yes" in result.stdout
    table = wide.stdout.split("devices:")[0]
    assert all(len(line) <= 80 for line in table.splitlines())
    assert "yes ← chosen" in table and "F32" in table and "compute" in table
    assert "weights 1.1 MiB" in " ".join(narrow.stdout.split()), narrow.stdout


@pytest.mark.parametrize(
    ("host", "detail", "fix"),
    [
        ("192.0.2.1", "192.0.2.1 is not an address of this machine", "set VRAM_SUPPLY_HOST to one of this machine's addresses"),
        ("no-such-host.invalid", "the host name no-such-host.invalid does not resolve", "set VRAM_SUPPLY_HOST to an address of this machine"),
    ],
)
def test_the_port_check_says_why_the_address_cannot_be_listened_on(host: str, detail: str, fix: str) -> None:
    """Before, any failure to bind was "taken by another program", with the fix to stop it."""
    _, checks, _ = doctor(VRAM_SUPPLY_HOST=host, VRAM_SUPPLY_PORT=str(free_port()))
    port = checks["port"]
    assert port["ok"] is False
    assert str(port["detail"]).startswith(detail) and "taken" not in str(port["detail"])
    assert str(port["fix"]).startswith(fix)


@contextmanager
def platform_dated(date: str) -> Iterator[str]:
    """A platform that answers every request with HTTP 200 and this Date header."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"rails": []}, headers={"Date": date})

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app)
    port = free_port()

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_an_unreadable_date_header_is_a_failed_clock_check_not_a_bug() -> None:
    with platform_dated("garbage") as url:
        _, checks, _ = doctor(VRAM_SUPPLY_PLATFORM_URL=url, VRAM_SUPPLY_API_KEY="key")
    clock = checks["clock"]
    assert clock["ok"] is False
    assert clock["detail"] == "cannot compare: the platform's Date header 'garbage' is not a date"
    assert "bug" not in str(clock["fix"])


def test_a_date_in_utc_written_as_minus_0000_is_not_read_as_local_time() -> None:
    now = formatdate(time.time(), usegmt=True).replace("GMT", "-0000")
    with platform_dated(now) as url:
        _, checks, _ = doctor(VRAM_SUPPLY_PLATFORM_URL=url, VRAM_SUPPLY_API_KEY="key", TZ="Asia/Tokyo")
    clock = checks["clock"]
    assert clock["ok"] is True, clock
