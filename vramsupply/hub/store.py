"""The shared HuggingFace cache layout, plus the few files vramsupply adds to it.

Same layout as huggingface_hub and llama.cpp, so `hf`, llama.cpp and vramsupply share downloads:

    <cache>/models--<org>--<repo>/blobs/<sha256>             the bytes, named by the LFS sha256
    <cache>/models--<org>--<repo>/snapshots/<commit>/<path>  relative symlink to the blob
    <cache>/models--<org>--<repo>/refs/main                  commit that `main` resolved to

vramsupply's additions, which those tools ignore:

    blobs/<sha256>.incomplete  a partial download, kept across restarts and resumed with Range
                               (huggingface_hub 2.x writes `<etag>.<random>.incomplete` and deletes it)
    blobs/<sha256>.verified    "this blob hashed to its name": JSON with the blob's size and mtime_ns,
                               so restarts skip rehashing and a blob rewritten since is hashed again;
                               offline, a blob whose marker does not match (a cache copied with
                               `cp -r` has new mtimes) is hashed once against the record's sha256
    blobs/<sha256>.adopted     the blob was there before vramsupply pulled it (another tool downloaded
                               it): `models rm` leaves it and its snapshot link alone
    vramsupply.json            what vramsupply pulled into this repo (model id, quant, commit, files),
                               for offline use, `models list` and `models rm`
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from vramsupply.userpath import expand_user
from vramsupply.config.paths import write_private_file
from vramsupply.hub.quant import normalize_quant
from vramsupply.hub.resolve import RemoteFile, ResolvedModel

RECORD_NAME = "vramsupply.json"
HASH_BLOCK = 8 << 20

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """huggingface_hub's cache location, read from the environment now rather than at import."""
    env = os.environ
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(variable):
            return expand_user(env[variable])
    if env.get("HF_HOME"):
        return expand_user(env["HF_HOME"]) / "hub"
    return expand_user(env.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface" / "hub"


def repo_folder_name(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


class Pull(BaseModel):
    """One `model_id` + `quant` pulled from `repo_id` at `revision`."""

    model_id: str
    quant: str
    repo_id: str
    revision: str = Field(pattern=r"^[0-9a-f]{40}$")
    files: tuple[RemoteFile, ...] = Field(min_length=1)
    pulled_at: datetime

    @classmethod
    def of(cls, resolved: ResolvedModel) -> Pull:
        return cls(
            model_id=resolved.model_id,
            quant=resolved.quant,
            repo_id=resolved.repo_id,
            revision=resolved.revision,
            files=resolved.files,
            pulled_at=datetime.now(timezone.utc),
        )

    def key(self) -> tuple[str, str, str]:
        return (self.model_id, self.quant, self.revision)

    def matches(self, model: str) -> bool:
        """`models rm` and offline lookups accept the marketplace id or the GGUF repo id."""
        return model.lower() in (self.model_id.lower(), self.repo_id.lower())


class _Record(BaseModel):
    pulls: list[Pull] = []


class RepoCache:
    """One repo's folder in the cache."""

    def __init__(self, cache_dir: Path, repo_id: str) -> None:
        self.cache_dir = cache_dir
        self.repo_id = repo_id
        self.folder = cache_dir / repo_folder_name(repo_id)
        self.blobs = self.folder / "blobs"
        self.snapshots = self.folder / "snapshots"
        self.refs = self.folder / "refs"
        self.record_path = self.folder / RECORD_NAME
        self.locks = cache_dir / ".locks" / self.folder.name

    def blob(self, sha256: str) -> Path:
        return self.blobs / sha256

    def incomplete(self, sha256: str) -> Path:
        return self.blobs / f"{sha256}.incomplete"

    def marker(self, sha256: str) -> Path:
        return self.blobs / f"{sha256}.verified"

    def adopted(self, sha256: str) -> Path:
        return self.blobs / f"{sha256}.adopted"

    def lock(self, sha256: str) -> Path:
        """The lock path huggingface_hub uses for the same blob, so the two never write it at once."""
        return self.locks / f"{sha256}.lock"

    def snapshot_path(self, revision: str, path: str) -> Path:
        return self.snapshots / revision / path

    def is_verified(self, file: RemoteFile) -> bool:
        try:
            stat = self.blob(file.sha256).stat()
            marker = json.loads(self.marker(file.sha256).read_text())
        except (OSError, ValueError):
            return False
        return stat.st_size == file.size and marker == {"sha256": file.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def verify_again(self, file: RemoteFile) -> bool:
        """Verified, or made so by hashing the blob once against the sha256 the record names (the
        marker is tied to the mtime, which a copied cache loses); a mismatch is left for an online
        pull to replace. The marker is written where the cache is writable."""
        if self.is_verified(file):
            return True
        blob = self.blob(file.sha256)
        if not blob.is_file() or blob.stat().st_size != file.size:
            return False
        log.info("hashing %s/%s once: its verification marker does not match the file (a copied cache?)", self.repo_id, file.path)
        digest = hashlib.sha256()
        with blob.open("rb") as fh:
            while block := fh.read(HASH_BLOCK):
                digest.update(block)
        if digest.hexdigest() != file.sha256:
            return False
        try:
            self.mark_verified(file)
        except OSError:
            pass
        return True

    def mark_verified(self, file: RemoteFile) -> None:
        stat = self.blob(file.sha256).stat()
        write_private_file(self.marker(file.sha256), json.dumps({"sha256": file.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))

    def link(self, revision: str, file: RemoteFile) -> Path:
        """Point snapshots/<commit>/<path> at the blob with a relative symlink, as huggingface_hub does."""
        link = self.snapshot_path(revision, file.path)
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(self.blob(file.sha256), link.parent)
        if link.is_symlink() and os.readlink(link) == target:
            return link
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        return link

    def set_ref(self, ref: str, revision: str) -> None:
        path = self.refs / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private_file(path, revision)

    def pulls(self) -> list[Pull]:
        """The record; an unreadable one counts as empty (files are then re-verified on the next pull)."""
        try:
            return _Record.model_validate_json(self.record_path.read_bytes()).pulls
        except (OSError, ValidationError):
            return []

    def save_pulls(self, pulls: list[Pull]) -> None:
        if not pulls:
            self.record_path.unlink(missing_ok=True)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        write_private_file(self.record_path, _Record(pulls=pulls).model_dump_json(indent=2))

    def add_pull(self, pull: Pull) -> None:
        self.save_pulls([known for known in self.pulls() if known.key() != pull.key()] + [pull])

    def forget_pull(self, pull: Pull) -> None:
        self.save_pulls([known for known in self.pulls() if known.key() != pull.key()])

    def is_complete(self, pull: Pull, *, rehash: bool = False) -> bool:
        """Every file of the pull is verified and reachable through its snapshot path; with
        `rehash`, a file whose marker does not match is hashed again (`verify_again`)."""
        verified = self.verify_again if rehash else self.is_verified
        return all(self.snapshot_path(pull.revision, file.path).exists() and verified(file) for file in pull.files)


def cached_repos(cache_dir: Path) -> Iterator[RepoCache]:
    """Repos vramsupply has pulled into (those with a record); other tools' repos are left alone."""
    for record in sorted(cache_dir.glob(f"models--*/{RECORD_NAME}")):
        org, _, name = record.parent.name.removeprefix("models--").partition("--")
        yield RepoCache(cache_dir, f"{org}/{name}")


def find_verified_pull(cache_dir: Path, model: str, quant: str) -> tuple[RepoCache, Pull] | None:
    """The newest complete, verified pull of `model` (marketplace or repo id) at `quant`, for offline use."""
    wanted = normalize_quant(quant)
    found = [
        (repo, pull)
        for repo in cached_repos(cache_dir)
        for pull in repo.pulls()
        if pull.matches(model) and pull.quant == wanted and repo.is_complete(pull, rehash=True)
    ]
    return max(found, key=lambda item: item[1].pulled_at, default=None)
