"""A model download interrupted the hard ways: the agent killed outright, and the disk filling up.

The real agent runs against the fake Hub (tests/fakehub.py), which pauses a file's transfer at a
chosen offset until the test lets it go on, so the fault strikes mid-download every time.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_process import AgentProcess
from conftest import run_cli
from fakehub import TINY_MODEL, FakeFile, FakeHub, FakeRepo, standard_repos
from test_hub_cli import env_for

from vramsupply.hub.store import RepoCache

MIB = 1 << 20


PADDED = "Padded-Q4_K_M.gguf"


def padded_repo() -> FakeRepo:
    """A 12.6 MB model whose header is the tiny model's, so the memory plan accepts it before the
    download; its padding would never load, but these tests stop before loading."""
    return FakeRepo("bigco/Padded-GGUF", {PADDED: FakeFile(TINY_MODEL.read_bytes() + bytes(12 * MIB))}, ["gguf"])


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub([*standard_repos(), padded_repo()]) as fake:
        yield fake


def wait_for_size(path: Path, size: int, process: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size >= size):
        assert process.poll() is None, f"the agent exited early: {process.communicate()}"
        assert time.monotonic() < deadline, f"{path} never reached {size} bytes"
        time.sleep(0.05)


def test_sigkill_mid_download_then_the_next_start_resumes_verifies_and_serves(hub: FakeHub, tmp_path: Path) -> None:
    hf_home = tmp_path / "hf-home"
    env = env_for(hub, hf_home)
    name = "Widget-7B-Q4_K_M.gguf"
    model = hub.file("acme/Widget-7B-GGUF", name)
    partial = RepoCache(hf_home / "hub", "acme/Widget-7B-GGUF").incomplete(model.sha256)
    go_on = threading.Event()
    hub.pause_at[name] = (MIB, go_on)
    args = ("--model", "acme/Widget-7B", "--quant", "Q4_K_M", "--no-register", "--port", "0")
    try:
        killed = AgentProcess(*args, env=env)
        wait_for_size(partial, MIB, killed.process)
        killed.process.send_signal(signal.SIGKILL)
        assert killed.wait() == -signal.SIGKILL
    finally:
        del hub.pause_at[name]
        go_on.set()
    assert partial.stat().st_size == MIB

    with AgentProcess(*args, env=env) as restarted:
        restarted.wait_ready()
        assert restarted.stop(signal.SIGTERM) == 0
    transfers = [r.headers.get("Range") for r in hub.downloads_of(name) if not (r.headers.get("Range") or "").startswith("bytes=0-")]
    assert transfers == [None, f"bytes={MIB}-"], "one transfer from the start, one resumed where the killed one stopped (header reads of the memory plan aside)"
    assert not partial.exists() and RepoCache(hf_home / "hub", "acme/Widget-7B-GGUF").blob(model.sha256).exists()
    assert "Traceback" not in restarted.log


def test_a_disk_that_fills_up_mid_download_is_one_clear_error_the_partial_file_kept_nothing_loaded(hub: FakeHub, tmp_path: Path) -> None:
    """The cache is a 16 MiB tmpfs in a mount namespace of the agent's own (unshare: no root needed
    outside it); the test fills it through /proc/PID/root once 2 MiB of a 13.8 MB model are down."""
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    name = PADDED
    model = hub.file("bigco/Padded-GGUF", name)
    blobs = RepoCache(hf_home / "hub", "bigco/Padded-GGUF").blobs
    go_on = threading.Event()
    hub.pause_at[name] = (2 * MIB, go_on)
    script = (
        'mount -t tmpfs -o size=16m tmpfs "$HF_HOME" || exit 97\n'
        f'"{sys.executable}" -m vramsupply serve --model bigco/Padded-GGUF --quant Q4_K_M --no-register --port 0\n'
        "code=$?\n"
        f'ls -l "{blobs}" > "{tmp_path / "listing"}"\n'
        "exit $code\n"
    )
    agent = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        env={**os.environ, **env_for(hub, hf_home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        inside = Path(f"/proc/{agent.pid}/root")
        wait_for_size(inside / str(blobs / f"{model.sha256}.incomplete").lstrip("/"), 2 * MIB, agent)
        free = os.statvfs(inside / str(hf_home).lstrip("/"))
        (inside / str(hf_home / "filler").lstrip("/")).write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 256 * 1024))
        go_on.set()
        out, err = agent.communicate(timeout=60)
    finally:
        go_on.set()
        if agent.poll() is None:
            agent.kill()
    del hub.pause_at[name]

    assert agent.returncode == 1, (out, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: the disk filled up while downloading bigco/Padded-GGUF/{PADDED} (2.")
    assert "kept in" in last and "run again to resume" in last
    assert "Traceback" not in err and not re.search(r"\bloading \S+ from ", err) and "ready" not in out
    listing = (tmp_path / "listing").read_text()
    assert f"{model.sha256}.incomplete" in listing, "the partial file is kept for the next start to resume"


def test_a_model_verified_in_a_read_only_cache_is_served_as_it_is(hub: FakeHub, tmp_path: Path) -> None:
    """A cache shared read-only (a mount, another user's): what it holds verified is served, with
    the Hub online; writing the pull's record refused the start with 'Read-only file system'."""
    hf_home = tmp_path / "hf-home"
    env = env_for(hub, hf_home)
    args = ("--model", "acme/Widget-7B", "--quant", "Q4_K_M", "--no-register", "--port", "0")
    pulled = run_cli("models", "pull", "acme/Widget-7B", "--quant", "Q4_K_M", env=env)
    assert pulled.returncode == 0, pulled.stderr
    script = f'mount --bind "{hf_home}" "{hf_home}" && mount -o remount,bind,ro "{hf_home}" || exit 97\nexec "{sys.executable}" -m vramsupply "$@"\n'
    read_only = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"]
    probe = subprocess.run([*read_only, "--version"], env={**os.environ, **env}, capture_output=True, text=True)
    if probe.returncode == 97:
        pytest.skip("this machine cannot remount a folder read-only in a user and mount namespace of the test's own")

    with AgentProcess(*args, env=env, program=read_only) as agent:
        agent.wait_ready()
        assert agent.stop(signal.SIGTERM) == 0
    assert "Traceback" not in agent.log and "which cannot be written (Read-only file system): used as it is" in agent.log


def test_models_rm_keeps_a_model_while_another_process_downloads_it_unless_forced(hub: FakeHub, tmp_path: Path) -> None:
    """A `models rm` beside a `models pull` (or a starting `serve`) took the half-downloaded file,
    said it removed the model, and the download then died with a bare 'No such file or directory'."""
    env = env_for(hub, tmp_path / "hf-home")
    assert run_cli("models", "pull", "acme/Widget-7B", "--quant", "Q4_K_M", env=env).returncode == 0
    model = hub.file("bigco/Padded-GGUF", PADDED)
    partial = RepoCache(tmp_path / "hf-home" / "hub", "bigco/Padded-GGUF").incomplete(model.sha256)
    go_on = threading.Event()
    hub.pause_at[PADDED] = (MIB, go_on)
    pull = subprocess.Popen(
        [sys.executable, "-m", "vramsupply", "models", "pull", "bigco/Padded-GGUF", "--quant", "Q4_K_M"],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for_size(partial, MIB, pull)
        named = run_cli("models", "rm", "bigco/Padded-GGUF", "--yes", env=env)
        everything = run_cli("models", "rm", "--all", "--yes", env=env)
        kept = partial.exists()
        forced = run_cli("models", "rm", "bigco/padded-gguf", "--yes", "--force", env=env)
    finally:
        go_on.set()
        out, err = pull.communicate(timeout=60)
        del hub.pause_at[PADDED]

    assert named.returncode == 1 and named.stdout == ""
    assert named.stderr.strip() == (
        "error: bigco/padded-gguf Q4_K_M is being downloaded by another process (a `serve` starting, or `models pull`): "
        "let it finish, or stop it first; --force removes it anyway, and that download fails"
    )
    assert everything.returncode == 0 and "removed acme/widget-7b Q4_K_M" in everything.stdout and "padded" not in everything.stdout
    assert everything.stderr.startswith("keeping bigco/padded-gguf Q4_K_M: bigco/padded-gguf Q4_K_M is being downloaded by another process")
    assert kept, "the partial file stays while it downloads"
    assert forced.returncode == 0 and "removed bigco/padded-gguf Q4_K_M" in forced.stdout
    assert pull.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: bigco/Padded-GGUF/{PADDED} was removed from the cache while it downloaded: run again to download it"
