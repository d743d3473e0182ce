"""Every option the agent has, in one Settings class.

Precedence, highest first: command-line flag > ``VRAM_SUPPLY_*`` environment variable >
TOML config file (``config.toml`` in the platformdirs user config dir, or ``VRAM_SUPPLY_CONFIG``)
> default. ``load_settings`` also reports where each effective value came from, so
``vramsupply config show`` and error messages can name the source.

Importers use this package's names; the parts behind them, each with one concern:

    paths.py     where the agent keeps its files, and the private all-or-nothing write of one
    settings.py  the schema: every field, its default and limits, what one value alone must be
    file.py      the TOML config file: unknown keys refused on reading, values merged on writing
    loading.py   the sources resolved, each value's source named, the checks between settings
"""

from vramsupply.config.file import read_config_file, write_config_values
from vramsupply.config.loading import LoadedSettings, check_together, display_value, load_settings, warn_unknown_env
from vramsupply.config.paths import (
    APP_NAME, CONFIG_PATH_ENV, config_path, data_dir, file_in_the_way, make_private_dirs, os_reason, use_data_dir, write_private_file,
)
from vramsupply.config.settings import (
    DEFAULT_DECODE_NICE,
    DEFAULT_DOWNLOAD_TIMEOUT,
    DEFAULT_GGUF_PUBLISHERS,
    DEFAULT_PARALLEL,
    DEFAULT_PARALLEL_KV_PER_SLOT,
    DEFAULT_PARALLEL_RECURRENT,
    ENV_PREFIX,
    MAX_API_KEY_CHARS,
    MAX_DRAIN_SECONDS,
    MAX_HEARTBEAT_SECONDS,
    MAX_NICE,
    MAX_PRICE,
    SECRET_FIELDS,
    EngineKind,
    FlashAttention,
    Settings,
    api_key_problem,
    env_name,
)
from vramsupply.errors import ConfigError

__all__ = [
    "DEFAULT_DECODE_NICE",
    "MAX_NICE",
    "APP_NAME",
    "CONFIG_PATH_ENV",
    "DEFAULT_DOWNLOAD_TIMEOUT",
    "DEFAULT_GGUF_PUBLISHERS",
    "DEFAULT_PARALLEL",
    "DEFAULT_PARALLEL_KV_PER_SLOT",
    "DEFAULT_PARALLEL_RECURRENT",
    "ENV_PREFIX",
    "MAX_API_KEY_CHARS",
    "MAX_DRAIN_SECONDS",
    "MAX_HEARTBEAT_SECONDS",
    "MAX_PRICE",
    "SECRET_FIELDS",
    "ConfigError",
    "EngineKind",
    "FlashAttention",
    "LoadedSettings",
    "Settings",
    "api_key_problem",
    "check_together",
    "config_path",
    "data_dir",
    "display_value",
    "env_name",
    "file_in_the_way",
    "load_settings",
    "make_private_dirs",
    "os_reason",
    "read_config_file",
    "use_data_dir",
    "warn_unknown_env",
    "write_config_values",
    "write_private_file",
]
