"""The plan asks the Hub about a model's candidate GGUF repos all at once, not one after another.

Weighing every quant needs the file listing of up to 8 repos, each a `model_info` call of
0.2–1 s on a real connection: one after another, a plan waited seconds on calls that could run
together. The fake Hub holds each candidate's description until all of them are being asked at
once (or a generous limit passes, after which it answers anyway and records that they were not):
the test reads how many it had in flight together, not the clock. What the plan offers is the same
as before, in the same ranking, with a failing or refusing repo among the others; and serve's
`--quant` resolve still stops at the first repo that has the quant.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_cli
from fakehub import TINY_MODEL, FakeFile, FakeHub, FakeRepo, _quantized, standard_repos

TINY = TINY_MODEL.read_bytes()


def sized(extra: int) -> FakeFile:
    """The tiny model padded to a size of its own: which repo's file the plan weighed shows."""
    return FakeFile(TINY + b"\0" * extra)


# acme/Many-1B's GGUF repos in the order serve ranks them (the default publishers, then downloads).
CANDIDATES = [
    FakeRepo("unsloth/Many-1B-GGUF", {"Many-1B-Q6_K.gguf": sized(1000)}, _quantized("acme/Many-1B"), downloads=5),
    FakeRepo("bartowski/acme_Many-1B-GGUF", {"acme_Many-1B-Q4_K_M.gguf": sized(2000), "acme_Many-1B-Q6_K.gguf": sized(3000)}, _quantized("acme/Many-1B"), downloads=50),
    FakeRepo("lmstudio-community/Many-1B-GGUF", {"Many-1B-Q8_0.gguf": sized(4000), "Many-1B-Q4_K_M.gguf": sized(5000)}, _quantized("acme/Many-1B"), downloads=1),
    FakeRepo("stranger/Many-1B-GGUF", {"Many-1B-Q5_K_M.gguf": sized(6000)}, _quantized("acme/Many-1B"), downloads=90000),
    FakeRepo("other/Many-1B-GGUF", {"Many-1B-Q3_K_M.gguf": sized(7000), "Many-1B-Q8_0.gguf": sized(8000)}, _quantized("acme/Many-1B"), downloads=900),
]
CANDIDATE_IDS = {repo.repo_id.lower() for repo in CANDIDATES}
BARTOWSKI, STRANGER = "bartowski/acme_many-1b-gguf", "stranger/many-1b-gguf"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    model = FakeRepo("acme/Many-1B", {"model.safetensors": FakeFile(b"weights")}, ["transformers"])
    with FakeHub([model, *CANDIDATES, *standard_repos()]) as fake:
        yield fake


def env_for(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "", "HF_HUB_OFFLINE": ""}


def plan(hub: FakeHub, tmp_path: Path, *args: str) -> dict[str, tuple[str, int]]:
    """`vramsupply plan --json`, as each quant's (repo, file size)."""
    result = run_cli("plan", "--model", "acme/Many-1B", *args, "--n-gpu-layers", "0", "--json", env=env_for(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    return {c["quant"]: (c["repo"], c["file_bytes"]) for c in json.loads(result.stdout)["candidates"]}


def infos_asked(hub: FakeHub) -> list[str]:
    return [r.path.removeprefix("/api/models/").lower() for r in hub.requests if r.path.startswith("/api/models/")]


def test_the_plan_asks_every_candidate_repo_at_once_and_offers_what_it_offered_before(hub: FakeHub, tmp_path: Path) -> None:
    hub.held_together = set(CANDIDATE_IDS)

    offered = plan(hub, tmp_path)

    assert hub.most_held_at_once == len(CANDIDATES), "the candidates' descriptions were asked one after another"
    assert offered == {
        "Q6_K": ("unsloth/Many-1B-GGUF", len(TINY) + 1000),
        "Q4_K_M": ("bartowski/acme_Many-1B-GGUF", len(TINY) + 2000),
        "Q8_0": ("lmstudio-community/Many-1B-GGUF", len(TINY) + 4000),
        "Q5_K_M": ("stranger/Many-1B-GGUF", len(TINY) + 6000),
        "Q3_K_M": ("other/Many-1B-GGUF", len(TINY) + 7000),
    }
    asked = infos_asked(hub)
    assert sorted(asked) == sorted(set(asked)) and CANDIDATE_IDS <= set(asked), "each repo asked about once"


def test_a_candidate_answering_500_and_one_refusing_with_403_are_left_out_as_before(hub: FakeHub, tmp_path: Path) -> None:
    """bartowski's Q4_K_M falls to lmstudio's; stranger's Q5_K_M is not offered; the rest stand."""
    hub.held_together = set(CANDIDATE_IDS)
    hub.failing.add(BARTOWSKI)
    hub.refusing.add(STRANGER)

    offered = plan(hub, tmp_path)

    assert hub.most_held_at_once == len(CANDIDATES)
    assert offered == {
        "Q6_K": ("unsloth/Many-1B-GGUF", len(TINY) + 1000),
        "Q8_0": ("lmstudio-community/Many-1B-GGUF", len(TINY) + 4000),
        "Q4_K_M": ("lmstudio-community/Many-1B-GGUF", len(TINY) + 5000),
        "Q3_K_M": ("other/Many-1B-GGUF", len(TINY) + 7000),
    }


def test_when_every_candidate_fails_the_plan_names_the_top_ranked_ones_error(hub: FakeHub, tmp_path: Path) -> None:
    """The answers come back in any order; the error is still the one the first repo gave."""
    hub.held_together = set(CANDIDATE_IDS)
    hub.failing.update(CANDIDATE_IDS)

    result = run_cli("plan", "--model", "acme/Many-1B", "--n-gpu-layers", "0", env=env_for(hub, tmp_path))

    assert result.returncode != 0
    assert f"the Hub at {hub.url} answered HTTP 500 for unsloth/Many-1B-GGUF" in result.stderr, result.stderr
    assert hub.most_held_at_once == len(CANDIDATES)


def test_an_explicit_quant_is_resolved_from_the_same_repo_and_each_repo_asked_once(hub: FakeHub, tmp_path: Path) -> None:
    """`plan --quant` resolves the quant as serve does (one by one), then weighs the rest together."""
    offered = plan(hub, tmp_path, "--quant", "Q4_K_M")

    assert offered["Q4_K_M"] == ("bartowski/acme_Many-1B-GGUF", len(TINY) + 2000)
    assert offered["Q3_K_M"] == ("other/Many-1B-GGUF", len(TINY) + 7000)
    asked = infos_asked(hub)
    assert sorted(asked) == sorted(set(asked)), asked


def test_serves_quant_resolve_asks_only_the_repos_down_to_the_first_with_the_quant(hub: FakeHub, tmp_path: Path) -> None:
    """`models resolve --quant` resolves as `serve --quant` does: unsloth lacks Q4_K_M, bartowski
    has it, and the three repos ranked below are not asked about."""
    result = run_cli("models", "resolve", "acme/Many-1B", "--quant", "Q4_K_M", "--json", env=env_for(hub, tmp_path))

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["repo_id"] == "bartowski/acme_Many-1B-GGUF"
    assert infos_asked(hub) == ["acme/many-1b", "unsloth/many-1b-gguf", BARTOWSKI]
