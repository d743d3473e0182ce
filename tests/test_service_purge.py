"""`vramsupply service uninstall --purge` of the system service takes what the service left.

Found by a review: a root purge left /var/lib/vramsupply (the service's StateDirectory=: endpoint
token, registration record, earnings ledger), /var/cache/vramsupply (its CacheDirectory=: the
downloaded models) and the `vramsupply` system user `service install` created. Nothing here needs
root or systemd: the folders are temporary ones (ServiceTarget's fields), systemctl and userdel are
recording scripts on PATH, and the account is a passwd entry as pwd would return it.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from vramsupply.service import removal
from vramsupply.service.installer import ServiceTarget, useradd_command
from vramsupply.service.unit import ENV_FILE_MARKER, ServiceError


def account(gecos: str, uid: int = 997) -> pwd.struct_passwd:
    return pwd.struct_passwd(("vramsupply", "x", uid, uid, gecos, "/var/lib/vramsupply", "/usr/sbin/nologin"))


OURS = account(useradd_command()[useradd_command().index("--comment") + 1])


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A system service's files in tmp_path; systemctl (systemd offline) and userdel record their calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("systemctl", "userdel"):
        script = bin_dir / tool
        script.write_text(
            f"#!/bin/sh\nprintf '%s\\n' \"{tool} $*\" >> '{tmp_path}/calls.log'\n"
            "case \"$*\" in *is-system-running*) echo offline ;; esac\n"
            "if [ -e \"$0.fails\" ]; then read -r why < \"$0.fails\"; echo \"$why\" >&2; exit 1; fi\n"
        )
        script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(removal, "PROC", tmp_path / "proc")  # no process runs as the service user
    (tmp_path / "proc").mkdir()
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "vramsupply.service").write_text("[Service]\nUser=vramsupply\n")
    (tmp_path / "env").write_text(f"{ENV_FILE_MARKER}\nVRAM_SUPPLY_MODEL=org/model\n")
    for folder, name in (("state", "endpoint_token"), ("state", "ledger.sqlite3"), ("cache", "huggingface/hub/model.gguf")):
        (tmp_path / folder / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / name).write_text("x")
    return tmp_path


def system_target(host: Path) -> ServiceTarget:
    return ServiceTarget(user_mode=False, unit_dir=host / "units", env_file=host / "env", state_dir=host / "state", cache_dir=host / "cache")


def purge(host: Path, monkeypatch: pytest.MonkeyPatch, who: pwd.struct_passwd | None, root: bool = True) -> list[str]:
    monkeypatch.setattr(removal, "service_account", lambda: who)
    monkeypatch.setattr(removal, "is_root", lambda: root)
    said: list[str] = []
    removal.uninstall(system_target(host), True, said.append)
    return said


def calls(host: Path) -> list[str]:
    log = host / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_a_system_purge_removes_the_services_state_models_and_its_own_user(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    said = purge(host, monkeypatch, OURS)

    assert said == [
        f"removed {host}/units/vramsupply.service",
        f"removed {host}/env",
        f"removed {host}/state (the service's endpoint token, registration and ledger)",
        f"removed {host}/cache (the service's downloaded models)",
        "removed the system user 'vramsupply'",
    ]
    assert not (host / "state").exists() and not (host / "cache").exists()
    assert calls(host) == ["systemctl is-system-running", "userdel vramsupply"]


def test_without_the_unit_a_purge_still_takes_what_the_service_left(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (host / "units" / "vramsupply.service").unlink()

    said = purge(host, monkeypatch, None)

    assert said[0] == f"{host}/units/vramsupply.service is not installed"
    assert not (host / "env").exists() and not (host / "state").exists() and not (host / "cache").exists()
    assert "userdel vramsupply" not in calls(host), "no account, none to remove"


def test_an_account_that_only_shares_the_name_is_kept(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    said = purge(host, monkeypatch, account("Build robot,,,"))

    assert said[-1] == "kept the user 'vramsupply': `vramsupply service install` did not create it (its comment is 'Build robot,,,')"
    assert "userdel vramsupply" not in calls(host)


def test_our_account_with_gecos_extras_is_still_ours(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    purge(host, monkeypatch, account(f"{OURS.pw_gecos},,,"))

    assert calls(host)[-1] == "userdel vramsupply"


def test_nothing_is_removed_while_a_process_of_the_service_user_runs(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (host / "proc" / "4242").mkdir()  # /proc/PID belongs to the process's user
    running_as = account(OURS.pw_gecos, uid=os.getuid())

    with pytest.raises(ServiceError) as refused:
        purge(host, monkeypatch, running_as)

    assert str(refused.value) == (
        "not removing the service's data or user: the user 'vramsupply' still runs processes (4242); "
        "stop them (systemctl stop vramsupply.service), then run `vramsupply service uninstall --purge` again"
    )
    assert (host / "state" / "endpoint_token").exists() and (host / "cache").exists()
    assert "userdel vramsupply" not in calls(host)


def test_not_as_root_the_userdel_command_is_said_not_run(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    said = purge(host, monkeypatch, OURS, root=False)

    assert said[-1] == "the system user 'vramsupply' stays; as root, remove it with: userdel vramsupply"
    assert "userdel vramsupply" not in calls(host)


def test_a_userdel_that_fails_is_one_readable_line(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (host / "bin" / "userdel.fails").write_text("userdel: user vramsupply is currently used by process 77\n")

    with pytest.raises(ServiceError) as failed:
        purge(host, monkeypatch, OURS)

    assert str(failed.value) == "userdel vramsupply failed: userdel: user vramsupply is currently used by process 77"


def test_a_state_dir_that_is_a_link_is_refused_in_one_line_not_followed(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = host / "big-disk"
    (host / "state").rename(elsewhere)
    (host / "state").symlink_to(elsewhere)

    with pytest.raises(ServiceError) as refused:
        purge(host, monkeypatch, None)

    assert str(refused.value) == f"not removing {host}/state: it is not the folder systemd made for the service; remove it yourself if it is not needed"
    assert (elsewhere / "endpoint_token").exists()


def test_a_user_purge_leaves_the_system_services_folders_alone(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(removal, "service_account", lambda: OURS)
    target = ServiceTarget(user_mode=True, unit_dir=host / "units", env_file=host / "env", state_dir=host / "state", cache_dir=host / "cache")

    removal.uninstall(target, True, lambda _: None)

    assert (host / "state").exists() and (host / "cache").exists()
    assert "userdel vramsupply" not in calls(host)


def test_the_processes_of_a_user_are_found_in_proc() -> None:
    if not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    assert os.getpid() in removal.processes_of(os.getuid(), Path("/proc"))
