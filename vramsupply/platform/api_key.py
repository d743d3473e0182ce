"""Where the running agent's API key came from, and how a rejected one is replaced without a restart.

"API key rejected — run `vramsupply login`" must be something a provider can act on while the agent
serves. What works depends on where the key came from, found the way the settings find it (a flag
beats the environment, which beats the config file):

- the config file (what `vramsupply login` writes): while the key is rejected the lifecycle looks
  at the file's modification stamp every ``api_key.CHECK_SECONDS`` (a ``stat``, nothing more) and
  before each retry, and registers with the key in it as soon as that differs. No restart;
- the environment (``VRAM_SUPPLY_API_KEY``, the service's env file): a running process's
  environment cannot change, so the only way is to set it and restart the agent; the message says
  where and how;
- a flag (``--api-key``): the same, with the flag.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from vramsupply.config import ConfigError, config_path, env_name, read_config_file
from vramsupply.config.paths import FileStamp, file_stamp
from vramsupply.config.settings import api_key_problem
from vramsupply.platform.client import API_KEY_REJECTED
from vramsupply.platform.retry_wait import STATUS_POLL_SECONDS

CHECK_SECONDS = STATUS_POLL_SECONDS
"""How often a rejected agent looks at the config file's stamp (its wait between retries polls at this pace)."""
PICKUP_SECONDS = 5
"""What the message promises: the file is looked at every ``CHECK_SECONDS``, then one register call."""
SERVICE_RESTART = "service: systemctl restart vramsupply, or systemctl --user restart vramsupply for a --user service"


def _service_env_files() -> str:
    from vramsupply.service.installer import SYSTEM_ENV_FILE, default_env_file  # only when a key from the environment is refused

    return f"{SYSTEM_ENV_FILE} for the system service, {default_env_file(user_mode=True)} for a --user one"


def api_key_variable() -> str | None:
    """The ``VRAM_SUPPLY_API_KEY`` variable set in this environment (any case, as the settings
    match it), when it holds anything; it beats the key `login` saves."""
    return next((name for name in os.environ if name.upper() == env_name("api_key") and os.environ[name].strip()), None)


@dataclass
class ApiKeySource:
    """``kind``: "file", "env" or "flag"; ``where``: the config file's path or the variable's name."""

    kind: str
    where: str
    _key: str | None = field(default=None, repr=False)  # the key in use
    _stamp: FileStamp | None = field(default=None, repr=False)

    @classmethod
    def of(cls, key: str | None) -> ApiKeySource:
        """Where ``key`` came from: the environment wins over the file, a flag over both."""
        named = api_key_variable()
        if named is not None and os.environ[named] == key:
            return cls("env", named, key)
        path = config_path()
        if key is not None and _file_key(path) == key:
            return cls("file", str(path), key, file_stamp(path))
        return cls("flag", "--api-key", key)

    def rejected(self) -> str:
        """The rejection, with what works for where the key came from."""
        if self.kind == "file":
            return f"{API_KEY_REJECTED}; the running agent picks the new key up within {PICKUP_SECONDS} s"
        if self.kind == "env":
            return (
                f"API key rejected — set {self.where} in the agent's environment ({_service_env_files()}) "
                f"and restart the agent ({SERVICE_RESTART})"
            )
        return "API key rejected — restart the agent with the new key (--api-key), or run `vramsupply login` and restart it without --api-key"

    def rejected_once(self) -> str:
        """The rejection for a command that calls the platform once (``demand``, ``rails``): `login`
        helps only where the key came from the config file, which the environment beats."""
        if self.kind == "env":
            return (
                f"API key rejected — it comes from {self.where} in the environment, which beats the key "
                f"`vramsupply login` saves: set a valid key there, or unset it"
            )
        if self.kind == "flag":
            return "API key rejected — pass a valid one"
        return API_KEY_REJECTED

    def file_changed(self) -> bool:
        """Whether the config file was written since it was last read (a ``stat``; never for another source)."""
        return self.kind == "file" and file_stamp(Path(self.where)) != self._stamp

    def new_key(self) -> str | None:
        """The key in the config file when it differs from the key in use and is usable (it is in
        use from now on); None otherwise."""
        if self.kind != "file":
            return None
        path = Path(self.where)
        self._stamp = file_stamp(path)
        key = _file_key(path)
        if key is None or key == self._key or api_key_problem(key) is not None:
            return None
        self._key = key
        return key


def _file_key(path: Path) -> str | None:
    """The config file's api_key; None when it has none or cannot be read right now (being written, broken)."""
    try:
        value = read_config_file(path).get("api_key")
    except (ConfigError, OSError):
        return None
    return value if isinstance(value, str) and value.strip() else None

