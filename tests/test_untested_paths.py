"""Three error paths a provider meets on a bad day, run for real rather than assumed:

- `doctor`'s port check run by an ordinary user asked to serve on a privileged port (the test
  machines run as root, so a forked child becomes ``nobody``, and the kernel itself refuses the bind);
- the Hub (or its CDN) accepting a file request and never sending the answer's headers, with the
  Hub timeout set small: one line and exit 1, or serving from the verified cached copy;
- the disk filling up while `bench` measures: the figures stay in sight, the save fails in one line.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from conftest import TINY_MODEL, run_cli
from fakehub import FakeHub, standard_repos
from test_hub_cli import env_for
from vramsupply.throughput import default_bench_path

UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
ONE_THREAD = {"VRAM_SUPPLY_THREADS": "1"}  # as test_bench.py: two threads spin at ggml's barriers on a busy machine


# --- doctor as an ordinary user ------------------------------------------------------------------

NOBODY = 65534
CLONE_NEWNET = 0x40000000


def port_check_as_nobody(port: int, *, unprivileged_start: int | None = None) -> list[object]:
    """doctor's port check (host 0.0.0.0), run in a forked child that has become ``nobody``, so the
    kernel itself refuses the bind. Forked, not a new ``python -m vramsupply doctor``: that child
    would have to read the venv, whose path (a CI clone under a private temporary folder) nobody
    may enter. ``unprivileged_start``: first set net.ipv4.ip_unprivileged_port_start to it in a
    network namespace of the child's own. Returns [ok, detail, fix], or ["raised", repr]."""
    from vramsupply.config import Settings
    from vramsupply.gpu.checkup import Context
    from vramsupply.gpu.doctor import port_free_or_ours

    import encodings.idna  # noqa: F401  what resolving a host name imports on first use

    settings = Settings(host="0.0.0.0", port=port)  # read here: the child may not read files
    libc = ctypes.CDLL(None, use_errno=True)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls and code already imported
        try:
            os.close(reader)
            if unprivileged_start is not None:
                if libc.unshare(CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
                UNPRIVILEGED_PORT_START.write_text(str(unprivileged_start))
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = port_free_or_ours(Context(settings))
            os.write(writer, json.dumps([result.ok, result.detail, result.fix]).encode())
        except BaseException as exc:  # noqa: BLE001 - any failure is reported to the parent
            os.write(writer, json.dumps(["raised", repr(exc)]).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as answer:
        told = answer.read()
    os.waitpid(pid, 0)
    return json.loads(told)


def test_a_privileged_port_is_a_failed_check_for_an_ordinary_user() -> None:
    if os.geteuid() != 0:
        pytest.skip("becoming nobody needs root")
    start = int(UNPRIVILEGED_PORT_START.read_text())
    if start <= 80:
        pytest.skip(f"net.ipv4.ip_unprivileged_port_start is {start}: any user may listen on port 80 here")

    assert port_check_as_nobody(80) == [
        False,
        f"port 80 is a privileged port: only root may listen below {start} on this machine, and this user is not root",
        f"serve on port {start} or above (--port, VRAM_SUPPLY_PORT); a reverse proxy can still answer buyers on port 80",
    ]


def test_the_fix_names_this_machines_own_lowest_unprivileged_port() -> None:
    """Before, the fix said "a port above 1023" whatever the kernel's setting: 1500 is, and fails
    where the setting is 2000. A network namespace of the child's own holds that setting."""
    if os.geteuid() != 0:
        pytest.skip("setting ip_unprivileged_port_start in a network namespace of the child's own needs root")

    assert port_check_as_nobody(1500, unprivileged_start=2000) == [
        False,
        "port 1500 is a privileged port: only root may listen below 2000 on this machine, and this user is not root",
        "serve on port 2000 or above (--port, VRAM_SUPPLY_PORT); a reverse proxy can still answer buyers on port 1500",
    ]


# --- a Hub that never answers a file request ----------------------------------------------------


class StallingHub(FakeHub):
    """The fake Hub, whose file requests (the memory plan's ranged header read, a download's GET)
    are accepted and never answered, not even with headers, while `stall_files` is set."""

    stall_files = False

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        if not self.stall_files:
            return await super()._resolve(request)
        self._log(request)
        assert self._release is not None
        await self._release.wait()  # set when the hub stops
        return web.Response(status=503)


@pytest.fixture
def hub() -> Iterator[StallingHub]:
    with StallingHub(standard_repos()) as fake:
        yield fake


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and lines and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr
    return lines[-1]


def test_a_hub_that_never_answers_a_header_read_ends_plan_and_pull_in_one_line(hub: StallingHub, tmp_path: Path) -> None:
    env = env_for(hub, tmp_path / "hf", VRAM_SUPPLY_DOWNLOAD_TIMEOUT="0.5")
    hub.stall_files = True

    planned = run_cli("plan", "--model", "acme/Widget-7B", env=env, timeout=60)
    pulled = run_cli("models", "pull", "acme/Widget-7B", "--quant", "Q4_K_M", env=env, timeout=60)
    hub.stall_files, hub.hang_api = False, True
    resolved = run_cli("models", "resolve", "acme/Widget-7B", "--quant", "Q4_K_M", env=env, timeout=60)

    assert planned.returncode == 1
    assert re.fullmatch(
        rf"error: cannot read the model's header from the Hub at {re.escape(hub.url)}: acme/Widget-7B-GGUF/Widget-7B-Q4_K_M\.gguf: "
        r"ReadTimeout: .+; check the network, or raise VRAM_SUPPLY_DOWNLOAD_TIMEOUT \(0\.5 s\) for a slow link",
        one_line_error(planned.stderr),
    )
    assert pulled.returncode == 1
    assert re.fullmatch(
        r"error: download of acme/Widget-7B-GGUF/Widget-7B-Q4_K_M\.gguf stalled: no data for \d+\.\d s \(ReadTimeout: .+\); "
        r"0 bytes of 1\.2 MB kept, run again to resume",
        one_line_error(pulled.stderr),
    )
    assert resolved.returncode == 1
    assert re.fullmatch(rf"error: cannot reach the Hub at {re.escape(hub.url)} \(ReadTimeout: .+\)", one_line_error(resolved.stderr))
    ranged = [request.headers.get("Range") for request in hub.downloads_of("Widget-7B-Q4_K_M.gguf")]
    assert ranged[0] is not None and ranged[0].startswith("bytes=0-"), "the plan's header read was the request left hanging"


def test_a_hub_that_never_answers_a_header_read_falls_back_to_the_verified_cached_copy(hub: StallingHub, tmp_path: Path) -> None:
    env = env_for(hub, tmp_path / "hf", VRAM_SUPPLY_DOWNLOAD_TIMEOUT="0.5", **ONE_THREAD)
    pulled = run_cli("models", "pull", "acme/Widget-7B", "--quant", "Q4_K_M", env=env)
    assert pulled.returncode == 0, pulled.stderr
    hub.stall_files = True
    hub.requests.clear()

    bench = run_cli("bench", "--model", "acme/Widget-7B", "--quant", "Q4_K_M", "--parallel", "2", "--seconds", "3", "--json", env=env, timeout=120)

    assert bench.returncode == 0, bench.stderr
    assert "Traceback" not in bench.stderr
    assert json.loads(bench.stdout)["model"] == "acme/widget-7b"
    assert [request.headers.get("Range", "")[:8] for request in hub.downloads_of("Widget-7B-Q4_K_M.gguf")] == ["bytes=0-"], "the header read was tried, and only it"


# --- the disk filling up while bench measures ---------------------------------------------------


def fill_up(folder: Path) -> None:
    """Write zeros into ``folder`` until the file system it is on has no room left."""
    with open(folder / "filler", "wb", buffering=0) as fh, pytest.raises(OSError) as full:
        while True:
            fh.write(bytes(64 << 10))
    assert full.value.errno == errno.ENOSPC


def wait_until(condition: Callable[[], object], process: subprocess.Popen[str], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"bench exited before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"bench never reached {what}"
        time.sleep(0.05)


def bench_on_a_small_disk(data: Path, *args: str, env: dict[str, str], before: str = "") -> subprocess.Popen[str]:
    """`vramsupply bench` whose data dir is a 1 MiB tmpfs in a mount namespace of its own (unshare:
    no root needed outside it); ``before``: shell run in there first."""
    script = f'mount -t tmpfs -o size=1m tmpfs "{data}" || exit 97\n{before}\nexec "{sys.executable}" -m vramsupply bench --parallel 2 --seconds 3 "$@"\n'
    return subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *args],
        env={**os.environ, "COLUMNS": "250", **ONE_THREAD, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_disk_that_fills_up_while_bench_measures_keeps_the_figures_and_says_what_to_do(hub: StallingHub, tmp_path: Path) -> None:
    """The fake Hub holds the memory plan's header read, which comes after bench checked that its
    result fits, until the test has filled the data dir's disk: the save after measuring fails."""
    data = default_bench_path().parent
    data.mkdir(parents=True)
    name = "Widget-7B-Q4_K_M.gguf"
    go_on = threading.Event()
    hub.pause_at[name] = (0, go_on)
    bench = bench_on_a_small_disk(data, "--model", "acme/Widget-7B", "--quant", "Q4_K_M", env=env_for(hub, tmp_path / "hf"))
    try:
        wait_until(lambda: hub.downloads_of(name), bench, "the header read")
        fill_up(Path(f"/proc/{bench.pid}/root") / str(data).lstrip("/"))
        go_on.set()
        out, err = bench.communicate(timeout=120)
    finally:
        go_on.set()
        if bench.poll() is None:
            bench.kill()
            bench.communicate()

    assert bench.returncode == 1, (out, err)
    assert "bench: 1 stream for" in err and "bench: 2 streams for" in err, "it measured"
    assert re.fullmatch(
        rf"error: measured [\d,.]+ tok/s with 1 stream and [\d,.]+ tok/s with 2 slots busy, but cannot save it to {re.escape(str(default_bench_path()))}: "
        r"No space left on device; free some space there and run vramsupply bench again \(serve reports only a saved result\)",
        one_line_error(err),
    )


def test_a_disk_already_full_is_said_before_measuring(tmp_path: Path) -> None:
    """Before, bench checked it could make an empty file, which a full disk still allows (inodes are
    left), measured for up to ten minutes, and only then failed to save."""
    data = default_bench_path().parent
    data.mkdir(parents=True)

    bench = bench_on_a_small_disk(data, "--model", str(TINY_MODEL), env={}, before=f'cat /dev/zero > "{data}/filler" 2>/dev/null')
    out, err = bench.communicate(timeout=120)

    assert bench.returncode == 1, (out, err)
    assert one_line_error(err) == f"error: cannot save the result to {default_bench_path()}: No space left on device; fix that before measuring"
    assert "bench: 1 stream for" not in err and "loading" not in err
