"""The one error the tunnel raises: the tool is unknown or missing, and what to do about it."""

from __future__ import annotations

from vramsupply.errors import VramsupplyError


class TunnelError(VramsupplyError):
    """`serve --tunnel` cannot start the tunnel tool; the message says how to fix it."""
