"""The TOML config file: read strictly, written privately and by merging.

Apart from ``loading.py`` because ``vramsupply login`` and ``config set`` write it without loading
any settings. Reading refuses an unknown key: the file is the user's own, so a typo there is an
error, where one in the shared environment only earns ``loading.py``'s warning.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

import tomli_w

from vramsupply.config.paths import write_private_file
from vramsupply.config.settings import Settings
from vramsupply.errors import ConfigError


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    if not path.is_file() and not path.is_dir():  # a FIFO would block the read forever; a directory says so below
        raise ConfigError(f"cannot read config file {path}: not a regular file")
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))  # TOML is UTF-8, whatever the locale
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config file {path}: it is not UTF-8 text (byte {exc.start})") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    unknown = sorted(set(data) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r} in config file {path}")
    return data


def write_config_values(path: Path, values: dict[str, Any]) -> None:
    """Merge ``values`` into the config file, which is created (and kept) private: mode 0600."""
    data = read_config_file(path)
    data.update(values)
    try:
        write_private_file(path, tomli_w.dumps(data))
    except OSError as exc:
        raise ConfigError(f"cannot write config file {path}: {exc.strerror or exc}") from None
