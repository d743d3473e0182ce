"""The endpoint token: the secret the platform presents when it routes a buyer's request to us.

A configured ``endpoint_token`` wins. Otherwise one is generated once and kept in the data dir
(mode 0600), so restarts register the same token and a running agent's token never changes.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from vramsupply.config import data_dir, write_private_file
from vramsupply.errors import VramsupplyError

TOKEN_FILE_NAME = "endpoint_token"


class EndpointTokenError(VramsupplyError):
    """The generated token's file cannot be read back or written (a full or read-only data dir,
    a damaged file): a fault of the machine, exit 1, not an invalid setting (exit 2)."""


def default_token_path() -> Path:
    return data_dir() / TOKEN_FILE_NAME


def resolve_endpoint_token(configured: str | None, path: Path | None = None) -> str:
    """``configured`` (the endpoint_token setting) if given, else the stored token, else a new one."""
    if configured is not None:
        return configured
    path = path or default_token_path()
    try:
        stored = path.read_bytes().decode("utf-8").strip()
    except FileNotFoundError:
        stored = ""
    except UnicodeDecodeError:
        raise EndpointTokenError(f"the endpoint token file {path} is damaged (not the token this agent wrote): delete it to have a new one made") from None
    except OSError as exc:
        raise EndpointTokenError(f"cannot read the endpoint token file {path}: {exc.strerror or exc}") from None
    if stored:
        return stored
    token = "vst-" + secrets.token_urlsafe(32)
    try:
        write_private_file(path, token + "\n")
    except OSError as exc:
        raise EndpointTokenError(
            f"cannot keep the endpoint token in {path}: {exc.strerror or exc}; make its folder writable, or set VRAM_SUPPLY_ENDPOINT_TOKEN"
        ) from None
    return token
