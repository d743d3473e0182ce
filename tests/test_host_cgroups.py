"""A container limited to some CPUs' time or some memory (Docker --cpus / --memory, Kubernetes
limits, systemd quotas) gets that many threads, and caches and plans that fit in that memory.

Each test lays out what the kernel shows such a process: /proc/self/cgroup and mountinfo, and the
cgroup files under the mount point, in a temporary directory.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import TINY_MODEL

from vramsupply.engine.prompt_cache import default_budget_mib
from vramsupply.engine.threads import Threads, resolve_threads, threads_within
from vramsupply.host.cgroups import cpu_limit, memory_room
from vramsupply.host.memory import available_bytes


def fake_proc(tmp_path: Path, cgroup: str, mounts: list[tuple[str, str, str, str]]) -> Path:
    """mounts: (root, mount point below tmp_path, fstype, super options)."""
    proc = tmp_path / "proc"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(cgroup)
    lines = [f"{30 + i} 25 0:{40 + i} {root} {tmp_path / point} rw,nosuid - {fstype} {fstype} {options}"
             for i, (root, point, fstype, options) in enumerate(mounts)]
    (proc / "mountinfo").write_text("\n".join(["22 1 8:1 / / rw - ext4 /dev/sda1 rw", *lines]) + "\n")
    return proc


def write(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cgroup.procs").write_text("")
    for name, text in files.items():
        (directory / name.replace("__", ".")).write_text(text + "\n")


def test_a_docker_container_on_cgroup_v2_is_limited_to_its_cpus(tmp_path: Path) -> None:
    # docker run --cpus 2: the container sees its own group as the root of /sys/fs/cgroup.
    proc = fake_proc(tmp_path, "0::/\n", [("/", "cgroup", "cgroup2", "rw,nsdelegate")])
    write(tmp_path / "cgroup", cpu__max="200000 100000")
    assert cpu_limit(proc) == 2.0


def test_no_quota_means_no_limit(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/user.slice\n", [("/", "cgroup", "cgroup2", "rw")])
    write(tmp_path / "cgroup")
    write(tmp_path / "cgroup" / "user.slice", cpu__max="max 100000")
    assert cpu_limit(proc) is None


def test_the_tightest_of_the_group_and_its_ancestors_applies(tmp_path: Path) -> None:
    # systemd: CPUQuota=150% on the slice, none on the service within it.
    proc = fake_proc(tmp_path, "0::/vram.slice/vramsupply.service\n", [("/", "cgroup", "cgroup2", "rw")])
    write(tmp_path / "cgroup")
    write(tmp_path / "cgroup" / "vram.slice", cpu__max="150000 100000")
    write(tmp_path / "cgroup" / "vram.slice" / "vramsupply.service", cpu__max="max 100000")
    assert cpu_limit(proc) == 1.5


def test_cgroup_v1_inside_an_older_container_reads_the_mounted_group(tmp_path: Path) -> None:
    # Without a cgroup namespace the process names its group in full; the mount shows that group as its root.
    proc = fake_proc(
        tmp_path,
        "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n3:cpuset:/docker/abc\n",
        [("/docker/abc", "cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"), ("/docker/abc", "cpuset", "cgroup", "rw,cpuset")],
    )
    write(tmp_path / "cpu,cpuacct", cpu__cfs_quota_us="400000", cpu__cfs_period_us="100000")
    assert cpu_limit(proc) == 4.0


def test_cgroup_v1_seen_from_the_host_follows_the_path(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "2:cpuacct:/\n1:cpu:/batch\n0::/\n",
                     [("/", "cpu", "cgroup", "rw,cpu"), ("/", "unified", "cgroup2", "rw")])
    write(tmp_path / "cpu", cpu__cfs_quota_us="-1", cpu__cfs_period_us="100000")
    write(tmp_path / "cpu" / "batch", cpu__cfs_quota_us="50000", cpu__cfs_period_us="100000")
    write(tmp_path / "unified")
    assert cpu_limit(proc) == 0.5


def test_an_unset_v1_quota_and_unreadable_files_mean_no_limit(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "1:cpu:/\n", [("/", "cpu", "cgroup", "rw,cpu")])
    write(tmp_path / "cpu", cpu__cfs_quota_us="-1", cpu__cfs_period_us="100000")
    assert cpu_limit(proc) is None
    assert cpu_limit(tmp_path / "no-such-proc") is None
    # cpuacct and cpuset are not the cpu controller
    other = fake_proc(tmp_path / "other", "1:cpuacct,cpuset:/\n", [("/", "acct", "cgroup", "rw,cpuacct,cpuset")])
    write(tmp_path / "other" / "acct", cpu__cfs_quota_us="100000", cpu__cfs_period_us="100000")
    assert cpu_limit(other) is None


@pytest.mark.parametrize(
    ("cores", "limit", "threads"),
    [(16, None, 16), (16, 4.0, 4), (16, 1.5, 2), (16, 1.2, 1), (16, 0.5, 1), (2, 8.0, 2)],
)
def test_the_quota_rounds_to_the_nearest_whole_cpu_within_the_cores(cores: int, limit: float | None, threads: int) -> None:
    assert threads_within(cores, limit) == threads


def test_default_threads_stay_within_the_quota_and_say_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("vramsupply.engine.threads.allowed_cpus", lambda: list(range(16)))
    proc = fake_proc(tmp_path, "0::/\n", [("/", "cgroup", "cgroup2", "rw")])
    write(tmp_path / "cgroup", cpu__max="300000 100000")
    with caplog.at_level(logging.INFO, logger="vramsupply.engine.threads"):
        assert resolve_threads(None, tmp_path / "no-sysfs", proc) == Threads(3, 3)
    assert "a cgroup CPU quota of 3.00 CPUs: 3 CPU threads, not one for each of the 16 cores" in caplog.text
    # --threads is the provider's word, quota or not
    assert resolve_threads(8, tmp_path / "no-sysfs", proc) == Threads(8, 8)


V1_CPU = Path("/sys/fs/cgroup/cpu")
V1_MEMORY = Path("/sys/fs/cgroup/memory")
GIB = 1 << 30


def test_a_memory_limit_leaves_its_room_less_what_the_group_uses(tmp_path: Path) -> None:
    # docker run --memory 8g on a 128 GiB host: 3 GiB in use, 1 GiB of it page cache the kernel may drop.
    proc = fake_proc(tmp_path, "0::/\n", [("/", "cgroup", "cgroup2", "rw")])
    write(tmp_path / "cgroup", memory__max=str(8 * GIB), memory__current=str(3 * GIB),
          memory__stat=f"anon {2 * GIB}\nfile {GIB}\ninactive_file {GIB}\nactive_file 0")
    assert memory_room(proc) == 6 * GIB
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {128 * GIB // 1024} kB\nMemAvailable: {120 * GIB // 1024} kB\n")
    assert available_bytes(meminfo, proc) == 6 * GIB
    # the prompt cache's default budget: a quarter of that, where the host alone would give 8 GiB
    assert default_budget_mib(meminfo, proc) == 1536
    assert default_budget_mib(meminfo, tmp_path / "no-proc") == 8192


def test_memory_limits_of_v1_and_of_ancestors(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "5:memory:/kubepods/pod1/ctr\n", [("/", "memory", "cgroup", "rw,memory")])
    unlimited = str(9223372036854771712)
    write(tmp_path / "memory", memory__limit_in_bytes=unlimited, memory__usage_in_bytes=str(20 * GIB))
    write(tmp_path / "memory" / "kubepods", memory__limit_in_bytes=unlimited, memory__usage_in_bytes=str(10 * GIB))
    # the pod's limit binds the container below it, which sets none of its own
    write(tmp_path / "memory" / "kubepods" / "pod1", memory__limit_in_bytes=str(4 * GIB), memory__usage_in_bytes=str(GIB),
          memory__stat="cache 0\ntotal_inactive_file 0")
    write(tmp_path / "memory" / "kubepods" / "pod1" / "ctr", memory__limit_in_bytes=unlimited, memory__usage_in_bytes=str(GIB))
    assert memory_room(proc) == 3 * GIB
    # over its limit (the kernel is reclaiming): no room, never a negative size
    write(tmp_path / "memory" / "kubepods" / "pod1", memory__usage_in_bytes=str(5 * GIB))
    assert memory_room(proc) == 0


def test_without_a_memory_limit_the_host_decides(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/user.slice\n", [("/", "cgroup", "cgroup2", "rw")])
    write(tmp_path / "cgroup" / "user.slice", memory__max="max", memory__current=str(GIB))
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 16000000 kB\nMemAvailable: 4096000 kB\n")
    assert memory_room(proc) is None
    assert available_bytes(meminfo, proc) == 4096000 * 1024


def in_new_group(hierarchy: Path, settings: dict[str, str], code: str, ok_codes: tuple[int, ...] = (0,),
                 env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a new Python inside a new group of a cgroup v1 ``hierarchy``; its output.
    Skips where this machine does not let us make one (not root, or the hierarchy not writable)."""
    if not (hierarchy / "cgroup.procs").exists() or not os.access(hierarchy, os.W_OK):
        pytest.skip(f"no writable cgroup v1 hierarchy at {hierarchy}; the fake layouts above cover the parsing")
    group = hierarchy / f"vramsupply-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
    except OSError as error:
        pytest.skip(f"cannot make a cgroup here: {error}")
    try:
        for name, value in settings.items():
            (group / name).write_text(value)
        shell = f'echo $$ > {group}/cgroup.procs || exit 97; exec "$@"'
        command = ["sh", "-c", shell, "sh", sys.executable, "-c", code]
        out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
        if out.returncode == 97:
            pytest.skip(f"this machine would not move a process into {group}: {out.stderr.strip()}")
        assert out.returncode in ok_codes, out.stderr
        return out.stdout.strip()
    finally:
        group.rmdir()


