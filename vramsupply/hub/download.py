"""Resumable, sha256-verified downloads into the shared HuggingFace cache.

Why not `hf_hub_download`: since huggingface_hub 1.18 a failed transfer deletes its partial file
(no resume across runs), its retry budget resets on every chunk (a server that keeps dropping the
connection loops forever), and it checks sizes, never sha256. So the bytes are moved here and
huggingface_hub is used for metadata only.

Why httpx2 for the bytes: it is the HTTP stack huggingface_hub 2.x itself runs on, so proxies and
certificates behave the same for metadata and downloads; `prepare_model` is synchronous (it runs
before the engine loads, from a CLI command or `asyncio.to_thread`), so a blocking client needs no
event loop of its own; and it drops the Authorization header when a redirect leaves the Hub's
origin (the CDN must never see the token).

The stall deadline counts from the last byte written, not from the end of the attempt that
timed out, and each new attempt may wait only what is left of it: a server that stops sending is
given up on after the download timeout, not after twice it.

A server whose file is not the size the Hub lists would otherwise be downloaded again and again
(each new try counts as progress): a length that disagrees with the listing, a 416 to a resume,
or a body that ends cleanly twice at the same offset ends the download with a DownloadError.

A model already verified and linked in the cache is used without writing to it: a cache mounted
read-only, or shared from another user, serves what it holds.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import BinaryIO, Protocol

import httpx2
from filelock import FileLock, Timeout
from rich.filesize import decimal

from vramsupply.hub.access import HubAccess, auth_help, retry_after
from vramsupply.hub.errors import ChecksumMismatch, DownloadError, HubAuthError, HubError, InsufficientDiskSpace
from vramsupply.hub.local import GGUF_MAGIC
from vramsupply.hub.progress import ProgressTask, TransferProgress
from vramsupply.hub.resolve import RemoteFile, ResolvedModel
from vramsupply.hub.store import Pull, RepoCache

log = logging.getLogger(__name__)

CHUNK = 1 << 20
HASH_BLOCK = 8 << 20
RETRY_DELAY_MIN = 0.2
RETRY_DELAY_MAX = 10.0


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


class _Retry(Exception):
    """A transient answer (HTTP 429/5xx): try again after a pause; ``asked``: the seconds the
    Hub's ``Retry-After`` asked for, if it said."""

    def __init__(self, reason: str, asked: float | None = None) -> None:
        super().__init__(reason)
        self.asked = asked


class _EndedEarly(Exception):
    """The body ended cleanly before the file's listed size: resume once; twice at the same
    offset means the server has no more bytes."""


class PartialBlob:
    """`blobs/<sha256>.incomplete`: the bytes so far and their running sha256.

    Reopening an existing partial file hashes what is already there once, so the final check
    still covers every byte even when the download spanned several processes.
    """

    def __init__(self, path: Path, expected: RemoteFile, checking: ProgressTask) -> None:
        self.path = path
        self.expected = expected
        self.digest = hashlib.sha256()
        self.size = 0
        self.appended_at = time.monotonic()  # when the last byte arrived (or the download began)
        if path.exists():
            if path.stat().st_size > expected.size:
                path.unlink()
            else:
                self.size = _hash_into(path, self.digest, checking)
        checking.finish()

    def restart(self) -> None:
        self.path.unlink(missing_ok=True)
        self.digest = hashlib.sha256()
        self.size = 0

    def append(self, fh: BinaryIO, chunk: bytes) -> None:
        if self.size + len(chunk) > self.expected.size:
            self.restart()
            raise ChecksumMismatch(
                f"the server sent more than the {self.expected.size} bytes the Hub lists for {self.expected.path}; the partial file was deleted"
            )
        fh.write(chunk)
        self.digest.update(chunk)
        self.size += len(chunk)
        self.appended_at = time.monotonic()

    def complete(self, blob: Path, label: str) -> None:
        """Check the sha256 and move the file into place; on mismatch delete it and raise."""
        actual = self.digest.hexdigest()
        if actual != self.expected.sha256:
            self.restart()
            raise ChecksumMismatch(
                f"{label} is corrupt: sha256 {actual} does not match the Hub's {self.expected.sha256}; "
                "the file was deleted, run again to download it afresh"
            )
        with self.path.open("ab") as fh:  # "ab": a file of 0 bytes never had one written
            os.fsync(fh.fileno())
        os.replace(self.path, blob)


