"""Findings of the HuggingFace review, each as the user met it: a stall that waited twice the
download timeout, offline errors that did not say what to do, a private repo reported as missing,
a copied cache that could never be used offline, and `models rm` deleting other tools' files."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from aiohttp import web
from huggingface_hub import hf_hub_download

from conftest import run_cli
from fakehub import FakeHub, FakeRepo, point_hf_at, standard_repos
from test_hub import HALF
from test_hub_cli import env_for
from vramsupply.hub import DownloadError, list_cached, prepare_model


def test_a_download_that_stops_sending_gives_up_after_one_timeout_not_two(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attempt that timed out had received bytes, so the old loop counted its end as progress
    and waited a whole second timeout (on a second request) before giving up."""
    with FakeHub(standard_repos()) as hub:
        point_hf_at(monkeypatch, hub)
        hub.stall_after["Huge-Q4_K_M.gguf"] = HALF
        with pytest.raises(DownloadError) as info:
            prepare_model("bigco/Huge-GGUF", "Q4_K_M", cache_dir=tmp_path / "cache", timeout=1.0)

    assert len(hub.downloads_of("Huge-Q4_K_M.gguf")) == 1, "no second request that waits another timeout"
    stalled = float(re.search(r"stalled: no data for ([0-9.]+) s", str(info.value)).group(1))
    assert stalled >= 1.0, "the message counts from the last byte"


class HubWithAPrivateRepo(FakeHub):
    """The real Hub's answer for a private repo asked about without access: 401 RepoNotFound."""

    def _repo(self, request: web.Request) -> FakeRepo:
        if request.match_info["org"] == "private":
            raise web.HTTPUnauthorized(headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "Invalid username or password."})
        return super()._repo(request)


def test_a_private_repo_without_a_token_says_to_set_hf_token_and_searches_no_gguf_gguf(tmp_path: Path) -> None:
    with HubWithAPrivateRepo(standard_repos()) as hub:
        result = run_cli("models", "pull", "private/Secret-GGUF", "--quant", "Q4_K_M", env=env_for(hub, tmp_path / "hf-home"))

    assert result.returncode == 1
    assert "set HF_TOKEN to an access token of an account that can see it" in result.stderr
    assert "HTTP 401 for private/Secret-GGUF" in result.stderr
    assert "Secret-GGUF-GGUF" not in result.stderr and "named Secret-GGUF;" in result.stderr


def test_offline_plan_and_resolve_say_what_to_do_and_plan_names_the_cached_quant(tmp_path: Path) -> None:
    hf_home = tmp_path / "hf-home"
    with FakeHub(standard_repos()) as hub:
        pulled = run_cli("models", "pull", "acme/Widget-7B", "--quant", "Q4_K_M", env=env_for(hub, hf_home))
        assert pulled.returncode == 0, pulled.stderr
        offline = env_for(hub, hf_home, HF_HUB_OFFLINE="1")
        resolved = run_cli("models", "resolve", "acme/Widget-7B", "--quant", "Q4_K_M", env=offline)
        planned = run_cli("plan", "--model", "acme/Widget-7B", env=offline)

    for result in (resolved, planned):
        assert result.returncode == 1
        assert "unset HF_HUB_OFFLINE and run this command again while online" in result.stderr, result.stderr
    assert "serve --model acme/Widget-7B uses the cached Q4_K_M" in planned.stderr, planned.stderr


def test_a_cache_copied_with_cp_is_hashed_once_and_then_used_offline(tmp_path: Path) -> None:
    """`cp -r` gives every blob a new mtime, which the verification markers name: the copy was
    "no verified copy" offline for ever, though the record holds every file's sha256."""
    hf_home = tmp_path / "hf-home"
    with FakeHub(standard_repos()) as hub:
        pulled = run_cli("models", "pull", "acme/Widget-7B", "--quant", "Q4_K_M", env=env_for(hub, hf_home))
        assert pulled.returncode == 0, pulled.stderr
        copied = tmp_path / "copied"
        subprocess.run(["cp", "-r", str(hf_home / "hub"), str(copied)], check=True)
        offline = env_for(hub, tmp_path / "elsewhere", HF_HUB_OFFLINE="1", VRAM_SUPPLY_CACHE_DIR=str(copied))
        ready = run_cli("models", "pull", "acme/Widget-7B", "--quant", "Q4_K_M", env=offline)

    assert ready.returncode == 0, ready.stderr
    assert "acme/widget-7b Q4_K_M ready:" in ready.stdout and str(copied) in ready.stdout
    [cached] = list_cached(copied)
    assert cached.status.value == "verified", "the marker was written after the one hash"


