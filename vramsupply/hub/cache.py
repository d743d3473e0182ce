"""List and remove the models vramsupply pulled into the shared HuggingFace cache.

Only files recorded in a repo's `vramsupply.json` are touched. A blob that another snapshot
(huggingface_hub, llama.cpp) still links to stays, so does one another tool downloaded before
vramsupply adopted it (with its snapshot link), and a repo folder is deleted only once nothing
else is left in it: never with rmtree, which would take other tools' partial downloads too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from filelock import FileLock, Timeout

from vramsupply.hub.resolve import RemoteFile
from vramsupply.hub.store import Pull, RepoCache, cached_repos


class CacheStatus(str, Enum):
    verified = "verified"
    unverified = "unverified"
    incomplete = "incomplete"


@dataclass(frozen=True)
class CachedModel:
    """One pull as found on disk. `size` is the full model; `on_disk` what is there now."""

    model_id: str
    quant: str
    repo_id: str
    revision: str
    path: Path
    size: int
    on_disk: int
    status: CacheStatus
    downloading: bool = False  # a process (`serve`, `models pull`) holds the lock of one of its files


def downloading(repo: RepoCache, pull: Pull) -> bool:
    """Whether another process is downloading a file of the pull now: it holds the file's lock (the
    one huggingface_hub uses too). A lock file nobody holds is left over, not a download."""
    for file in pull.files:
        path = repo.lock(file.sha256)
        if not path.exists():
            continue
        lock = FileLock(path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        except OSError:  # a lock this user cannot open: not ours to judge
            continue
        lock.release()
    return False


def _bytes_on_disk(repo: RepoCache, file: RemoteFile) -> int:
    for path in (repo.blob(file.sha256), repo.incomplete(file.sha256)):
        if path.exists():
            return path.stat().st_size
    return 0


def _status(repo: RepoCache, pull: Pull) -> CacheStatus:
    if repo.is_complete(pull):
        return CacheStatus.verified
    if all(repo.blob(file.sha256).exists() for file in pull.files):
        return CacheStatus.unverified
    return CacheStatus.incomplete


def describe(repo: RepoCache, pull: Pull) -> CachedModel:
    return CachedModel(
        model_id=pull.model_id,
        quant=pull.quant,
        repo_id=pull.repo_id,
        revision=pull.revision,
        path=repo.snapshot_path(pull.revision, pull.files[0].path),
        size=sum(file.size for file in pull.files),
        on_disk=sum(_bytes_on_disk(repo, file) for file in pull.files),
        status=_status(repo, pull),
        downloading=downloading(repo, pull),
    )


def list_cached(cache_dir: Path, model: str | None = None) -> list[CachedModel]:
    """Every pull in the cache, or those of `model` (marketplace or GGUF repo id, any case)."""
    return [describe(repo, pull) for repo in cached_repos(cache_dir) for pull in repo.pulls() if model is None or pull.matches(model)]


def best_cached_quant(cache_dir: Path, model: str, order: Sequence[str]) -> str | None:
    """The best quant of ``model`` the cache holds in full, by ``order`` (best first; quants not in
    it come after): what a plan made offline can still choose among. An unverified one counts: the
    offline lookup hashes it once against its recorded sha256 (a copied cache has no valid markers)."""
    quants = {item.quant for item in list_cached(cache_dir, model) if item.status is not CacheStatus.incomplete}
    rank = {quant: i for i, quant in enumerate(order)}
    return min(quants, key=lambda quant: (rank.get(quant, len(rank)), quant), default=None)


def _linked_blobs(repo: RepoCache) -> set[str]:
    """Names of the blobs that snapshot symlinks still point to, whoever made them."""
    if not repo.snapshots.is_dir():
        return set()
    return {os.path.basename(os.readlink(path)) for path in repo.snapshots.rglob("*") if path.is_symlink()}


def _prune_empty_dirs(directory: Path, stop: Path) -> None:
    while directory != stop and directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
        directory = directory.parent


def _drop_dangling_refs(repo: RepoCache) -> None:
    """huggingface_hub calls a ref to a missing snapshot a corrupted cache; remove such refs."""
    if not repo.refs.is_dir():
        return
    for ref in [path for path in repo.refs.rglob("*") if path.is_file()]:
        if not (repo.snapshots / ref.read_bytes().decode("utf-8", "replace").strip()).is_dir():
            ref.unlink()
    _prune_empty_dirs(repo.refs, repo.folder)


def _remove_pull(repo: RepoCache, pull: Pull, kept: list[Pull]) -> None:
    """Unlink the pull's snapshot links and blobs, except those a kept pull or another snapshot uses."""
    kept_links = {(other.revision, file.path) for other in kept for file in other.files}
    adopted = {file.sha256 for file in pull.files if repo.adopted(file.sha256).exists()}
    for file in pull.files:
        if (pull.revision, file.path) not in kept_links and file.sha256 not in adopted:
            link = repo.snapshot_path(pull.revision, file.path)
            link.unlink(missing_ok=True)
            _prune_empty_dirs(link.parent, repo.snapshots)
    kept_blobs = {file.sha256 for other in kept for file in other.files}
    still_used = _linked_blobs(repo) | kept_blobs
    for file in pull.files:
        if file.sha256 in adopted and file.sha256 not in kept_blobs:  # another tool's blob: only our notes go
            for path in (repo.marker(file.sha256), repo.adopted(file.sha256)):
                path.unlink(missing_ok=True)
        elif file.sha256 not in still_used:
            for path in (repo.blob(file.sha256), repo.marker(file.sha256), repo.incomplete(file.sha256)):
                path.unlink(missing_ok=True)


def _remove_from_repo(repo: RepoCache, model: str | None, spare: str | None, downloads_too: bool) -> list[CachedModel]:
    pulls = repo.pulls()
    doomed = [
        pull for pull in pulls
        if (model is None or pull.matches(model)) and not (spare is not None and pull.matches(spare))
        and (downloads_too or not downloading(repo, pull))
    ]  # fmt: skip
    kept = [pull for pull in pulls if pull not in doomed]
    removed = [describe(repo, pull) for pull in doomed]
    for pull in doomed:
        _remove_pull(repo, pull, kept)
    repo.save_pulls(kept)
    _drop_dangling_refs(repo)
    if not kept:
        for lock in {repo.lock(file.sha256) for pull in doomed for file in pull.files}:
            lock.unlink(missing_ok=True)
        for folder in (repo.blobs, repo.snapshots, repo.refs, repo.locks):
            _prune_empty_tree(folder)
        _prune_empty_dirs(repo.folder, repo.cache_dir)
    return removed


def _prune_empty_tree(directory: Path) -> None:
    """Remove the empty folders under `directory`, and it if then empty; files stay, whoever wrote them."""
    if not directory.is_dir():
        return
    for root, _dirs, _files in os.walk(directory, topdown=False):
        if not any(Path(root).iterdir()):
            Path(root).rmdir()


def remove_cached(cache_dir: Path, model: str | None, spare: str | None = None, *, downloads_too: bool = False) -> list[CachedModel]:
    """Remove the pulls of `model` (marketplace or GGUF repo id, any case), or all pulls when None;
    never those of `spare` (the model a running agent serves: `models rm` keeps it), nor one being
    downloaded unless ``downloads_too`` (that download then fails)."""
    removed: list[CachedModel] = []
    for repo in cached_repos(cache_dir):
        removed.extend(_remove_from_repo(repo, model, spare, downloads_too))
    return removed