def _hash_into(path: Path, digest: _Digest, task: ProgressTask | None = None) -> int:
    size = 0
    with path.open("rb") as fh:
        while block := fh.read(HASH_BLOCK):
            digest.update(block)
            size += len(block)
            if task is not None:
                task.advance(len(block))
    return size


def _range_start(response: httpx2.Response) -> int | None:
    """First byte of a 206 answer, from `Content-Range: bytes N-M/L`."""
    value = response.headers.get("Content-Range", "")
    unit, _, spec = value.partition(" ")
    start = spec.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _range_total(response: httpx2.Response) -> int | None:
    """The file's full length from a 206's `Content-Range: bytes N-M/L` (None for `*`)."""
    total = response.headers.get("Content-Range", "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


def _body_length(response: httpx2.Response) -> int | None:
    """A 200's Content-Length, when it counts the file's bytes (no content encoding)."""
    length = response.headers.get("Content-Length", "")
    encoded = response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
    return int(length) if length.isdigit() and not encoded else None


class BlobDownloader:
    """Fetches blobs of one resolved model with Range resume, retries and a stall deadline."""

    def __init__(self, client: httpx2.Client, access: HubAccess, resolved: ResolvedModel, cache: RepoCache, progress: TransferProgress) -> None:
        self.client = client
        self.access = access
        self.resolved = resolved
        self.cache = cache
        self.progress = progress

    def label(self, file: RemoteFile) -> str:
        return f"{self.resolved.repo_id}/{file.path}"

    def fetch(self, file: RemoteFile) -> None:
        """Make `blobs/<sha256>` exist and be verified, holding the same lock huggingface_hub uses."""
        lock_path = self.cache.lock(file.sha256)
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        self.cache.blobs.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            self.progress.note(f"waiting for another process downloading {self.label(file)}")
            lock.acquire()
        try:
            if self.cache.is_verified(file):
                return
            blob = self.cache.blob(file.sha256)
            if blob.exists() and self._existing_blob_matches(blob, file):
                self.cache.adopted(file.sha256).touch()  # another tool's file: `models rm` keeps it
                self.cache.mark_verified(file)
                return
            try:
                self._transfer(file)
                self.cache.mark_verified(file)
            except FileNotFoundError:  # `models rm --force` (or a hand) took the partial file or its folder
                raise DownloadError(f"{self.label(file)} was removed from the cache while it downloaded: run again to download it") from None
        finally:
            lock.release()

    def _existing_blob_matches(self, blob: Path, file: RemoteFile) -> bool:
        """A blob another tool downloaded (sizes checked only): hash it once; delete it if wrong."""
        digest = hashlib.sha256()
        task = self.progress.task(f"verifying {self.label(file)}", file.size)
        _hash_into(blob, digest, task)
        task.finish()
        if digest.hexdigest() == file.sha256:
            return True
        blob.unlink()
        return False

    def _transfer(self, file: RemoteFile) -> None:
        incomplete = self.cache.incomplete(file.sha256)
        checking = self.progress.task(f"checking the partial {self.label(file)}", incomplete.stat().st_size) if incomplete.exists() else ProgressTask()
        partial = PartialBlob(incomplete, file, checking)
        url = self.access.file_url(self.resolved.repo_id, self.resolved.revision, file.path)
        task = self.progress.task(self.label(file), file.size, partial.size)
        last_progress = time.monotonic()
        delay, ended_at = RETRY_DELAY_MIN, None
        while partial.size < file.size:
            before, asked = partial.size, None
            left = max(self.access.timeout - (time.monotonic() - last_progress), 0.1)
            try:
                self._stream_once(url, partial, task, left)
                if partial.size < file.size:
                    raise _EndedEarly
            except _Retry as exc:
                reason, asked = str(exc), exc.asked
            except httpx2.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except _EndedEarly:
                if partial.size == ended_at:
                    raise self._size_mismatch(partial, f"its body ends at byte {partial.size}, twice") from None
                ended_at, reason = partial.size, "the server closed the connection early"
            except httpx2.RequestError as exc:  # TooManyRedirects, DecodingError: no retry mends them
                raise DownloadError(f"download of {self.label(file)} failed: {type(exc).__name__}: {exc}") from None
            now = time.monotonic()
            if partial.size > before:
                last_progress, delay = partial.appended_at, RETRY_DELAY_MIN
            if partial.size >= file.size:
                break
            stalled = now - last_progress
            if stalled >= self.access.timeout:
                raise DownloadError(
                    f"download of {self.label(file)} stalled: no data for {stalled:.1f} s ({reason}); "
                    f"{decimal(partial.size)} of {decimal(file.size)} kept, run again to resume"
                )
            time.sleep(self._pause(file, partial, reason, asked, min(delay, self.access.timeout - stalled), self.access.timeout - stalled))
            delay = min(delay * 2, RETRY_DELAY_MAX)
        partial.complete(self.cache.blob(file.sha256), self.label(file))
        task.finish()

    def _pause(self, file: RemoteFile, partial: PartialBlob, reason: str, asked: float | None, backoff: float, left: float) -> float:
        """Seconds to wait before the next try: what the Hub asked for (``Retry-After``), else
        ``backoff``. A wait longer than the ``left`` of the download timeout fails now, saying so,
        rather than asking a rate-limited Hub again and again and calling it a stall."""
        if asked is None:
            return backoff
        if asked > left:
            raise DownloadError(
                f"download of {self.label(file)} paused by the Hub: it answered {reason} and asks to wait {asked:.0f} s, "
                f"more than the {left:.0f} s left of the download timeout (VRAM_SUPPLY_DOWNLOAD_TIMEOUT); "
                f"{decimal(partial.size)} of {decimal(file.size)} kept, run again later to resume"
            )
        return asked

    def _stream_once(self, url: str, partial: PartialBlob, task: ProgressTask, timeout: float) -> None:
        """One GET from the partial file's end; `timeout`: what is left of the stall deadline."""
        headers = self.access.headers()
        if partial.size:
            headers["Range"] = f"bytes={partial.size}-"
        with self.client.stream("GET", url, headers=headers, timeout=httpx2.Timeout(timeout)) as response:
            status = response.status_code
            if status in (401, 403):
                raise HubAuthError(auth_help(self.resolved.repo_id, self.access.endpoint))
            if status == 429 or status >= 500:
                raise _Retry(f"HTTP {status}", retry_after(response.headers))
            if status not in (200, 206, 416):
                raise DownloadError(f"download of {self.label(partial.expected)} failed: HTTP {status} from {url}")
            self._check_length(response, partial)
            if status == 206 and _range_start(response) != partial.size:
                partial.restart()
                task.restart()
                raise _Retry(f"HTTP 206 from another offset than byte {partial.size}; starting over")
            if status == 200 and partial.size:  # the server ignored the range: start over
                partial.restart()
                task.restart()
            try:
                with partial.path.open("ab") as fh:
                    for chunk in response.iter_bytes(CHUNK):
                        partial.append(fh, chunk)
                        task.advance(len(chunk))
            except OSError as exc:
                raise self._write_error(partial, exc) from None

    def _check_length(self, response: httpx2.Response, partial: PartialBlob) -> None:
        """The file's length as the server states it must be the length the Hub lists."""
        listed = partial.expected.size
        if response.status_code == 416:  # nothing at our offset: the server's file ends before it
            raise self._size_mismatch(partial, f"it has nothing from byte {partial.size} on (HTTP 416)")
        total = _range_total(response) if response.status_code == 206 else _body_length(response)
        if total is not None and total != listed:
            raise self._size_mismatch(partial, f"it serves {total} bytes")

    def _size_mismatch(self, partial: PartialBlob, how: str) -> DownloadError:
        """The server's file is not the size the Hub lists: no retry mends that; the partial file stays."""
        return DownloadError(
            f"download of {self.label(partial.expected)} failed: the Hub lists {partial.expected.size} bytes but the server's file "
            f"differs ({how}); {decimal(partial.size)} kept, run again later or choose another --quant or repo"
        )

    def _write_error(self, partial: PartialBlob, exc: OSError) -> HubError:
        """The disk filled up (or refused) mid-download: say so in one line; the partial file stays."""
        label = self.label(partial.expected)
        kept = partial.path.stat().st_size if partial.path.exists() else 0
        progress = f"{decimal(kept)} of {decimal(partial.expected.size)} kept in {partial.path.parent}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return InsufficientDiskSpace(
                f"the disk filled up while downloading {label} ({progress}); free some space or point "
                "VRAM_SUPPLY_CACHE_DIR at a larger disk, then run again to resume"
            )
        return DownloadError(f"cannot write {partial.path} while downloading {label}: {exc.strerror or exc} ({progress})")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_free_space(cache: RepoCache, files: list[RemoteFile], quant: str) -> None:
    needed = 0
    for file in files:
        if not cache.blob(file.sha256).exists():
            partial = cache.incomplete(file.sha256)
            needed += file.size - (partial.stat().st_size if partial.exists() else 0)
    free = shutil.disk_usage(_existing_ancestor(cache.folder)).free
    if needed > free:
        raise InsufficientDiskSpace(
            f"{cache.repo_id} {quant} needs {decimal(needed)} more in {cache.cache_dir} but only {decimal(free)} is free; "
            "free some space or point VRAM_SUPPLY_CACHE_DIR at a larger disk"
        )


