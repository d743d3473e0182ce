"""Running the agent as a systemd service: the unit, its env file, and the sd_notify protocol."""

from vramsupply.service.notify import SystemdNotifier

__all__ = ["SystemdNotifier"]
