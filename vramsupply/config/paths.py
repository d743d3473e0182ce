"""Where the agent keeps its files, and the one way it replaces one: private and all or nothing.

Apart from the settings schema because the ledger, the platform token, the registration state, the
Hub cache's records and the throughput store need a place on disk and that write without any
setting, and the schema itself needs ``config_path`` to find its TOML source. One write for all of
them: four copies of "temporary file, then rename" had grown apart (one synced, three did not).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

import platformdirs

from vramsupply.userpath import expand_user

APP_NAME = "vramsupply"
CONFIG_PATH_ENV = "VRAM_SUPPLY_CONFIG"


def config_path() -> Path:
    override = os.environ.get(CONFIG_PATH_ENV)
    if override:
        return expand_user(override)
    return default_config_path()


def default_config_path() -> Path:
    """Where the config file is when ``VRAM_SUPPLY_CONFIG`` names none."""
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


_data_dir_of_this_run: Path | None = None


def data_dir() -> Path:
    return _data_dir_of_this_run or Path(platformdirs.user_data_dir(APP_NAME))


def use_data_dir(path: Path | None) -> None:
    """This process keeps its files in ``path`` (None: the user's data dir again): ``serve --demo``
    runs on a folder of its own, so its bought answer is no row of the provider's earnings and
    it runs beside the provider's serving agent."""
    global _data_dir_of_this_run
    _data_dir_of_this_run = path


def os_reason(exc: OSError, path: Path) -> str:
    """Why ``path`` could not be made or opened: ``exc``'s reason, or, where a folder on the way
    is a file (a data dir that is a file), that, by name: mkdir's "File exists" named nothing."""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        blocking = file_in_the_way(path)
        if blocking is not None:
            return f"{blocking} is a file, not a directory"
    return exc.strerror or str(exc)


def file_in_the_way(path: Path) -> Path | None:
    """The first of ``path``'s folders that exists and is no directory, or None."""
    return next((folder for folder in reversed(path.parents) if folder.exists() and not folder.is_dir()), None)


def make_private_dirs(folder: Path) -> None:
    """Create ``folder`` and each missing folder above it with mode 0700, as the XDG base directory
    spec asks, whatever the umask: under ``umask 000`` they were world-writable, and anyone on the
    machine could have swapped a provider's config.toml or earnings ledger for their own. Folders
    that exist are left as they are."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            path.mkdir(mode=0o700)


def write_private_file(path: Path, text: str, mode: int = 0o600, *, sync: bool = True) -> None:
    """Replace ``path`` with ``text``, private (``mode``) from the first byte, all or nothing.

    The text goes to a new file beside it, created with ``mode`` and synced, then renamed over
    it: a full disk leaves the old file whole, and a secret never lands in a file someone else
    can read (an existing file's mode could not always be changed). A link is followed, so a
    config kept elsewhere stays there; a device or a FIFO is refused (``/dev/null`` made 0600).
    ``sync=False`` for a file rewritten often on the event loop that means nothing after a crash
    (the registration state): an fsync can stall for seconds while a download fills the page cache."""
    try:
        target = path.resolve() if path.is_symlink() else path
    except RuntimeError:  # Python 3.11's word for a link loop (3.13 raises OSError)
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None
    if target.exists() and not target.is_file():
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    make_private_dirs(target.parent)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:  # the locale's may be ASCII (a service without LANG)
            fh.write(text)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


FileStamp = tuple[int, int, int]


def file_stamp(path: Path) -> FileStamp | None:
    """What changes when ``path`` is rewritten (modification time, size, inode: a file replaced by
    rename is a new inode), for a running agent that rereads a file another command writes; None
    where it cannot be read."""
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)