def _already_there(resolved: ResolvedModel, cache: RepoCache, pull: Pull) -> list[Path]:
    """Every file verified and linked: nothing to download. The record is refreshed where the cache
    can be written; one that cannot (mounted read-only, shared from another user) serves as it is."""
    try:
        cache.add_pull(pull)
        cache.set_ref("main", resolved.revision)
    except OSError as exc:
        log.info("%s is verified in the cache, which cannot be written (%s): used as it is", resolved.primary.path, exc.strerror or exc)
    links = [cache.snapshot_path(resolved.revision, file.path) for file in resolved.files]
    check_gguf_magic(links[0])
    return links


def check_gguf_magic(path: Path) -> None:
    with path.open("rb") as fh:
        if fh.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise HubError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def download_model(resolved: ResolvedModel, cache: RepoCache, access: HubAccess, progress: TransferProgress) -> list[Path]:
    """Download and verify every part of `resolved`; return their snapshot paths, first part first.

    The pull is recorded before any byte moves, so `models rm` also finds interrupted downloads;
    a pull that failed before writing anything is forgotten again.
    """
    pull = Pull.of(resolved)
    if cache.is_complete(pull):  # every file verified and linked
        return _already_there(resolved, cache, pull)
    missing = [file for file in resolved.files if not cache.is_verified(file)]
    check_free_space(cache, missing, resolved.quant)
    cache.add_pull(pull)
    try:
        with httpx2.Client(follow_redirects=True, timeout=httpx2.Timeout(access.timeout)) as client, progress:
            downloader = BlobDownloader(client, access, resolved, cache, progress)
            for file in missing:
                downloader.fetch(file)
    except BaseException:
        if not any(cache.blob(file.sha256).exists() or cache.incomplete(file.sha256).exists() for file in resolved.files):
            cache.forget_pull(pull)
        raise
    links = [cache.link(resolved.revision, file) for file in resolved.files]
    cache.set_ref("main", resolved.revision)
    check_gguf_magic(links[0])
    return links
