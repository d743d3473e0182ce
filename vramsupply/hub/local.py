"""A model file on this machine: what serving needs to know about it, without the Hub.

Kept apart from ``prepare.py`` so that serving a local file never imports huggingface_hub and
its HTTP stack (12 MB of resident memory, for a feature the process does not use).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vramsupply.userpath import expand_user
from vramsupply.hub.errors import ModelFileError
from vramsupply.hub.quant import parse_gguf_path

if TYPE_CHECKING:
    from vramsupply.hub.identity import HubIdentity
    from vramsupply.hub.resolve import ResolvedModel
    from vramsupply.hub.store import Pull, RepoCache

GGUF_MAGIC = b"GGUF"
CACHED_REPO_PREFIX = "models--"  # a repo's folder in a Hub cache (store.py)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalModel:
    """A model ready to load. `path` is the first part; `size` counts all parts.

    `model_id` is the marketplace identity (lowercased `org/model`, or a local file's stem);
    `repo_id`, `revision`, `filename` and `sha256` say which Hub file it is (None for a local file
    outside a Hub cache; `sha256` also where nothing verified the file).
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
    """Paths are explicit (`./x.gguf`, `/abs`, `~/x`) or end in .gguf; so is a name that cannot be
    an `org/model` id (no slash, or several) where something of that name is on disk (`--model
    models`, a directory: it is then said to be a directory, not that it is no model id). Anything
    else is a Hub id."""
    if model.startswith(("./", "../", "/", "~")) or model.lower().endswith(".gguf"):
        return True
    return model.count("/") != 1 and os.path.lexists(model)


def local_model_id(path: Path) -> str:
    """A local file's marketplace id: its stem, lowercased, without a split file's `-0000N-of-0000M`.

    A name whose bytes are not UTF-8 (a Latin-1 `mod\xe8le.gguf`) has each such byte as U+FFFD in
    its id: the id goes into JSON (the state file, `/v1/models`, the platform), which cannot carry
    the lone surrogates Python reads those bytes as; `serve` died on them with a traceback."""
    parsed = parse_gguf_path(path.name)
    stem = Path(parsed.prefix).name if parsed is not None and parsed.parts > 1 else path.stem
    return os.fsencode(stem).decode("utf-8", "replace").lower()


def model_id_of(model: str) -> str:
    """The marketplace id `model` is offered under, without network: for `vramsupply demand`. A
    file in a Hub cache is its recorded id (or its repo's: the Hub is not asked which base model)."""
    if not is_local_path(model):
        return model.lower()
    path = expand_user(model).absolute()
    identity = _hub_identity(path, None) if path.is_file() else None
    return identity.model_id if identity is not None else local_model_id(path)


def _hub_identity(path: Path, timeout: float | None) -> HubIdentity | None:
    """A file the agent or huggingface_hub downloaded is the Hub model it is (hub/identity.py);
    the module, and huggingface_hub with it, is imported only for a path that may lie in a cache:
    one with a folder named like a cached repo's, itself or where its links lead."""
    if not any(part.startswith(CACHED_REPO_PREFIX) for part in (*Path(os.path.normpath(path)).parts, *path.resolve().parts)):
        return None
    from vramsupply.hub.identity import hub_identity

    return hub_identity(path, timeout)


def local_model(model: str, timeout: float | None = None) -> LocalModel:
    """A local file skips the Hub; it must exist and start with the GGUF magic bytes. One the
    agent or huggingface_hub downloaded is offered as that Hub model: ``timeout`` bounds the one
    Hub question this may need (None: ask nothing, hub/identity.py)."""
    path = expand_user(model).absolute()
    _check_gguf(path)
    identity = _hub_identity(path, timeout)
    if identity is not None:
        log.info("%s is %s of %s@%s: offered as %s", path, identity.filename, identity.repo_id, identity.revision[:12], identity.model_id)
        return LocalModel(
            path=path, model_id=identity.model_id, repo_id=identity.repo_id, revision=identity.revision, filename=identity.filename,
            sha256=identity.sha256, quant=identity.quant, size=identity.size or path.stat().st_size,
        )
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


def _check_gguf(path: Path) -> None:
    """The file exists and starts with the GGUF magic bytes, or ModelFileError says what it is."""
    if not path.is_file():
        raise ModelFileError(not_a_model_file(path))
    try:
        with path.open("rb") as fh:
            magic = fh.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def not_a_model_file(path: Path) -> str:
    """What is at ``path`` instead of a model file, in one line, as serve, bench and plan say it:
    nothing, a link to nothing (its target named), a directory (with the .gguf files in it, if
    any), or something else that is no regular file (a pipe, a device)."""
    if path.is_symlink() and not path.exists():
        target = os.readlink(path)
        if _link_loops(path):
            return f"model file {path} is a symbolic link that leads back to itself (through {target}): point it at the .gguf file"
        return f"model file {path} does not exist: it is a symbolic link to {target}, which does not exist"
    if not path.exists():
        return f"model file {path} does not exist"
    if path.is_dir():
        return f"{path} is a directory, not a .gguf file{_ggufs_in(path)}"
    return f"{path} is not a file"


def _link_loops(path: Path) -> bool:
    """Whether following ``path``'s links never ends (a loop, or more links than the system follows)."""
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python before 3.13: "Symlink loop"
        return True
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _ggufs_in(directory: Path) -> str:
    try:
        names = sorted(entry.name for entry in directory.iterdir() if entry.name.lower().endswith(".gguf"))
    except OSError:
        return ""
    if not names:
        return ""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"; it holds {shown}: pass one of them (of a split model, its first part)"
