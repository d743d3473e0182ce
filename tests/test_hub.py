"""Resolving and downloading GGUF models with the real huggingface_hub client against a fake Hub."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download, scan_cache_dir

from fakehub import BIG, TINY_MODEL, TOKEN, FakeHub, point_hf_at, standard_repos
from vramsupply.config import load_settings
from vramsupply.hub import (
    ChecksumMismatch,
    DownloadError,
    HubAuthError,
    HubError,
    HubOffline,
    HubUnreachable,
    InsufficientDiskSpace,
    InvalidModelSpec,
    ModelFileError,
    ModelNotFound,
    QuantNotFound,
    list_cached,
    prepare_configured,
    prepare_model,
    remove_cached,
)
from vramsupply.hub.resolve import resolve
from vramsupply.hub.store import RepoCache

HALF = 5 * 1024 * 1024


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub(standard_repos()) as fake:
        point_hf_at(monkeypatch, fake)
        yield fake


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_model_orgs_own_gguf_repo_beats_more_downloaded_third_parties(hub: FakeHub) -> None:
    resolved = resolve("acme/Widget-7B", "Q4_K_M")

    assert resolved.model_id == "acme/widget-7b"
    assert resolved.repo_id == "acme/Widget-7B-GGUF"
    assert resolved.revision == hub.repos["acme/widget-7b-gguf"].sha
    assert [file.path for file in resolved.files] == ["Widget-7B-Q4_K_M.gguf"]
    assert resolved.primary.sha256 == hashlib.sha256(TINY_MODEL.read_bytes()).hexdigest()
    assert resolved.available_quants == ("Q4_K_M", "Q8_0")


def test_third_party_repos_rank_by_preferred_publisher_then_downloads(hub: FakeHub) -> None:
    assert resolve("acme/gadget-3b", "q4_k_m").repo_id == "bartowski/acme_Gadget-3B-GGUF"
    assert resolve("acme/Gadget-3B", "Q8_0").repo_id == "lmstudio-community/Gadget-3B-GGUF"
    assert resolve("acme/Gadget-3B", "Q4_K_M", publishers=()).repo_id == "stranger/Gadget-3B-GGUF"


def test_settings_choose_the_publishers_quant_and_cache(hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRAM_SUPPLY_GGUF_PUBLISHERS", "stranger, {org}")
    monkeypatch.setenv("VRAM_SUPPLY_CACHE_DIR", str(cache))
    monkeypatch.setenv("VRAM_SUPPLY_QUANT", "q4_k_m")

    model = prepare_configured("acme/Gadget-3B", load_settings().settings, progress=False)

    assert (model.repo_id, model.quant) == ("stranger/Gadget-3B-GGUF", "Q4_K_M")
    assert model.path.is_relative_to(cache)


def test_name_search_finds_untagged_gguf_repos_but_not_finetunes(hub: FakeHub) -> None:
    resolved = resolve("acme/Gizmo-1B", "Q4_K_M")

    assert resolved.repo_id == "ggml-org/Gizmo-1B-GGUF"
    assert resolved.model_id == "acme/gizmo-1b"


def test_a_gguf_repo_id_is_used_directly_with_its_base_model_as_identity(hub: FakeHub) -> None:
    resolved = resolve("quantco/Splitty-GGUF", "Q8_0")

    assert resolved.repo_id == "quantco/Splitty-GGUF"
    assert resolved.model_id == "quantco/splitty"
    assert [file.path for file in resolved.files] == ["Splitty-Q8_0.gguf"]


def test_an_original_repo_with_its_own_gguf_is_used_only_for_quants_it_has(hub: FakeHub) -> None:
    own = resolve("acme/Original-1B", "F16")
    assert (own.repo_id, own.model_id) == ("acme/Original-1B", "acme/original-1b")
    assert resolve("acme/Original-1B", "Q4_K_M").repo_id == "unsloth/Original-1B-GGUF"


def test_split_files_in_a_subfolder_are_all_downloaded_and_the_first_is_loaded(hub: FakeHub, cache: Path) -> None:
    model = prepare_model("quantco/Splitty-GGUF", "Q4_K_M", cache_dir=cache)

    repo = hub.repos["quantco/splitty-gguf"]
    names = [f"Q4_K_M/Splitty-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    snapshot = cache / "models--quantco--Splitty-GGUF" / "snapshots" / repo.sha
    assert model.path == snapshot / names[0]
    assert model.filename == names[0]
    assert model.sha256 == repo.files[names[0]].sha256
    assert model.size == sum(len(repo.files[name].data) for name in names)
    for name in names:
        assert (snapshot / name).read_bytes() == repo.files[name].data
    assert not (snapshot / "Splitty-Q8_0.gguf").exists()


def test_a_missing_quant_lists_the_quants_the_repo_has(hub: FakeHub) -> None:
    with pytest.raises(QuantNotFound, match=r"quantco/Tricky-GGUF has no Q4_K_M GGUF file; it has IQ4_K_M, Q4_K_M_L, UD-Q4_K_M$"):
        resolve("quantco/Tricky-GGUF", "Q4_K_M")
    with pytest.raises(QuantNotFound) as info:
        resolve("acme/Gadget-3B", "Q2_K")
    assert "bartowski/acme_Gadget-3B-GGUF has Q4_K_M, Q6_K" in str(info.value)
    assert "lmstudio-community/Gadget-3B-GGUF has Q8_0" in str(info.value)


def test_no_gguf_repo_says_what_was_searched_and_what_to_pass(hub: FakeHub) -> None:
    with pytest.raises(ModelNotFound) as info:
        resolve("acme/Lonely-2B", "Q4_K_M")
    message = str(info.value)
    assert "base_model:quantized:acme/Lonely-2B" in message
    assert "Lonely-2B-GGUF" in message
    assert "--model <org>/<gguf-repo>" in message and "local .gguf" in message


def test_a_connection_dropped_half_way_is_resumed_with_range_and_verified(hub: FakeHub, cache: Path) -> None:
    hub.drop_once["Huge-Q4_K_M.gguf"] = HALF

    model = prepare_model("bigco/Huge-GGUF", "Q4_K_M", cache_dir=cache)

    gets = hub.downloads_of("Huge-Q4_K_M.gguf")
    # The drop is a reset (abort): bytes still in flight are lost, so the resume starts at what had
    # arrived, HALF or a little before it (a run resumed at 4 MiB of the 5 sent).
    first, resumed = [request.headers.get("Range") for request in gets]
    assert first is None and resumed is not None and 0 < int(resumed.removeprefix("bytes=").removesuffix("-")) <= HALF, resumed
    assert model.size == BIG
    assert sha256_of(model.path) == model.sha256 == hub.file("bigco/Huge-GGUF", "Huge-Q4_K_M.gguf").sha256
    repo = RepoCache(cache, "bigco/Huge-GGUF")
    assert repo.marker(model.sha256).exists()
    assert not repo.incomplete(model.sha256).exists()


def test_a_stalled_download_fails_in_time_and_a_fresh_call_resumes_it(hub: FakeHub, cache: Path) -> None:
    hub.stall_after["Huge-Q4_K_M.gguf"] = HALF
    with pytest.raises(DownloadError, match=r"download of bigco/Huge-GGUF/Huge-Q4_K_M.gguf stalled: no data for [0-9.]+ s .* run again to resume"):
        prepare_model("bigco/Huge-GGUF", "Q4_K_M", cache_dir=cache, timeout=0.5)
    sha = hub.file("bigco/Huge-GGUF", "Huge-Q4_K_M.gguf").sha256
    partial = RepoCache(cache, "bigco/Huge-GGUF").incomplete(sha)
    assert partial.stat().st_size == HALF

    del hub.stall_after["Huge-Q4_K_M.gguf"]
    hub.requests.clear()
    model = prepare_model("bigco/Huge-GGUF", "Q4_K_M", cache_dir=cache, timeout=0.5)

    assert [request.headers.get("Range") for request in hub.downloads_of("Huge-Q4_K_M.gguf")] == [f"bytes={HALF}-"]
    assert sha256_of(model.path) == sha
    assert not partial.exists()


def test_corrupted_bytes_are_rejected_and_removed(hub: FakeHub, cache: Path) -> None:
    hub.corrupt.add("Broken-Q4_K_M.gguf")

    with pytest.raises(ChecksumMismatch, match=r"bigco/Broken-GGUF/Broken-Q4_K_M.gguf is corrupt: sha256 \w+ does not match"):
        prepare_model("bigco/Broken-GGUF", "Q4_K_M", cache_dir=cache)

    repo = RepoCache(cache, "bigco/Broken-GGUF")
    assert list(repo.blobs.iterdir()) == []
    assert not repo.snapshots.exists()


def test_a_verified_copy_is_not_downloaded_or_hashed_again_but_a_tampered_one_is(hub: FakeHub, cache: Path) -> None:
    first = prepare_model("acme/Widget-7B", "Q4_K_M", cache_dir=cache)
    hub.requests.clear()

    again = prepare_model("acme/Widget-7B", "Q4_K_M", cache_dir=cache)
    assert again == first
    assert hub.downloads_of("Widget-7B-Q4_K_M.gguf") == []

    blob = first.path.resolve()
    blob.write_bytes(b"GGUF" + bytes(blob.stat().st_size - 4))
    repaired = prepare_model("acme/Widget-7B", "Q4_K_M", cache_dir=cache)
    assert len(hub.downloads_of("Widget-7B-Q4_K_M.gguf")) == 1
    assert sha256_of(repaired.path) == first.sha256


def test_offline_uses_the_verified_cached_copy_when_the_hub_is_gone(hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    online = prepare_model("acme/Widget-7B", "Q4_K_M", cache_dir=cache)
    hub.stop()

    assert prepare_model("acme/widget-7b", "q4_k_m", cache_dir=cache) == online
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert prepare_model("acme/Widget-7B-GGUF", "Q4_K_M", cache_dir=cache) == online
    with pytest.raises(HubOffline, match=r"HF_HUB_OFFLINE is set, and .* holds no verified copy of acme/Widget-7B Q8_0"):
        prepare_model("acme/Widget-7B", "Q8_0", cache_dir=cache)
    with pytest.raises(HubUnreachable, match=r"HF_HUB_OFFLINE is set, so http://127\.0\.0\.1:\d+ is not asked about acme/Widget-7B"):
        resolve("acme/Widget-7B", "Q4_K_M")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(HubOffline, match=r"cannot reach the Hub at http://127\.0\.0\.1:\d+ .* no verified copy of acme/Gadget-3B"):
        prepare_model("acme/Gadget-3B", "Q4_K_M", cache_dir=cache)


def test_a_hub_that_never_answers_counts_as_unreachable(hub: FakeHub, cache: Path) -> None:
    online = prepare_model("acme/Widget-7B", "Q4_K_M", cache_dir=cache)
    hub.hang_api = True

    assert prepare_model("acme/Widget-7B", "Q4_K_M", cache_dir=cache, timeout=0.3) == online
    with pytest.raises(HubOffline, match=r"cannot reach the Hub at .*ReadTimeout"):
        prepare_model("acme/Gadget-3B", "Q4_K_M", cache_dir=cache, timeout=0.3)


def test_a_gated_repo_asks_for_the_licence_and_hf_token(hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(HubAuthError) as info:
        prepare_model("gatedco/Locked-GGUF", "Q4_K_M", cache_dir=cache)
    assert str(info.value) == (
        f"access to gatedco/Locked-GGUF was refused: accept the model's licence at {hub.url}/gatedco/Locked-GGUF "
        "and set HF_TOKEN to an access token of that account"
    )

    assert list_cached(cache) == []

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.requests.clear()
    model = prepare_model("gatedco/Locked-GGUF", "Q4_K_M", cache_dir=cache)

    assert model.path.read_bytes() == TINY_MODEL.read_bytes()
    hub_get, cdn_get = hub.downloads_of("Locked-Q4_K_M.gguf")
    assert hub_get.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "/blobs/" in cdn_get.path and "Authorization" not in cdn_get.headers


def test_a_local_path_skips_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    model = prepare_model(str(TINY_MODEL), "Q4_K_M")
    assert (model.path, model.model_id, model.repo_id, model.size) == (TINY_MODEL, "stories260k", None, TINY_MODEL.stat().st_size)

    home_copy = Path(os.environ["HOME"]) / "My-Model-Q8_0.gguf"
    home_copy.write_bytes(TINY_MODEL.read_bytes())
    assert prepare_model("~/My-Model-Q8_0.gguf", "Q4_K_M").quant == "Q8_0"

    with pytest.raises(ModelFileError, match=r"model file .*/missing.gguf does not exist"):
        prepare_model(str(tmp_path / "missing.gguf"), "Q4_K_M")
    (tmp_path / "notes.gguf").write_text("hello")
    with pytest.raises(ModelFileError, match=r"notes.gguf is not a GGUF file"):
        prepare_model(str(tmp_path / "notes.gguf"), "Q4_K_M")
    with pytest.raises(InvalidModelSpec, match=r"'just words' is neither a HuggingFace model id"):
        prepare_model("just words", "Q4_K_M")


def test_too_little_disk_space_fails_before_any_byte_moves(hub: FakeHub, cache: Path) -> None:
    with pytest.raises(InsufficientDiskSpace, match=r"bigco/Enormous-GGUF Q4_K_M needs 10.0 PB more in .* but only .* is free"):
        prepare_model("bigco/Enormous-GGUF", "Q4_K_M", cache_dir=cache)
    assert hub.downloads_of("Enormous-Q4_K_M.gguf") == []


def test_a_file_huggingface_hub_already_downloaded_is_hashed_once_not_fetched_again(hub: FakeHub, cache: Path) -> None:
    hf_hub_download("acme/Widget-7B-GGUF", "Widget-7B-Q4_K_M.gguf", cache_dir=cache, endpoint=hub.url)
    fetched_by_hf = len(hub.downloads_of("Widget-7B-Q4_K_M.gguf"))

    model = prepare_model("acme/Widget-7B", "Q4_K_M", cache_dir=cache)

    assert len(hub.downloads_of("Widget-7B-Q4_K_M.gguf")) == fetched_by_hf
    assert RepoCache(cache, "acme/Widget-7B-GGUF").is_verified(resolve("acme/Widget-7B", "Q4_K_M").primary)
    assert model.path.read_bytes() == TINY_MODEL.read_bytes()


def test_file_paths_that_would_escape_the_cache_are_refused(hub: FakeHub, cache: Path) -> None:
    with pytest.raises(HubError, match=r"the Hub sent unusable metadata for evil/Escape-GGUF/\.\./\.\./escape-Q4_K_M\.gguf"):
        prepare_model("evil/Escape-GGUF", "Q4_K_M", cache_dir=cache)
    assert not cache.exists()


def test_rm_of_one_id_keeps_the_files_another_pulled_id_shares(hub: FakeHub, cache: Path) -> None:
    by_base = prepare_model("acme/Gizmo-1B", "Q4_K_M", cache_dir=cache)
    by_repo = prepare_model("ggml-org/Gizmo-1B-GGUF", "Q4_K_M", cache_dir=cache)
    assert by_base.path == by_repo.path and by_base.model_id != by_repo.model_id

    assert [removed.model_id for removed in remove_cached(cache, "acme/gizmo-1b")] == ["acme/gizmo-1b"]

    [left] = list_cached(cache)
    assert (left.model_id, left.status.value) == ("ggml-org/gizmo-1b-gguf", "verified")
    assert by_repo.path.read_bytes() == TINY_MODEL.read_bytes()


def test_an_edited_record_cannot_make_rm_delete_outside_the_cache(hub: FakeHub, cache: Path, tmp_path: Path) -> None:
    prepare_model("acme/Widget-7B", "Q4_K_M", cache_dir=cache)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    record = RepoCache(cache, "acme/Widget-7B-GGUF").record_path
    record.write_text(record.read_text().replace('"path": "Widget-7B-Q4_K_M.gguf"', '"path": "../../../../victim.txt"'))

    assert remove_cached(cache, None) == []
    assert list_cached(cache) == []
    assert victim.read_text() == "keep me"


def test_damaged_record_and_ref_files_are_no_traceback(hub: FakeHub, cache: Path) -> None:
    model = prepare_model("acme/Widget-7B", "Q4_K_M", cache_dir=cache)
    repo = RepoCache(cache, "acme/Widget-7B-GGUF")
    repo.record_path.write_bytes(b"\xff\xfe{")
    ref = repo.refs / "main"
    ref.write_bytes(b"\xff\xfe")

    assert list_cached(cache) == [], "an unreadable record counts as no pull"
    assert remove_cached(cache, None) == []
    assert not ref.exists(), "a ref to no snapshot is dropped, as huggingface_hub would call the cache corrupted"
    again = prepare_model("acme/Widget-7B", "Q4_K_M", cache_dir=cache)
    assert again.path.read_bytes() == model.path.read_bytes() == TINY_MODEL.read_bytes()
    assert [cached.model_id for cached in list_cached(cache)] == ["acme/widget-7b"]


def test_the_cache_is_shared_with_huggingface_hub_and_rm_leaves_other_files(hub: FakeHub, cache: Path) -> None:
    model = prepare_model("quantco/Splitty-GGUF", "Q4_K_M", cache_dir=cache)
    readme = hf_hub_download("quantco/Splitty-GGUF", "README.md", cache_dir=cache, endpoint=hub.url)

    same = hf_hub_download("quantco/Splitty-GGUF", model.filename, cache_dir=cache, local_files_only=True)
    assert Path(same) == model.path
    report = scan_cache_dir(cache)
    assert report.warnings == []
    assert {repo.repo_id for repo in report.repos} == {"quantco/Splitty-GGUF"}
    [cached] = list_cached(cache)
    assert (cached.model_id, cached.quant, cached.status.value, cached.on_disk) == ("quantco/splitty", "Q4_K_M", "verified", model.size)

    assert [removed.repo_id for removed in remove_cached(cache, "QUANTCO/SPLITTY")] == ["quantco/Splitty-GGUF"]

    assert list_cached(cache) == []
    assert not model.path.exists() and Path(readme).read_bytes() == b"# Splitty"
    assert scan_cache_dir(cache).warnings == []


def test_a_rate_limited_download_waits_as_long_as_the_hub_asks(hub: FakeHub, cache: Path) -> None:
    """A 429's ``Retry-After`` was ignored: asked again 0.2, 0.4, 0.8 s later."""
    hub.limiting_downloads["Widget-7B-Q4_K_M.gguf"] = (2, "1")
    began = time.monotonic()
    model = prepare_model("acme/Widget-7B", "Q4_K_M", cache_dir=cache)
    assert time.monotonic() - began >= 1.9
    assert model.path.read_bytes() == TINY_MODEL.read_bytes()


