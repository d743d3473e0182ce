"""`vramsupply service ...`: the systemd unit (install, uninstall, status, logs)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import ENV_FILE_OPTION, UNIT_DIR_OPTION, USER_UNIT_OPTION, service_app


@service_app.command("install")
def service_install(user: bool = USER_UNIT_OPTION, unit_dir: Optional[Path] = UNIT_DIR_OPTION, env_file: Optional[Path] = ENV_FILE_OPTION) -> None:
    """Write the systemd unit and an env file (0600) from the current settings, then enable and start it."""
    from vramsupply.service.installer import install, service_target

    install(service_target(user, unit_dir, env_file), typer.echo)


@service_app.command("uninstall")
def service_uninstall(
    user: bool = USER_UNIT_OPTION,
    unit_dir: Optional[Path] = UNIT_DIR_OPTION,
    env_file: Optional[Path] = ENV_FILE_OPTION,
    purge: bool = typer.Option(False, "--purge", help="Also remove the env file with your settings; for the system service also its data (/var/lib/vramsupply), downloaded models (/var/cache/vramsupply) and the vramsupply user it ran as."),
) -> None:
    """Stop and disable the service and remove its unit (the env file stays unless --purge)."""
    from vramsupply.service.installer import service_target
    from vramsupply.service.removal import uninstall

    uninstall(service_target(user, unit_dir, env_file), purge, typer.echo)


@service_app.command("status")
def service_status(user: bool = USER_UNIT_OPTION) -> None:
    """Show the service's state (systemctl status)."""
    from vramsupply.service.installer import service_target, show, status_command

    target = service_target(user)
    raise typer.Exit(show(target, status_command(target), "status"))


@service_app.command("logs")
def service_logs(
    user: bool = USER_UNIT_OPTION,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    lines: Optional[int] = typer.Option(None, "--lines", "-n", min=0, help="Show only the last N lines."),
) -> None:
    """Show the service's log (journalctl)."""
    from vramsupply.service.installer import logs_command, service_target, show

    target = service_target(user)
    raise typer.Exit(show(target, logs_command(target, follow, lines), "log"))
