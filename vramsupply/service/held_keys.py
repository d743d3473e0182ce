"""Which service env files hold another API key than the one `vramsupply login` just saved.

``service install`` copies the saved key into the service's env file, and the environment beats
the config file: a later `login` changed nothing for the service, without a word. `login` asks
this, and warns.
"""

from __future__ import annotations

from vramsupply.service.installer import default_env_file
from vramsupply.service.unit import env_settings


def services_keeping_another_key(key: str) -> list[tuple[str, str]]:
    """The default env files (``install`` copies the saved key into them, and they beat the config
    file) that hold another API key than ``key``: each path, and the install flag for it."""
    found = []
    for user_mode in (True, False):
        path = default_env_file(user_mode)
        try:
            kept = env_settings(path.read_text(encoding="utf-8")).get("api_key")
        except (OSError, UnicodeDecodeError):  # none, or the system's, readable by root only
            continue
        if kept and kept != key:
            found.append((str(path), " --user" if user_mode else ""))
    return found
