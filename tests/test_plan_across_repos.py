"""The memory plan weighs the files serve would download: each quant from the first ranked GGUF
repo that has it, across the model's repos, as `serve --quant Q` resolves it.

Before, the plan took every quant from the first repo that had Q4_K_M. Where a preferred
publisher (unsloth) had only Q6_K and a lower one (bartowski) had Q4_K_M and Q6_K, the plan sized
bartowski's Q6_K and serve then downloaded unsloth's, another file; and a quant only a lower
repo had was never weighed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_cli
from fakehub import TINY_MODEL, FakeFile, FakeHub, FakeRepo, _quantized, point_hf_at, standard_repos
from vramsupply.hub.resolve import Resolver, resolve
from vramsupply.hub.access import HubAccess

TINY = TINY_MODEL.read_bytes()
PADDED = TINY + b"\0" * 5000  # the same model in a file of another size: which file was sized shows


def thing_repos() -> list[FakeRepo]:
    """acme/Thing-1B: unsloth (preferred) has only Q6_K; bartowski has Q4_K_M and its own Q6_K.
    acme/Other-1B: unsloth has only Q4_K_M; bartowski has Q4_K_M and Q8_0."""
    return [
        FakeRepo("acme/Thing-1B", {"model.safetensors": FakeFile(b"weights")}, ["transformers"]),
        FakeRepo("unsloth/Thing-1B-GGUF", {"Thing-1B-Q6_K.gguf": FakeFile(PADDED)}, _quantized("acme/Thing-1B"), downloads=5),
        FakeRepo(
            "bartowski/acme_Thing-1B-GGUF",
            {"acme_Thing-1B-Q4_K_M.gguf": FakeFile(TINY), "acme_Thing-1B-Q6_K.gguf": FakeFile(TINY)},
            _quantized("acme/Thing-1B"),
            downloads=500,
        ),
        FakeRepo("acme/Other-1B", {"model.safetensors": FakeFile(b"weights")}, ["transformers"]),
        FakeRepo("unsloth/Other-1B-GGUF", {"Other-1B-Q4_K_M.gguf": FakeFile(TINY)}, _quantized("acme/Other-1B"), downloads=5),
        FakeRepo(
            "bartowski/acme_Other-1B-GGUF",
            {"acme_Other-1B-Q4_K_M.gguf": FakeFile(TINY), "acme_Other-1B-Q8_0.gguf": FakeFile(PADDED)},
            _quantized("acme/Other-1B"),
            downloads=500,
        ),
    ]


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub(thing_repos() + standard_repos()) as fake:
        yield fake


def env_for(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "", "HF_HUB_OFFLINE": ""}


def planned(hub: FakeHub, tmp_path: Path, *args: str) -> dict[str, object]:
    result = run_cli("plan", *args, "--n-gpu-layers", "0", "--json", env=env_for(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def by_quant(plan: dict[str, object]) -> dict[str, dict[str, object]]:
    return {c["quant"]: c for c in plan["candidates"]}  # type: ignore[index, union-attr]


def test_each_quant_is_sized_from_the_repo_serve_downloads_it_from(hub: FakeHub, tmp_path: Path) -> None:
    plan = planned(hub, tmp_path, "--model", "acme/Thing-1B")

    quants = by_quant(plan)
    assert quants["Q6_K"]["file_bytes"] == len(PADDED), "unsloth's Q6_K, which serve downloads, not bartowski's"
    assert quants["Q4_K_M"]["file_bytes"] == len(TINY)
    assert (quants["Q6_K"].get("repo"), quants["Q4_K_M"].get("repo")) == ("unsloth/Thing-1B-GGUF", "bartowski/acme_Thing-1B-GGUF")
    assert plan["chosen"] == quants["Q6_K"]


def test_the_quant_the_plan_chooses_is_the_file_serve_resolves(hub: FakeHub, tmp_path: Path) -> None:
    """`models resolve` without --quant takes the quant as serve does (its plan before the download)."""
    plan = planned(hub, tmp_path, "--model", "acme/Thing-1B")
    chosen = plan["chosen"]
    assert isinstance(chosen, dict)

    result = run_cli("models", "resolve", "acme/Thing-1B", "--json", env=env_for(hub, tmp_path))

    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert (resolved["quant"], resolved["total_size"]) == (chosen["quant"], chosen["file_bytes"])
    assert resolved["repo_id"] == "unsloth/Thing-1B-GGUF"


def test_a_better_quant_only_a_lower_ranked_repo_has_is_chosen_and_its_repo_named(hub: FakeHub, tmp_path: Path) -> None:
    plan = planned(hub, tmp_path, "--model", "acme/Other-1B")
    assert plan["chosen"] == by_quant(plan)["Q8_0"] and by_quant(plan)["Q8_0"]["file_bytes"] == len(PADDED)
    reads = [r for r in hub.downloads_of("acme_Other-1B-Q8_0.gguf") if "Range" in r.headers]
    assert reads, "the plan read the header of the file it chose, in bartowski's repo"

    table = run_cli("plan", "--model", "acme/Other-1B", "--n-gpu-layers", "0", env=env_for(hub, tmp_path))
    assert table.returncode == 0, table.stderr
    assert "Q8_0 is downloaded from bartowski/acme_Other-1B-GGUF: acme_Other-1B-Q8_0.gguf" in table.stdout


def test_an_explicit_quant_is_still_resolved_as_serve_quant_resolves_it(hub: FakeHub, tmp_path: Path) -> None:
    plan = planned(hub, tmp_path, "--model", "acme/Thing-1B", "--quant", "Q4_K_M")
    assert plan["chosen"] == by_quant(plan)["Q4_K_M"] and by_quant(plan)["Q4_K_M"]["file_bytes"] == len(TINY)

    missing = run_cli("plan", "--model", "acme/Thing-1B", "--quant", "Q2_K", env=env_for(hub, tmp_path))
    assert missing.returncode == 1
    assert "no GGUF repository of acme/thing-1b has Q2_K: unsloth/Thing-1B-GGUF has Q6_K" in missing.stderr


def test_a_gguf_repo_named_as_the_model_is_planned_on_its_own_quants(hub: FakeHub, tmp_path: Path) -> None:
    """Pinned as before; and planned without --quant although it has no Q4_K_M (before: refused)."""
    plan = planned(hub, tmp_path, "--model", "unsloth/Thing-1B-GGUF")
    assert [c["quant"] for c in plan["candidates"]] == ["Q6_K"]  # type: ignore[index, union-attr]
    assert by_quant(plan)["Q6_K"]["repo"] == "unsloth/Thing-1B-GGUF"

    pinned = planned(hub, tmp_path, "--model", "bartowski/acme_Thing-1B-GGUF")
    assert {c["quant"]: c["file_bytes"] for c in pinned["candidates"]} == {"Q6_K": len(TINY), "Q4_K_M": len(TINY)}  # type: ignore[union-attr]


def test_a_plan_asks_the_hub_about_each_repo_once(hub: FakeHub, tmp_path: Path) -> None:
    """model_info of the model, then of each ranked candidate (at most 8): the resolver's answers
    are reused, not asked again for the quant list."""
    planned(hub, tmp_path, "--model", "acme/Thing-1B", "--quant", "Q6_K")

    infos = [r.path for r in hub.requests if r.path.startswith("/api/models/")]
    assert sorted(infos) == sorted(set(infos)), infos
    assert len([r for r in hub.requests if r.path == "/api/models"]) == 2  # the model tree, the name search


MODELS = ["acme/Thing-1B", "acme/Other-1B", "acme/Widget-7B", "acme/Gadget-3B", "acme/Gizmo-1B", "acme/Original-1B", "quantco/Splitty-GGUF", "unsloth/Thing-1B-GGUF"]


@pytest.mark.parametrize("model", MODELS)
def test_every_quant_the_plan_weighs_resolves_to_the_same_file_on_its_own(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, model: str) -> None:
    point_hf_at(monkeypatch, hub)
    publishers = ("{org}", "ggml-org", "unsloth", "bartowski", "lmstudio-community")

    each = Resolver(HubAccess.from_env(10), publishers).resolve_each(model)

    assert each and len({r.quant for r in each}) == len(each)
    for offered in each:
        assert resolve(model, offered.quant, publishers=publishers) == offered


def test_a_lower_ranked_repo_the_hub_fails_to_describe_is_left_out_not_the_whole_plan(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weighing every quant asks up to 8 repos; a 500 from one serve would not download from
    (bartowski's, below unsloth's for Q6_K) cost the plan the repo it would."""
    point_hf_at(monkeypatch, hub)
    hub.failing.add("bartowski/acme_thing-1b-gguf")
    resolver = Resolver(HubAccess.from_env(5), ("unsloth", "bartowski"))

    each = resolver.resolve_each("acme/Thing-1B")

    assert [(r.quant, r.repo_id) for r in each] == [("Q6_K", "unsloth/Thing-1B-GGUF")]
