"""`prepare_model`: whatever the user named, end with a verified local GGUF path to load."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from vramsupply.config import DEFAULT_DOWNLOAD_TIMEOUT, DEFAULT_GGUF_PUBLISHERS, Settings
from vramsupply.hub.errors import HubOffline, HubUnreachable
from vramsupply.hub.local import LocalModel, is_local_path, local_model, model_id_of

__all__ = ["LocalModel", "is_local_path", "model_id_of", "prepare_configured", "prepare_model"]
from vramsupply.hub.quant import normalize_quant

log = logging.getLogger(__name__)


def _cached(cache_dir: Path, model: str, quant: str, reason: str) -> LocalModel:
    from vramsupply.hub.store import find_verified_pull

    found = find_verified_pull(cache_dir, model, quant)
    if found is None:
        raise HubOffline(
            f"{reason}, and {cache_dir} holds no verified copy of {model} {normalize_quant(quant)}; "
            f"download it once while online (vramsupply models pull {model} --quant {quant}) or pass a local .gguf path"
        )
    repo, pull = found
    log.info("using the verified cached copy of %s %s from %s@%s (%s)", pull.model_id, pull.quant, pull.repo_id, pull.revision, reason)
    return LocalModel.from_pull(repo, pull)


def prepare_model(
    model: str,
    quant: str,
    *,
    cache_dir: Path | None = None,
    progress: bool = False,
    timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
    publishers: Sequence[str] = DEFAULT_GGUF_PUBLISHERS,
) -> LocalModel:
    """Resolve, download and verify `model` at `quant` (or check a local .gguf path: one in a Hub
    cache is the Hub model it is, hub/identity.py). Blocking.

    Offline (`HF_HUB_OFFLINE=1`) or with the Hub unreachable, the newest verified cached copy is
    used. `timeout` bounds Hub calls and how long a download may go without receiving a byte.
    Raises a HubError subclass with a one-line message.
    """
    if is_local_path(model):
        return local_model(model, timeout)
    return _from_hub(model, quant, cache_dir, progress, timeout, publishers)


def _from_hub(model: str, quant: str, cache_dir: Path | None, progress: bool, timeout: float, publishers: Sequence[str]) -> LocalModel:
    # Imported here, not at the top: serving a local file never needs huggingface_hub (local.py).
    from vramsupply.hub.access import HubAccess
    from vramsupply.hub.download import download_model
    from vramsupply.hub.progress import make_progress
    from vramsupply.hub.resolve import parse_repo_id, resolve
    from vramsupply.hub.store import RepoCache, default_cache_dir

    parse_repo_id(model)
    cache_root = cache_dir or default_cache_dir()
    access = HubAccess.from_env(timeout)
    if access.offline:
        return _cached(cache_root, model, quant, "HF_HUB_OFFLINE is set")
    try:
        resolved = resolve(model, quant, access=access, publishers=publishers)
    except HubUnreachable as exc:
        return _cached(cache_root, model, quant, str(exc))
    log.info("%s %s resolved to %s@%s: %s", resolved.model_id, resolved.quant, resolved.repo_id, resolved.revision, resolved.primary.path)
    repo = RepoCache(cache_root, resolved.repo_id)
    download_model(resolved, repo, access, make_progress(progress))
    return LocalModel.from_pull(repo, resolved)


def prepare_configured(model: str, settings: Settings, *, progress: bool) -> LocalModel:
    """`prepare_model` with the cache dir, timeout and publisher order from Settings (quant: settings.quant)."""
    return prepare_model(
        model,
        settings.quant,
        cache_dir=settings.cache_dir,
        progress=progress,
        timeout=settings.download_timeout,
        publishers=settings.gguf_publishers,
    )
