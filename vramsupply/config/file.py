"""The TOML config file: read strictly, written privately and in place.

Apart from ``loading.py`` because ``vramsupply login`` and ``config set`` write it without loading
any settings. Reading refuses an unknown key: the file is the user's own, so a typo there is an
error, where one in the shared environment only earns ``loading.py``'s warning. For the same
reason a file named by ``VRAM_SUPPLY_CONFIG`` that is not there is an error: a typo in a service's
env file would otherwise run the agent on defaults without a word (the default path, never
created, simply holds no settings yet). Writing edits the values in place with tomlkit, so the
user's comments, blank lines and order survive a ``login``; tomli-w rewrote the file bare.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from vramsupply.userpath import expand_user
from vramsupply.config.paths import CONFIG_PATH_ENV, default_config_path, os_reason, write_private_file
from vramsupply.config.settings import Settings
from vramsupply.errors import ConfigError, VramsupplyError


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in the config file at ``path``; none when it is the default one, not yet created."""
    text = _config_text(path)
    if text is None:
        _refuse_a_named_file_that_is_missing(path)
        return {}
    return _parsed(path, text)


def write_config_values(path: Path, values: dict[str, Any]) -> None:
    """Set ``values`` in the config file, keeping everything else in it as it was (comments, blank
    lines, order); it is created (and kept) private: mode 0600. A file named by
    ``VRAM_SUPPLY_CONFIG`` may not exist yet: this is how it comes to."""
    import tomlkit  # here: only `login` writes the file, and whatever serves never needs it

    text = _config_text(path)
    if text is not None:
        _parsed(path, text)  # an unknown key or broken TOML is refused before anything is written
    document = tomlkit.parse(text or "")
    for key, value in values.items():
        document[key] = value
    try:
        write_private_file(path, tomlkit.dumps(document))
    except OSError as exc:
        raise ConfigUnwritable(f"cannot write config file {path}: {os_reason(exc, path)}") from None


class ConfigUnwritable(VramsupplyError):
    """The config file cannot be written (permissions, a full disk): the machine's state, exit 1,
    not a setting to change (``ConfigError``, exit 2)."""


def _config_text(path: Path) -> str | None:
    """The file's text, or None when there is no file (nor any where a link leads)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:  # a link loop, a folder on the way we may not enter: not "no file"
        raise ConfigError(f"cannot read config file {path}: {os_reason(exc, path)}") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"cannot read config file {path}: it is a directory")
    if not stat.S_ISREG(mode):  # a FIFO would block the read forever
        raise ConfigError(f"cannot read config file {path}: not a regular file")
    try:
        return path.read_bytes().decode("utf-8")  # TOML is UTF-8, whatever the locale
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config file {path}: it is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {os_reason(exc, path)}") from None


def _parsed(path: Path, text: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    unknown = sorted(set(data) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r} in config file {path}")
    return data


def _refuse_a_named_file_that_is_missing(path: Path) -> None:
    """An error when ``VRAM_SUPPLY_CONFIG`` names ``path`` and it is not the default path (which
    a user who has not run ``login`` yet has no file at: nothing to say then)."""
    named = os.environ.get(CONFIG_PATH_ENV)
    default = default_config_path()
    if not named or not _same_path(expand_user(named), path) or _same_path(path, default):
        return
    raise ConfigError(
        f"config file {path} (named by {CONFIG_PATH_ENV}) does not exist: correct the path, create the file "
        f"(`vramsupply login` writes one there), or unset {CONFIG_PATH_ENV} to use {default}"
    )


def _same_path(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)
