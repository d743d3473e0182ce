"""A model file on this machine: what serving needs to know about it, without the Hub.

Kept apart from ``prepare.py`` so that serving a local file never imports huggingface_hub and
its HTTP stack (12 MB of resident memory, for a feature the process does not use).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vramsupply.hub.errors import InvalidModelSpec
from vramsupply.hub.quant import parse_gguf_path

if TYPE_CHECKING:
    from vramsupply.hub.resolve import ResolvedModel
    from vramsupply.hub.store import Pull, RepoCache

GGUF_MAGIC = b"GGUF"


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
    """Paths are explicit (`./x.gguf`, `/abs`, `~/x`) or end in .gguf; so is a name that cannot be
    an `org/model` id (no slash, or several) where something of that name is on disk (`--model
    models`, a directory: it is then said to be a directory, not that it is no model id). Anything
    else is a Hub id."""
    if model.startswith(("./", "../", "/", "~")) or model.lower().endswith(".gguf"):
        return True
    return model.count("/") != 1 and os.path.lexists(model)


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
        raise InvalidModelSpec(not_a_model_file(path))
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


def not_a_model_file(path: Path) -> str:
    """What is at ``path`` instead of a model file, in one line, as serve, bench and plan say it:
    nothing, a link to nothing (its target named), a directory (with the .gguf files in it, if
    any), or something else that is no regular file (a pipe, a device)."""
    if path.is_symlink() and not path.exists():
        return f"model file {path} does not exist: it is a symbolic link to {os.readlink(path)}, which does not exist"
    if not path.exists():
        return f"model file {path} does not exist"
    if path.is_dir():
        return f"{path} is a directory, not a .gguf file{_ggufs_in(path)}"
    return f"{path} is not a file"


def _ggufs_in(directory: Path) -> str:
    try:
        names = sorted(entry.name for entry in directory.iterdir() if entry.name.lower().endswith(".gguf"))
    except OSError:
        return ""
    if not names:
        return ""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"; it holds {shown}: pass one of them (of a split model, its first part)"
