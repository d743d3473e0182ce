"""A local path that is a Hub download: the repo, commit, file, quant and marketplace id it is.

`serve --model ~/.cache/huggingface/hub/models--acme--Widget-7B-GGUF/snapshots/<commit>/Widget-7B-Q4_K_M.gguf`
loads the very file `serve --model acme/Widget-7B --quant Q4_K_M` loads. Offered under the file's
stem (`widget-7b-q4_k_m`), buyers asking for the Hub id did not find it and the registration named
no repo; so a file in a Hub cache (huggingface_hub's layout, see store.py) is offered as the
download it is:

- where vramsupply pulled it, its record (vramsupply.json) says the model id and quant it was
  pulled as; of several pulls of the file (`acme/Gizmo-1B` and `ggml-org/Gizmo-1B-GGUF`), the
  newest wins, as offline serving picks the newest;
- else (huggingface_hub, `hf download` or llama.cpp fetched it) the folders name the repo and the
  commit, the file's name its quant; the id is the one another file of the repo was pulled as,
  else the one `serve --model <repo>` takes from the Hub (the repo's base model), asked once
  unless HF_HUB_OFFLINE is set or the caller may not wait on the network, else the repo id.

A path reached through a symbolic link (`~/models/x.gguf` → a snapshot, or a blob itself) is found
by the blob it resolves to. A sha256 is claimed only for a blob vramsupply verified (a matching
`.verified` marker): the registration's sha256 vouches for the bytes, and hashing a 40 GB file
before serving a local path is more than the provider asked for. Anything else (a path outside a
cache, folders that only look like one) stays a plain local file.

Imported only for a path that may lie in a cache: this imports huggingface_hub (store → resolve).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vramsupply.hub.errors import HubError
from vramsupply.hub.local import CACHED_REPO_PREFIX as REPO_PREFIX
from vramsupply.hub.quant import parse_gguf_path
from vramsupply.hub.resolve import RemoteFile
from vramsupply.hub.store import Pull, RepoCache

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnapshotFile:
    """`<cache>/models--<org>--<name>/snapshots/<revision>/<filename>`."""

    repo: RepoCache
    revision: str
    filename: str


@dataclass(frozen=True)
class HubIdentity:
    """What the marketplace is told of a cached file; `size` counts every part where a record lists them."""

    model_id: str
    repo_id: str
    revision: str
    filename: str
    sha256: str | None
    quant: str | None
    size: int | None


def _repo_of(folder: Path) -> RepoCache | None:
    org, sep, name = folder.name.removeprefix(REPO_PREFIX).partition("--")
    if not folder.name.startswith(REPO_PREFIX) or not (sep and org and name):
        return None
    return RepoCache(folder.parent, f"{org}/{name}")


def _in_snapshot(path: Path) -> SnapshotFile | None:
    """The innermost `models--*/snapshots/<commit>/...` the (normalised, unresolved) path lies in."""
    parts = path.parts
    for index in reversed(range(len(parts) - 3)):
        if parts[index].startswith(REPO_PREFIX) and parts[index + 1] == "snapshots" and _COMMIT.match(parts[index + 2]):
            repo = _repo_of(Path(*parts[: index + 1]))
            if repo is not None:
                return SnapshotFile(repo, parts[index + 2], "/".join(parts[index + 3 :]))
    return None


def _linking_to(blob: Path) -> SnapshotFile | None:
    """The snapshot file that links to ``blob`` (resolved): one a pull recorded first, else the first by name."""
    if blob.parent.name != "blobs" or not _SHA256.match(blob.name):
        return None
    repo = _repo_of(blob.parent.parent)
    if repo is None or not repo.snapshots.is_dir():
        return None
    links = sorted(link for link in repo.snapshots.rglob("*") if link.is_symlink() and link.resolve() == blob)
    found = [snapshot for snapshot in map(_in_snapshot, links) if snapshot is not None]
    recorded = {(pull.revision, file.path) for pull in repo.pulls() for file in pull.files}
    return next((snapshot for snapshot in found if (snapshot.revision, snapshot.filename) in recorded), found[0] if found else None)


def snapshot_file(path: Path) -> SnapshotFile | None:
    """Where the absolute ``path`` lies in a Hub cache, if it does."""
    return _in_snapshot(Path(os.path.normpath(path))) or _linking_to(path.resolve())


def hub_identity(path: Path, timeout: float | None) -> HubIdentity | None:
    """The Hub identity of a cached file, or None outside a cache; ``timeout`` bounds the one Hub
    question (the repo's base model) asked when no record names the id; None: ask nothing."""
    found = snapshot_file(path)
    if found is None:
        return None
    pulls = found.repo.pulls()
    own = [pull for pull in pulls if pull.revision == found.revision and any(file.path == found.filename for file in pull.files)]
    if own:
        return _recorded(found, max(own, key=lambda pull: pull.pulled_at))
    parsed = parse_gguf_path(found.filename)
    return HubIdentity(
        model_id=max(pulls, key=lambda pull: pull.pulled_at).model_id if pulls else _asked_model_id(found.repo.repo_id, timeout),
        repo_id=found.repo.repo_id,
        revision=found.revision,
        filename=found.filename,
        sha256=_verified_sha256(found),
        quant=parsed.quant if parsed is not None else None,
        size=None,
    )


def _recorded(found: SnapshotFile, pull: Pull) -> HubIdentity:
    file = next(file for file in pull.files if file.path == found.filename)
    return HubIdentity(
        model_id=pull.model_id,
        repo_id=pull.repo_id,
        revision=pull.revision,
        filename=found.filename,
        sha256=file.sha256 if found.repo.is_verified(file) else None,
        quant=pull.quant,
        size=sum(part.size for part in pull.files),
    )


def _verified_sha256(found: SnapshotFile) -> str | None:
    """The sha256 the snapshot link's blob is named by, where vramsupply's marker vouches for it."""
    blob = found.repo.snapshot_path(found.revision, found.filename).resolve()
    if blob.parent != found.repo.blobs.resolve() or not _SHA256.match(blob.name):
        return None
    file = RemoteFile(path=found.filename, size=blob.stat().st_size, sha256=blob.name)
    return file.sha256 if found.repo.is_verified(file) else None


def _asked_model_id(repo_id: str, timeout: float | None) -> str:
    """The id `serve --model <repo>` gives: the Hub's base model of the repo; offline, or where the
    Hub cannot say, the repo id (lowercased, as every marketplace id)."""
    from vramsupply.hub.access import HubAccess
    from vramsupply.hub.resolve import Resolver, canonical_id

    if timeout is None:
        return repo_id.lower()
    access = HubAccess.from_env(timeout)
    if access.offline:
        log.info("HF_HUB_OFFLINE is set: %s is offered under its repo id, not its base model's", repo_id)
        return repo_id.lower()
    try:
        info = Resolver(access, ()).repo_info(repo_id)
    except HubError as exc:
        log.warning("offering %s under its repo id: the Hub could not name its base model (%s)", repo_id, exc)
        return repo_id.lower()
    return canonical_id(info) if info is not None else repo_id.lower()
