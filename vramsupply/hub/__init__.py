"""Model resolution and download: `org/model` + quant → a verified GGUF in the shared HuggingFace cache.

`prepare_model` is the entry point the rest of vramsupply uses; `resolve.resolve`, `list_cached`
and `remove_cached` back the `vramsupply models` commands.

Names are loaded from their modules on first use (PEP 562): a server of a local file imports
only `LocalModel` and friends (`local.py`), never huggingface_hub and its HTTP stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "vramsupply.hub.access": ("DEFAULT_TIMEOUT", "HubAccess"),
    "vramsupply.hub.cache": ("CachedModel", "CacheStatus", "list_cached", "remove_cached"),
    "vramsupply.hub.errors": (
        "ChecksumMismatch",
        "DownloadError",
        "HubAuthError",
        "HubError",
        "HubOffline",
        "HubUnreachable",
        "InsufficientDiskSpace",
        "InvalidModelSpec",
        "ModelFileError",
        "ModelNotFound",
        "QuantNotFound",
    ),
    "vramsupply.hub.local": ("LocalModel", "is_local_path", "model_id_of"),
    "vramsupply.hub.prepare": ("prepare_configured", "prepare_model"),
    # `resolve` the function is imported from its module: `vramsupply.hub.resolve` is that module.
    "vramsupply.hub.resolve": ("DEFAULT_PUBLISHERS", "RemoteFile", "ResolvedModel"),
    "vramsupply.hub.store": ("default_cache_dir",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_HOME_OF)


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