def test_a_real_cgroup_cpu_quota_is_read_by_a_process_inside_it() -> None:
    """Where this machine lets us make a cgroup (root, as CI runs), a process in a quota of 1.5 CPUs reads 1.5."""
    code = "from vramsupply.host.cgroups import cpu_limit; print(cpu_limit())"
    assert in_new_group(V1_CPU, {"cpu.cfs_quota_us": "150000"}, code) == "1.5"


def test_a_real_cgroup_memory_limit_bounds_what_a_process_inside_it_may_use() -> None:
    code = "from vramsupply.host.memory import available_bytes; from vramsupply.engine.prompt_cache import default_budget_mib; print(available_bytes(), default_budget_mib())"
    available, budget = map(int, in_new_group(V1_MEMORY, {"memory.limit_in_bytes": str(GIB)}, code).split())
    # the new Python's own pages count against the limit
    assert GIB // 2 < available <= GIB
    assert budget == available // 4 // (1 << 20)


def test_vramsupply_plan_in_a_container_of_one_gib_sees_one_gib_free() -> None:
    """The provider runs ``vramsupply plan`` inside a 1 GiB memory limit on a bigger host: the CPU's
    free memory the plan reports (and fits layers into) is what the limit leaves, not the host's."""
    argv = ["vramsupply", "plan", "--model", str(TINY_MODEL), "--json"]
    code = f"import runpy, sys; sys.argv = {argv!r}; runpy.run_module('vramsupply', run_name='__main__')"
    plan = json.loads(in_new_group(V1_MEMORY, {"memory.limit_in_bytes": str(GIB)}, code))
    (cpu,) = [device for device in plan["devices"] if device["name"].startswith("CPU")]
    assert 0 < cpu["free_bytes"] <= GIB
    assert plan["chosen"]["fits"]


