"""A .gguf path that is a Hub download is offered as the Hub model it is, not under its file's stem.

A provider who passes `--model ~/.cache/huggingface/hub/models--org--repo/snapshots/<commit>/x.gguf`
(the file `models pull`, `hf download` or llama.cpp fetched) serves the very file `serve --model
org/model --quant Q` loads; registered as `x-q4_k_m` with no repo, buyers asking for the Hub id
never reached it.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_process import AgentProcess
from conftest import TINY_MODEL
from fakehub import FakeHub, point_hf_at, standard_repos
from huggingface_hub import hf_hub_download
from live_platform import API_KEY, LivePlatform, free_port
from test_platform_serve import MESSAGES, marketplace_env, post

from vramsupply.hub import model_id_of, prepare_model
from vramsupply.hub.resolve import resolve


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub(standard_repos()) as fake:
        point_hf_at(monkeypatch, fake)
        yield fake


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"


def test_serving_a_pulled_file_by_its_path_registers_the_hub_model_and_buyers_reach_it(hub: FakeHub, cache: Path) -> None:
    pulled = prepare_model("acme/Widget-7B", "Q4_K_M", cache_dir=cache)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with LivePlatform() as platform:
        env = {**marketplace_env(platform.url), "HF_HUB_OFFLINE": "1"}
        with AgentProcess("--model", str(pulled.path), "--port", str(port), "--endpoint-url", endpoint, env=env) as agent:
            agent.wait_for(lambda: len(platform.providers) == 1, "registration")
            [provider] = platform.providers
            status, answer = post(
                f"{platform.url}/v1/chat/completions",
                {"model": "acme/widget-7b", "messages": MESSAGES, "max_tokens": 2},
                {"Authorization": f"Bearer {API_KEY}"},
            )
            assert agent.stop(signal.SIGTERM) == 0

    offer = provider.offer
    assert (offer.model, offer.gguf_repo, offer.gguf_file, offer.quant) == ("acme/widget-7b", "acme/Widget-7B-GGUF", "Widget-7B-Q4_K_M.gguf", "Q4_K_M")
    assert offer.gguf_sha256 == hashlib.sha256(TINY_MODEL.read_bytes()).hexdigest()
    assert status == 200, answer
    assert agent.model_id == "acme/widget-7b"


@pytest.mark.parametrize(("model", "quant"), [("acme/Widget-7B", "Q4_K_M"), ("quantco/Splitty-GGUF", "Q4_K_M")])
def test_a_pulled_file_by_path_is_the_model_its_hub_id_serves_offline(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch, model: str, quant: str
) -> None:
    path = prepare_model(model, quant, cache_dir=cache).path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    by_id = prepare_model(model, quant, cache_dir=cache)
    by_path = prepare_model(str(path), "Q8_0")

    assert by_path == by_id, "same id, repo, commit, file, sha256, quant and size (all parts of a split model)"
    assert model_id_of(str(path)) == by_id.model_id, "vramsupply demand stars it under that id"


def test_a_link_to_a_pulled_file_or_its_blob_is_that_hub_model_too(hub: FakeHub, cache: Path, tmp_path: Path) -> None:
    pulled = prepare_model("acme/Widget-7B", "Q4_K_M", cache_dir=cache)
    link = tmp_path / "models" / "widget.gguf"
    link.parent.mkdir()
    link.symlink_to(pulled.path)

    for path in (link, pulled.path.resolve()):
        served = prepare_model(str(path), "Q4_K_M")
        assert (served.model_id, served.repo_id, served.filename, served.sha256) == ("acme/widget-7b", pulled.repo_id, pulled.filename, pulled.sha256)


def test_a_file_huggingface_hub_downloaded_is_offered_under_the_id_serve_gives_its_repo(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = Path(hf_hub_download("acme/Widget-7B-GGUF", "Widget-7B-Q4_K_M.gguf", cache_dir=cache, endpoint=hub.url))

    online = prepare_model(str(path), "Q4_K_M")
    expected = resolve("acme/Widget-7B-GGUF", "Q4_K_M")  # what `serve --model acme/Widget-7B-GGUF --quant Q4_K_M` loads
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = prepare_model(str(path), "Q4_K_M")

    assert (online.model_id, online.repo_id, online.revision, online.filename, online.quant) == (
        expected.model_id, expected.repo_id, expected.revision, expected.primary.path, expected.quant,
    )  # fmt: skip
    assert online.model_id == "acme/widget-7b", "the repo's base model, as the Hub names it"
    assert online.sha256 is None, "nothing here verified the bytes huggingface_hub wrote"
    assert (offline.model_id, offline.repo_id) == ("acme/widget-7b-gguf", "acme/Widget-7B-GGUF"), "offline, the repo id"


def test_a_file_whose_repo_vramsupply_pulled_another_quant_of_takes_that_pulls_id_without_asking(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare_model("acme/Gadget-3B", "Q4_K_M", cache_dir=cache)
    path = Path(hf_hub_download("bartowski/acme_Gadget-3B-GGUF", "acme_Gadget-3B-Q6_K.gguf", cache_dir=cache, endpoint=hub.url))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    served = prepare_model(str(path), "Q4_K_M")

    assert (served.model_id, served.repo_id, served.quant) == ("acme/gadget-3b", "bartowski/acme_Gadget-3B-GGUF", "Q6_K")


def test_a_path_outside_any_hub_cache_keeps_its_stem(tmp_path: Path) -> None:
    lookalike = tmp_path / "models--acme--Widget-7B-GGUF" / "Widget-7B-Q4_K_M.gguf"
    lookalike.parent.mkdir()
    lookalike.write_bytes(TINY_MODEL.read_bytes())

    for path in (TINY_MODEL, lookalike):
        served = prepare_model(str(path), "Q4_K_M")
        assert (served.model_id, served.repo_id, served.sha256) == (path.stem.lower(), None, None)
