"""Remove the service: its unit, and with --purge everything `service install` and the service made.

Apart from installer.py because removing has its own hazards. A system service keeps its endpoint
token, registration record and earnings ledger in its StateDirectory= (/var/lib/vramsupply) and its
downloaded models in its CacheDirectory= (/var/cache/vramsupply), and runs as the ``vramsupply``
system user install created: a purge that left them kept the provider's secrets and gigabytes of
models, and an account, behind. But an account that only shares the name (made by the provider, or
by a package) is not ours to delete, and nothing is taken from under a process still running as
that user. Every removal is one line; every failure one ServiceError line.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
from pathlib import Path

from vramsupply.service.installer import (
    MANAGER_UP,
    SERVICE_USER_COMMENT,
    Say,
    ServiceTarget,
    file_error,
    manager_state,
    read_env_file,
    run_step,
)
from vramsupply.service.unit import SERVICE_USER, UNIT_NAME, ServiceError

PROC = Path("/proc")  # where the processes of the service user are looked for


def remove_file(target: ServiceTarget, path: Path, say: Say) -> None:
    try:
        path.unlink()
    except OSError as exc:
        raise file_error("remove", path, exc, "uninstall", target.user_mode) from None
    say(f"removed {path}")


def remove_unit(target: ServiceTarget, say: Say) -> None:
    state = manager_state(target)
    running = state in MANAGER_UP
    if not target.unit_path.exists():
        say(f"{target.unit_path} is not installed")
        return
    if running:
        run_step(target.systemctl("disable", "--now", UNIT_NAME), say)
    remove_file(target, target.unit_path, say)
    if running:
        run_step(target.systemctl("daemon-reload"), say)
    else:  # no manager to ask: do what `systemctl disable` does offline, and say what it could not
        for wants in sorted(target.unit_path.parent.glob("*.wants")):
            if (wants / UNIT_NAME).is_symlink():  # dangling now: glob would not list it
                remove_file(target, wants / UNIT_NAME, say)
        if state != "offline":  # one runs, maybe, but does not answer here (--user in a shell opened with su)
            stop = shlex.join(target.systemctl("stop", UNIT_NAME))
            say(f"the service manager did not answer, so nothing was stopped: if the service runs, stop it where systemctl works ({stop})")


def uninstall(target: ServiceTarget, purge: bool, say: Say) -> None:
    """Stop and remove the unit; with ``purge`` also the env file and (system) the service's data and user."""
    remove_unit(target, say)
    if not purge:
        if target.env_file.exists():
            say(f"kept your settings in {target.env_file}; use --purge to remove them too")
        return
    if target.env_file.exists():
        read_env_file(target, "uninstall")  # refuses a file the installer did not write
        remove_file(target, target.env_file, say)
    if not target.user_mode:
        purge_service_data(target, say)


def service_account() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return None


def is_root() -> bool:
    return os.geteuid() == 0


def ours(account: pwd.struct_passwd) -> bool:
    """Made by `service install`: useradd gave it our comment (GECOS may add ``,room,phone``)."""
    return account.pw_gecos.split(",")[0] == SERVICE_USER_COMMENT


def processes_of(uid: int, proc: Path | None = None) -> list[int]:
    """The pids of the processes running as ``uid`` (each /proc/PID belongs to its process's user)."""
    pids = []
    try:
        entries = list((proc or PROC).iterdir())
    except OSError:  # no /proc (macOS): systemd, and so this service, is Linux's
        return []
    for entry in entries:
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                pids.append(int(entry.name))
        except OSError:  # the process ended while we looked
            continue
    return sorted(pids)


def purge_service_data(target: ServiceTarget, say: Say) -> None:
    """The state and cache folders, then the service user: none of them while it still runs."""
    account = service_account()
    if account is not None:
        pids = processes_of(account.pw_uid)
        if pids:
            shown = ", ".join(map(str, pids[:5])) + (", ..." if len(pids) > 5 else "")
            raise ServiceError(
                f"not removing the service's data or user: the user {SERVICE_USER!r} still runs processes ({shown}); "
                f"stop them (systemctl stop {UNIT_NAME}), then run `vramsupply service uninstall --purge` again"
            )
    for folder, what in ((target.state_dir, "endpoint token, registration and ledger"), (target.cache_dir, "downloaded models")):
        remove_folder(target, folder, what, say)
    if account is not None:
        remove_service_user(account, say)


def remove_folder(target: ServiceTarget, folder: Path, what: str, say: Say) -> None:
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise ServiceError(f"not removing {folder}: it is not the folder systemd made for the service; remove it yourself if it is not needed")
    try:
        shutil.rmtree(folder)
    except OSError as exc:
        raise file_error("remove", Path(exc.filename or folder), exc, "uninstall --purge", target.user_mode) from None
    say(f"removed {folder} (the service's {what})")


def userdel_command() -> list[str]:
    return ["userdel", SERVICE_USER]


def remove_service_user(account: pwd.struct_passwd, say: Say) -> None:
    """Only our account (see ``ours``); as root, else the command to run as root is said."""
    if not ours(account):
        say(f"kept the user {SERVICE_USER!r}: `vramsupply service install` did not create it (its comment is {account.pw_gecos!r})")
        return
    if not is_root():
        say(f"the system user {SERVICE_USER!r} stays; as root, remove it with: {shlex.join(userdel_command())}")
        return
    run_step(userdel_command(), lambda _: None)
    say(f"removed the system user {SERVICE_USER!r}")
