"""Model resolution and download: `org/model` + quant → a verified GGUF in the shared HuggingFace cache.

`prepare_model` is the entry point the rest of vramsupply uses; `resolve`, `list_cached` and
`remove_cached` back the `vramsupply models` commands.
"""

from vramsupply.hub.access import DEFAULT_TIMEOUT, HubAccess
from vramsupply.hub.cache import CachedModel, CacheStatus, list_cached, remove_cached
from vramsupply.hub.errors import (
    ChecksumMismatch,
    DownloadError,
    HubAuthError,
    HubError,
    HubOffline,
    HubUnreachable,
    InsufficientDiskSpace,
    InvalidModelSpec,
    ModelNotFound,
    QuantNotFound,
)
from vramsupply.hub.prepare import LocalModel, is_local_path, model_id_of, prepare_configured, prepare_model
from vramsupply.hub.resolve import DEFAULT_PUBLISHERS, RemoteFile, ResolvedModel, resolve
from vramsupply.hub.store import default_cache_dir

__all__ = [
    "DEFAULT_PUBLISHERS",
    "DEFAULT_TIMEOUT",
    "CacheStatus",
    "CachedModel",
    "ChecksumMismatch",
    "DownloadError",
    "HubAccess",
    "HubAuthError",
    "HubError",
    "HubOffline",
    "HubUnreachable",
    "InsufficientDiskSpace",
    "InvalidModelSpec",
    "LocalModel",
    "ModelNotFound",
    "QuantNotFound",
    "RemoteFile",
    "ResolvedModel",
    "default_cache_dir",
    "is_local_path",
    "list_cached",
    "model_id_of",
    "prepare_configured",
    "prepare_model",
    "remove_cached",
    "resolve",
]
