"""`prepare_model`: whatever the user named, end with a verified local GGUF path to load."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vramsupply.config import Settings
from vramsupply.hub.access import DEFAULT_TIMEOUT, HubAccess
from vramsupply.hub.download import GGUF_MAGIC, download_model
from vramsupply.hub.errors import HubOffline, HubUnreachable, InvalidModelSpec
from vramsupply.hub.progress import make_progress
from vramsupply.hub.quant import normalize_quant, parse_gguf_path
from vramsupply.hub.resolve import DEFAULT_PUBLISHERS, ResolvedModel, parse_repo_id, resolve
from vramsupply.hub.store import Pull, RepoCache, default_cache_dir, find_verified_pull

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalModel:
    """A model ready to load. `path` is the first part; `size` counts all parts.

    `model_id` is the marketplace identity (lowercased `org/model`, or a local file's stem);
    `repo_id`, `revision`, `filename` and `sha256` say which Hub file it is (None for local files).
    """

    path: Path
    model_id: str
    repo_id: str | None
    revision: str | None
    filename: str | None
    sha256: str | None
    quant: str | None
    size: int

    @classmethod
    def from_pull(cls, repo: RepoCache, pull: Pull | ResolvedModel) -> LocalModel:
        first = pull.files[0]
        return cls(
            path=repo.snapshot_path(pull.revision, first.path),
            model_id=pull.model_id,
            repo_id=pull.repo_id,
            revision=pull.revision,
            filename=first.path,
            sha256=first.sha256,
            quant=pull.quant,
            size=sum(file.size for file in pull.files),
        )


def is_local_path(model: str) -> bool:
    """Paths are explicit (`./x.gguf`, `/abs`, `~/x`) or end in .gguf; anything else is a Hub id."""
    return model.startswith(("./", "../", "/", "~")) or model.lower().endswith(".gguf")


def local_model_id(path: Path) -> str:
    """A local file's marketplace id: its stem, lowercased, without a split file's `-0000N-of-0000M`."""
    parsed = parse_gguf_path(path.name)
    stem = Path(parsed.prefix).name if parsed is not None and parsed.parts > 1 else path.stem
    return stem.lower()


def model_id_of(model: str) -> str:
    """The marketplace id `model` is offered under, without disk or network: for `vramsupply demand`."""
    return local_model_id(Path(model)) if is_local_path(model) else model.lower()


def local_model(model: str) -> LocalModel:
    """A local file skips the Hub; it must exist and start with the GGUF magic bytes."""
    path = Path(model).expanduser().absolute()
    if not path.is_file():
        raise InvalidModelSpec(f"model file {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        with path.open("rb") as fh:
            magic = fh.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise InvalidModelSpec(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise InvalidModelSpec(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    parsed = parse_gguf_path(path.name)
    return LocalModel(
        path=path,
        model_id=local_model_id(path),
        repo_id=None,
        revision=None,
        filename=None,
        sha256=None,
        quant=parsed.quant if parsed is not None else None,
        size=path.stat().st_size,
    )


def _cached(cache_dir: Path, model: str, quant: str, reason: str) -> LocalModel:
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
    timeout: float = DEFAULT_TIMEOUT,
    publishers: Sequence[str] = DEFAULT_PUBLISHERS,
) -> LocalModel:
    """Resolve, download and verify `model` at `quant` (or check a local .gguf path). Blocking.

    Offline (`HF_HUB_OFFLINE=1`) or with the Hub unreachable, the newest verified cached copy is
    used. `timeout` bounds Hub calls and how long a download may go without receiving a byte.
    Raises a HubError subclass with a one-line message.
    """
    if is_local_path(model):
        return local_model(model)
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