def test_a_rate_limit_longer_than_the_download_timeout_fails_at_once_saying_so(hub: FakeHub, cache: Path) -> None:
    """It asked again and again until the timeout, then called it a stall, naming "_Retry"."""
    hub.limiting_downloads["Widget-7B-Q4_K_M.gguf"] = (100, "120")
    began = time.monotonic()
    with pytest.raises(DownloadError) as info:
        prepare_model("acme/Widget-7B", "Q4_K_M", cache_dir=cache, timeout=5)
    assert time.monotonic() - began < 4
    assert "answered HTTP 429 and asks to wait 120 s, more than the 5 s left of the download timeout (VRAM_SUPPLY_DOWNLOAD_TIMEOUT)" in str(info.value)
    assert str(info.value).endswith("run again later to resume") and "_Retry" not in str(info.value)


def test_a_rate_limited_description_says_how_long_the_hub_asks_to_wait(hub: FakeHub, cache: Path) -> None:
    hub.limiting_infos["acme/widget-7b"] = "30"
    with pytest.raises(HubOffline, match=r"answered HTTP 429 for acme/Widget-7B \(it asks to wait 30 s\)"):
        prepare_model("acme/Widget-7B", "Q4_K_M", cache_dir=cache)


def test_a_repo_whose_description_the_hub_refuses_asks_for_the_licence_not_says_no_such_repo(hub: FakeHub) -> None:
    """huggingface_hub's GatedRepoError is a RepositoryNotFoundError: the refusal was read as "not a repository"."""
    hub.refusing.add("stranger/gadget-3b-gguf")
    with pytest.raises(HubAuthError, match=r"^access to stranger/Gadget-3B-GGUF was refused: accept the model's licence"):
        resolve("stranger/Gadget-3B-GGUF", "Q4_K_M")
    hub.refusing.update({"lmstudio-community/gadget-3b-gguf", "bartowski/acme_gadget-3b-gguf"})
    with pytest.raises(ModelNotFound) as info:
        resolve("acme/Gadget-3B", "Q4_K_M")
    assert "no accessible GGUF repository found for acme/gadget-3b (the Hub refused access to bartowski/acme_Gadget-3B-GGUF, " in str(info.value)
    assert "set HF_TOKEN" in str(info.value)
