"""Default CPU threads: the physical cores, for decoding and prompts alike (as llama-server); --threads overrides."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

from conftest import TINY_MODEL
from vramsupply.engine import EngineOptions
from vramsupply.engine.model import Model, create_context
from vramsupply.engine.threads import Threads, allowed_cpus, cpu_counts, resolve_threads


def fake_sysfs(root: Path, siblings: dict[int, str]) -> Path:
    for cpu, core in siblings.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(core + "\n")
    return root


def test_hyperthreads_of_one_core_count_as_one_physical_core(tmp_path: Path) -> None:
    # 2 cores with 2 hyper-threads each: cpu0/cpu2 share core 0, cpu1/cpu3 share core 1.
    sysfs = fake_sysfs(tmp_path, {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
    assert cpu_counts([0, 1, 2, 3], sysfs) == (2, 4)


def test_only_the_cpus_the_process_may_use_are_counted(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
    # Pinned (taskset / cpuset) to the two threads of one core.
    assert cpu_counts([0, 2], sysfs) == (1, 2)
    assert cpu_counts([0, 1], sysfs) == (2, 2)


def test_without_topology_every_cpu_is_its_own_core(tmp_path: Path) -> None:
    assert cpu_counts([0, 1, 2], tmp_path / "missing") == (3, 3)
    assert cpu_counts([], tmp_path / "missing") == (1, 1)


def test_explicit_threads_are_used_for_decode_and_prompts() -> None:
    assert resolve_threads(3) == Threads(decode=3, batch=3)


def test_more_threads_than_cpus_are_used_as_asked_but_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    _, logical = cpu_counts(allowed_cpus())
    assert resolve_threads(logical) == Threads(logical, logical) and not caplog.records
    assert resolve_threads(logical * 50) == Threads(logical * 50, logical * 50)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and f"more than the {logical} CPUs" in caplog.records[0].getMessage()


def test_default_threads_follow_this_machine() -> None:
    physical, logical = cpu_counts(allowed_cpus())
    assert resolve_threads(None) == Threads(decode=physical, batch=physical)
    assert 1 <= physical <= logical == len(allowed_cpus())


def test_with_hyperthreads_steps_of_several_streams_get_one_thread_a_core_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp runs every step of more than one token (several streams' decode, not only
    prompts) with the batch threads; a second thread on a core only contends for its memory."""
    sysfs = fake_sysfs(tmp_path, {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
    monkeypatch.setattr("vramsupply.engine.threads.allowed_cpus", lambda: [0, 1, 2, 3])
    assert resolve_threads(None, sysfs) == Threads(decode=2, batch=2)


@pytest.mark.parametrize("requested", [None, 1])
def test_the_context_gets_the_resolved_threads_not_llama_cpps_default_of_4(requested: int | None) -> None:
    model = Model.load(TINY_MODEL, 0)
    try:
        context = create_context(model, EngineOptions(model_path=TINY_MODEL, n_ctx=64, parallel=1, threads=requested))
        try:
            expected = resolve_threads(requested)
            assert llama_cpp.llama_n_threads(context.ctx) == expected.decode
            assert llama_cpp.llama_n_threads_batch(context.ctx) == expected.batch
        finally:
            context.close()
    finally:
        model.close()