def test_a_container_at_its_limit_has_no_room_and_no_prompt_cache(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/\n", [("/", "cgroup", "cgroup2", "rw")])
    write(tmp_path / "cgroup", memory__max=str(2 * GIB), memory__current=str(2 * GIB), memory__stat="inactive_file 0")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemAvailable: {100 * GIB // 1024} kB\n")
    assert available_bytes(meminfo, proc) == 0
    assert default_budget_mib(meminfo, proc) == 0


def test_vramsupply_doctor_in_a_container_of_one_gib_says_the_limit_holds_its_ram() -> None:
    argv = ["vramsupply", "doctor", "--json"]
    code = f"import runpy, sys; sys.argv = {argv!r}; runpy.run_module('vramsupply', run_name='__main__')"
    limit = {"memory.limit_in_bytes": str(GIB)}
    # the RAM line is a CPU machine's: on a GPU machine, the GPUs are hidden from this run
    hidden = {"CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": "", "GGML_VK_VISIBLE_DEVICES": ""}
    output = in_new_group(V1_MEMORY, limit, code, ok_codes=(0, 1), env=hidden)
    checks = {c["name"]: c for c in json.loads(output)["checks"]}
    detail = str(checks["gpu memory"]["detail"])
    assert detail.startswith("no GPU in use: ")
    assert detail.endswith("RAM available for the model (held to that by a cgroup memory limit)")