def test_a_copied_blob_that_does_not_match_its_recorded_sha256_is_not_used_offline(tmp_path: Path) -> None:
    hf_home = tmp_path / "hf-home"
    with FakeHub(standard_repos()) as hub:
        assert run_cli("models", "pull", "acme/Widget-7B", "--quant", "Q4_K_M", env=env_for(hub, hf_home)).returncode == 0
        copied = tmp_path / "copied"
        subprocess.run(["cp", "-r", str(hf_home / "hub"), str(copied)], check=True)
        [blob] = [path for path in (copied / "models--acme--Widget-7B-GGUF" / "blobs").iterdir() if "." not in path.name]
        blob.write_bytes(b"GGUF" + bytes(blob.stat().st_size - 4))
        offline = env_for(hub, tmp_path / "elsewhere", HF_HUB_OFFLINE="1", VRAM_SUPPLY_CACHE_DIR=str(copied))
        refused = run_cli("models", "pull", "acme/Widget-7B", "--quant", "Q4_K_M", env=offline)

    assert refused.returncode == 1 and "holds no verified copy" in refused.stderr


def test_rm_keeps_a_file_hf_downloaded_that_pull_adopted_and_other_tools_leftovers(tmp_path: Path) -> None:
    hf_home = tmp_path / "hf-home"
    name = "Widget-7B-Q8_0.gguf"
    with FakeHub(standard_repos()) as hub:
        theirs = Path(hf_hub_download("acme/Widget-7B-GGUF", name, cache_dir=hf_home / "hub", endpoint=hub.url))
        pulled = run_cli("models", "pull", "acme/Widget-7B-GGUF", "--quant", "Q8_0", env=env_for(hub, hf_home))
        assert pulled.returncode == 0, pulled.stderr
        assert len(hub.downloads_of(name)) == 1, "pull adopted hf's file"
        folder = hf_home / "hub" / "models--acme--Widget-7B-GGUF"
        foreign_partial = folder / "blobs" / "0123abcd.5f3e.incomplete"
        foreign_partial.write_bytes(b"half of another file")
        (folder / ".no_exist" / "abc").mkdir(parents=True)
        (folder / ".no_exist" / "abc" / "README.md").write_bytes(b"")

        removed = run_cli("models", "rm", "acme/Widget-7B-GGUF", "--yes", env=env_for(hub, hf_home))

    assert removed.returncode == 0, removed.stderr
    assert theirs.read_bytes() == hub.file("acme/Widget-7B-GGUF", name).data, "hf's file and its snapshot link stay"
    assert foreign_partial.exists() and (folder / ".no_exist" / "abc" / "README.md").exists()
    assert list_cached(hf_home / "hub") == []
    assert not list(folder.glob("blobs/*.verified")) and not list(folder.glob("blobs/*.adopted")), "vramsupply's own notes go"


def test_rm_still_deletes_the_whole_folder_when_only_vramsupply_wrote_in_it(tmp_path: Path) -> None:
    hf_home = tmp_path / "hf-home"
    with FakeHub(standard_repos()) as hub:
        assert run_cli("models", "pull", "acme/Widget-7B-GGUF", "--quant", "Q8_0", env=env_for(hub, hf_home)).returncode == 0
        removed = run_cli("models", "rm", "acme/Widget-7B-GGUF", "--yes", env=env_for(hub, hf_home))

    assert removed.returncode == 0, removed.stderr
    assert not (hf_home / "hub" / "models--acme--Widget-7B-GGUF").exists()
    assert not (hf_home / "hub" / ".locks" / "models--acme--Widget-7B-GGUF").exists()
