"""``~`` in paths a person types, expanded as the shell does.

``Path.expanduser`` raises ``RuntimeError`` for ``~name`` when no user ``name`` exists: a typo in
``--model ~nouser/m.gguf`` or ``VRAM_SUPPLY_CACHE_DIR`` became a Python traceback in nine commands.
``expand_user`` says it in one line instead (a ``ConfigError``, exit 2; a ``ValueError`` too, so a
setting's validator names the setting and where it came from). Taking the word as written, as the
shell does, would have had ``service install`` create a folder named ``~nouser`` where it ran.
"""

from __future__ import annotations

from pathlib import Path

from vramsupply.errors import ConfigError


class UnknownUser(ConfigError, ValueError):
    """``~name`` names no user of this machine."""


def expand_user(path: str | Path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded; ``UnknownUser`` where that user is unknown."""
    written = Path(path)
    try:
        return written.expanduser()
    except RuntimeError:
        user = written.parts[0]
        raise UnknownUser(f"{written}: there is no user {user[1:]!r} on this machine for {user} to stand for") from None
