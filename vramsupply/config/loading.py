"""Settings built from flags, environment and config file, with where each value came from.

pydantic-settings applies the precedence (``Settings.settings_customise_sources``); this module
adds what it lacks: the source of every value, so a bad one is refused in one line that names its
flag, variable or file; a warning for a ``VRAM_SUPPLY_*`` variable that is no setting; the checks
between settings that are valid alone; and each value as ``vramsupply config show`` prints it.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from vramsupply.config.file import read_config_file
from vramsupply.config.paths import CONFIG_PATH_ENV, config_path
from vramsupply.config.settings import ENV_PREFIX, SECRET_FIELDS, EngineKind, FlashAttention, Settings, env_name, setting_flag
from vramsupply.display import plain
from vramsupply.errors import ConfigError

MAX_SHOWN_VALUE = 200
"""The most characters of a refused setting's value that its error line shows (a 100 KB one filled the terminal)."""

log = logging.getLogger("vramsupply.config")  # the name the warnings have always carried


@dataclass(frozen=True)
class LoadedSettings:
    settings: Settings
    sources: dict[str, str]


_warned_env: set[str] = set()


def warn_unknown_env() -> None:
    """Name each ``VRAM_SUPPLY_*`` variable that is no setting, once a process: a typo in a
    service's env file (``VRAM_SUPPLY_PARALEL=4``) would otherwise be ignored without a word,
    as pydantic-settings ignores any unknown name. A warning, not an error as for an unknown key
    in the config file: the environment is shared with other programs and other versions."""
    known = {env_name(name) for name in Settings.model_fields} | {CONFIG_PATH_ENV}
    for name in sorted(os.environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or name in _warned_env:
            continue
        _warned_env.add(name)
        close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), sorted(k.removeprefix(ENV_PREFIX) for k in known), n=1)
        log.warning("ignoring %s: not a vramsupply setting%s", name, f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else "")


def _env_values() -> dict[str, str]:
    """Each setting given in the environment, with the variable's name as it is set: Settings
    reads names in any case (``vram_supply_port`` too), so the source must be found the same way."""
    as_set = {name.upper(): name for name in os.environ}
    return {field: as_set[env_name(field)] for field in Settings.model_fields if env_name(field) in as_set}


def _source_label(field: str, flags: dict[str, Any], env: dict[str, str], file_values: dict[str, Any], path: Path) -> str:
    if field in flags:
        return "flag --" + field.replace("_", "-")
    if field in env:
        return "env " + env[field]
    if field in file_values:
        return f"config file {path}"
    return "default"


def load_settings(flags: dict[str, Any] | None = None) -> LoadedSettings:
    """Build Settings from all sources; raise ConfigError naming the bad setting and its source."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    warn_unknown_env()
    path = config_path()
    file_values = read_config_file(path)
    env = _env_values()
    try:
        settings = Settings(**flags)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        source = _source_label(field, flags, env, file_values, path)
        value = err.get("input")
        shown = "***" if field in SECRET_FIELDS else plain(repr(str(value) if isinstance(value, Path) else value), MAX_SHOWN_VALUE)  # a flag's path as typed
        reason = err["msg"].removeprefix("Value error, ")  # pydantic's wording for our own validators' refusals
        raise ConfigError(f"invalid {field} = {shown} (from {source}): {reason}") from None
    sources = {name: _source_label(name, flags, env, file_values, path) for name in Settings.model_fields}
    check_together(settings, sources)
    return LoadedSettings(settings, sources)


def check_together(settings: Settings, sources: dict[str, str]) -> None:
    """Refuse values that are valid alone but not together, naming both settings and their sources.

    Checked on loading, so every command (serve, bench, plan, service install) refuses them the
    same way, in one line with exit 2, before anything downloads, loads or calls the network."""
    check_engine_sizes(settings, sources)
    check_kv_cache(settings, sources)
    check_engine_kind(settings, sources)
    check_endpoint(settings, sources)


def check_engine_sizes(settings: Settings, sources: dict[str, str]) -> None:
    if not settings.kv_per_slot and settings.context_length < settings.parallel:
        raise ConfigError(
            f"context_length = {settings.context_length} (from {sources['context_length']}) is smaller than parallel = "
            f"{settings.parallel} (from {sources['parallel']}): the slots share one KV cache of context_length tokens, "
            f"so raise {setting_flag('context_length')} or lower {setting_flag('parallel')}"
        )
    if settings.n_batch < settings.parallel:
        raise ConfigError(
            f"n_batch = {settings.n_batch} (from {sources['n_batch']}) is smaller than parallel = {settings.parallel} "
            f"(from {sources['parallel']}): one decode step holds the next token of every slot, "
            f"so raise {setting_flag('n_batch')} or lower {setting_flag('parallel')}"
        )


def check_kv_cache(settings: Settings, sources: dict[str, str]) -> None:
    """llama.cpp keeps a quantized V cache only inside flash attention (``gpu.options``)."""
    if settings.cache_type_v != "f16" and settings.flash_attention is FlashAttention.off:
        raise ConfigError(
            f"a {settings.cache_type_v} V cache needs flash attention: cache_type_v = {settings.cache_type_v} (from {sources['cache_type_v']}) "
            f"and flash_attention = off (from {sources['flash_attention']}) do not go together; use {setting_flag('flash_attention')} auto or on, or {setting_flag('cache_type_v')} f16"
        )


def check_engine_kind(settings: Settings, sources: dict[str, str]) -> None:
    if settings.engine is EngineKind.upstream and not settings.upstream_url:
        raise ConfigError(
            f"engine = upstream (from {sources['engine']}) needs upstream_url, the running server's base URL: "
            f"pass --upstream-url (e.g. http://127.0.0.1:11434/v1) or set {env_name('upstream_url')}"
        )


def check_endpoint(settings: Settings, sources: dict[str, str]) -> None:
    """A tunnel makes the endpoint URL: a configured one too would be ignored (or the other way round)."""
    if settings.tunnel and settings.endpoint_url:
        raise ConfigError(
            f"pass either --endpoint-url or --tunnel, not both: endpoint_url = {settings.endpoint_url} (from {sources['endpoint_url']}) "
            f"and tunnel = {settings.tunnel} (from {sources['tunnel']}); the {settings.tunnel} tunnel makes the endpoint URL"
        )


def display_value(settings: Settings, field: str) -> str:
    """A value as `config show` prints it: secrets masked, unset as '-'."""
    value = getattr(settings, field)
    if value is None:
        return "-"
    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        return "****" + secret[-4:] if len(secret) > 8 else "****"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, list):
        return ",".join(f"{item:g}" if isinstance(item, float) else str(item) for item in value)
    return str(value)
