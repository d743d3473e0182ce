"""`vramsupply models resolve|pull|list|rm` as a user runs them, against the fake Hub."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_cli
from fakehub import FakeHub, standard_repos
from test_serve import http_get, serving
from vramsupply.hub.store import RepoCache


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub(standard_repos()) as fake:
        yield fake


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    return tmp_path / "hf-home"


def env_for(hub: FakeHub, hf_home: Path, **extra: str) -> dict[str, str]:
    """The child reads HF_ENDPOINT when it prepares a model, so the fake Hub can start after import."""
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), "HF_TOKEN": "", "HF_HUB_OFFLINE": "", **extra}


def test_resolve_shows_the_chosen_repo_as_a_table_or_json(hub: FakeHub, hf_home: Path) -> None:
    table = run_cli("models", "resolve", "acme/Widget-7B", "--quant", "Q4_K_M", env=env_for(hub, hf_home))
    assert table.returncode == 0, table.stderr
    assert "acme/Widget-7B-GGUF" in table.stdout and "Widget-7B-Q4_K_M.gguf" in table.stdout

    as_json = run_cli("models", "resolve", "acme/Gadget-3B", "--json", env=env_for(hub, hf_home, VRAM_SUPPLY_QUANT="q8_0"))
    assert as_json.returncode == 0, as_json.stderr
    resolved = json.loads(as_json.stdout)
    assert (resolved["model_id"], resolved["repo_id"], resolved["quant"]) == ("acme/gadget-3b", "lmstudio-community/Gadget-3B-GGUF", "Q8_0")
    assert resolved["files"][0]["sha256"] == hub.file("lmstudio-community/Gadget-3B-GGUF", "Gadget-3B-Q8_0.gguf").sha256


def test_without_a_quant_resolve_and_pull_take_the_one_serve_would_choose(hub: FakeHub, hf_home: Path) -> None:
    """serve without --quant takes the best quant that fits; pull took the quant setting's default
    (Q4_K_M), so what a provider pulled ahead was not what serve then downloaded and loaded."""
    env = env_for(hub, hf_home)
    planned = json.loads(run_cli("plan", "--model", "acme/Widget-7B", "--json", env=env).stdout)["chosen"]["quant"]
    resolved = run_cli("models", "resolve", "acme/Widget-7B", "--json", env=env)
    pulled = run_cli("models", "pull", "acme/Widget-7B", env=env)

    assert planned == "Q8_0" and json.loads(resolved.stdout)["quant"] == planned
    assert resolved.stderr.strip() == "quant Q8_0: the one serve would choose on this machine (--quant chooses another)"
    assert pulled.returncode == 0 and "acme/widget-7b Q8_0 ready:" in pulled.stdout
    asked = run_cli("models", "resolve", "acme/Widget-7B", "--json", env={**env, "VRAM_SUPPLY_QUANT": "Q4_K_M"})
    assert json.loads(asked.stdout)["quant"] == "Q4_K_M" and asked.stderr == "", "a quant set anywhere is taken as set"


def test_resolve_errors_are_one_line_without_traceback(hub: FakeHub, hf_home: Path) -> None:
    result = run_cli("models", "resolve", "quantco/Tricky-GGUF", "--quant", "Q4_K_M", env=env_for(hub, hf_home))
    assert result.returncode == 1
    assert result.stderr.strip() == "error: quantco/Tricky-GGUF has no Q4_K_M GGUF file; it has IQ4_K_M, Q4_K_M_L, UD-Q4_K_M"


def test_pull_in_a_new_process_resumes_the_partial_file_left_by_an_earlier_one(hub: FakeHub, hf_home: Path) -> None:
    huge = hub.file("bigco/Huge-GGUF", "Huge-Q4_K_M.gguf")
    partial = RepoCache(hf_home / "hub", "bigco/Huge-GGUF").incomplete(huge.sha256)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(huge.data[: 3 * 1024 * 1024])

    result = run_cli("models", "pull", "bigco/Huge-GGUF", "--quant", "Q4_K_M", env=env_for(hub, hf_home))

    assert result.returncode == 0, result.stderr
    assert [request.headers.get("Range") for request in hub.downloads_of("Huge-Q4_K_M.gguf")] == [f"bytes={3 * 1024 * 1024}-"]
    assert "bigco/Huge-GGUF/Huge-Q4_K_M.gguf: 12.6 MB, resuming at 25%" in result.stderr
    assert "bigco/Huge-GGUF/Huge-Q4_K_M.gguf: done, 9.4 MB in" in result.stderr
    assert "bigco/huge-gguf Q4_K_M ready:" in result.stdout


def test_list_and_rm_manage_what_was_pulled(hub: FakeHub, hf_home: Path) -> None:
    env = env_for(hub, hf_home)
    for model in ("acme/Widget-7B", "quantco/Splitty-GGUF"):
        assert run_cli("models", "pull", model, "--json", env=env).returncode == 0

    listed = json.loads(run_cli("models", "list", "--json", env=env).stdout)
    assert sorted((item["model_id"], item["quant"], item["status"]) for item in listed) == [
        ("acme/widget-7b", "Q8_0", "verified"),  # the best that fits, as serve chooses
        ("quantco/splitty", "Q4_K_M", "verified"),  # its split header cannot be planned on: the quant setting
    ]
    table = run_cli("models", "list", env={**env, "COLUMNS": "250"}).stdout
    assert " verified " in table and "[green]" not in table, "a status word, not markup"

    unconfirmed = run_cli("models", "rm", "acme/widget-7b", env=env)
    assert unconfirmed.returncode == 2 and "pass --yes" in unconfirmed.stderr
    removed = run_cli("models", "rm", "acme/Widget-7B-GGUF", "--yes", env=env)
    assert removed.returncode == 0, removed.stderr
    assert "removed acme/widget-7b Q8_0 (acme/Widget-7B-GGUF" in removed.stdout

    purge = run_cli("models", "rm", "--all", "--yes", env=env)
    assert purge.returncode == 0 and "removed quantco/splitty Q4_K_M" in purge.stdout
    assert [path.name for path in (hf_home / "hub").iterdir() if path.name.startswith("models--")] == []
    empty = run_cli("models", "rm", "--all", "--yes", env=env)
    assert empty.returncode == 0 and "no models downloaded by vramsupply" in empty.stdout


def test_pull_offline_uses_the_cache_or_says_what_to_do(hub: FakeHub, hf_home: Path) -> None:
    env = env_for(hub, hf_home)
    assert run_cli("models", "pull", "acme/Widget-7B", env=env).returncode == 0
    hub.stop()

    cached = run_cli("models", "pull", "acme/widget-7b", env={**env, "HF_HUB_OFFLINE": "1"})
    assert cached.returncode == 0, cached.stderr
    assert "acme/widget-7b Q8_0 ready:" in cached.stdout, "offline, the best quant in the cache: what was pulled"

    missing = run_cli("models", "pull", "acme/Gadget-3B", env=env)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: cannot reach the Hub at ")
    assert missing.stderr.rstrip().endswith("holds no verified copy of acme/Gadget-3B Q4_K_M: run this command again once the Hub can be reached")
    assert "Traceback" not in missing.stderr


def test_serve_downloads_from_the_hub_and_serves_under_the_canonical_id(hub: FakeHub, hf_home: Path) -> None:
    with serving("--model", "acme/Widget-7B", "--quant", "q4_k_m", env=env_for(hub, hf_home)) as served:
        assert served.model_id == "acme/widget-7b"
        status, models = http_get(served.base_url + "/models")
        assert status == 200 and models["data"][0]["id"] == "acme/widget-7b"

    assert "acme/Widget-7B-GGUF/Widget-7B-Q4_K_M.gguf: done, 1.2 MB in" in served.log
    listed = json.loads(run_cli("models", "list", "--json", env=env_for(hub, hf_home)).stdout)
    assert [(item["repo_id"], item["status"]) for item in listed] == [("acme/Widget-7B-GGUF", "verified")]


def test_models_resolve_refuses_a_local_path_naming_it_as_a_path(tmp_path: Path) -> None:
    """A directory is a local path too, not a "local file"."""
    for given in (str(tmp_path), "./model.gguf"):
        result = run_cli("models", "resolve", given)
        assert result.returncode == 2
        assert result.stderr.strip() == (
            f"error: {given} is a local path: only HuggingFace ids (org/model) are resolved (serve and models pull accept local paths)"
        )
