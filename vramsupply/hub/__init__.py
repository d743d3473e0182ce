"""Model resolution and download: `org/model` + quant → a verified GGUF in the shared HuggingFace cache.

`prepare_model` is the entry point the rest of vramsupply uses; `resolve.resolve`, `list_cached`
and `remove_cached` back the `vramsupply models` commands.

Names are loaded from their modules on first use (``vramsupply.lazy``): a server of a local file
imports only `LocalModel` and friends (`local.py`), never huggingface_hub and its HTTP stack.
"""

from __future__ import annotations

from vramsupply.lazy import lazy_names

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

__getattr__, __dir__, __all__ = lazy_names(__name__, _HOMES)
