"""The KV cache takes host memory as its cells are written, not all at once (Linux, glibc).

llama.cpp zeroes a KV cache (and a recurrent model's state) in host memory when it makes it, and
again when the warm-up clears it with its data. Writing those zeros commits every page: an
8,192-token cache of the bench model (72 MiB) was resident before the first request, and stayed so
while a handful of short chats used a tenth of it. An anonymous page handed back with
``madvise(MADV_DONTNEED)`` reads as zeros again and is committed only when next written, so after
``release`` the cache costs memory as its cells are used (llama.cpp fills cells from the start of
the cache, and attends only up to the last one used).

llama.cpp says how large its buffers are ("CPU KV buffer size = 72.00 MiB", a log line at INFO),
not where they are. glibc serves an allocation that large from a mapping of its own, with its chunk
header in front of the memory it returns (``prev_size`` holding the padding an aligned allocation
skipped, ``size`` with its ``IS_MMAPPED`` bit). So a buffer is found as the one chunk, in the
anonymous mappings that appeared while the context was made, whose size matches a logged size. It
is handed back after the warm-up (whose clear would commit it again), only when every byte of it is
zero, as the cache is right after that clear, and on the scheduler thread, which alone uses the
context. Memory is read through ``/proc/self/mem``, which answers an error where a pointer would end
the process: other threads (the HTTP server's) allocate and free meanwhile, and may unmap a mapping
being looked at.

Anything that does not match (another C library, a cache in GPU memory or in glibc's heap, two
chunks of one size, a platform without ``/proc/self/maps``) is left alone, as is every cache on a
host whose transparent huge pages are always on (``_huge_pages_always``): the cache is then
resident from the start, as before.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .model import listening_to_llama

log = logging.getLogger(__name__)

PAGE = 4096
MADV_DONTNEED = 4
_IS_MMAPPED = 0x2
_CHUNK_HEADER = 16  # prev_size and size, in front of the memory malloc returns
# posix_memalign(A) pads an mmapped chunk's start by A - 16 (glibc ``_int_memalign``; ggml asks for
# 64), and leaves the unpadded chunk's header in front: the largest padding is tried first.
_LEADS = (4080, 2032, 1008, 496, 240, 112, 48, 16, 0)
# "llama_kv_cache:        CPU KV buffer size =    72.00 MiB", "llama_memory_recurrent: ... CPU RS buffer size".
_BUFFER_LINE = re.compile(rb"^\w+: +CPU (?:KV|RS) buffer size = +([0-9.]+) MiB")
_LOGGED_PRECISION = 0.005 * 1024 * 1024  # the size is printed to 0.01 MiB
_ZERO_BLOCK = bytes(1 << 20)
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@dataclass(frozen=True)
class Span:
    start: int
    end: int


@dataclass
class HostBuffers:
    """The zeroed host buffers of one context, ready to be handed back (``release``)."""

    spans: list[Span] = field(default_factory=list)

    def release(self, memory: _Memory | None = None) -> int:
        """Hand every whole zero page of the buffers back to the kernel; returns the bytes handed back.
        Call it on the thread that decodes, while no decode runs, right after the cache was cleared."""
        if not self.spans:
            return 0
        if memory is None:
            with _optional("hand back the KV cache's pages"), _Memory() as opened:
                return self.release(opened)
            return 0
        released = sum(_release_zero_pages(memory, span) for span in self.spans)
        if released:
            where = ", ".join(f"{span.start:#x}-{span.end:#x}" for span in self.spans)
            log.debug("handed back %.1f MiB of zeroed KV cache pages (%s)", released / (1 << 20), where)
        return released


@contextmanager
def host_buffers_made() -> Iterator[HostBuffers]:
    """Around making a context: finds the host buffers llama.cpp zeroed meanwhile. They are handed
    back after the warm-up (``release``), whose clear would commit them again."""
    found = HostBuffers()
    before = _anonymous_mappings()
    lines: list[bytes] = []
    with listening_to_llama(lambda text: lines.append(text) if _BUFFER_LINE.match(text) else None):
        yield found
    if before is None:
        return
    sizes = [float(_BUFFER_LINE.match(line).group(1)) * (1 << 20) for line in lines]  # type: ignore[union-attr]
    if sizes and _huge_pages_always():
        log.debug("transparent huge pages are always on here: the KV cache stays resident (pages handed back would come back 2 MiB at a time)")
    elif sizes:
        with _optional("find the KV cache in host memory"), _Memory() as memory:
            found.spans.extend(_locate(memory, sizes, _new_mappings(before, min(sizes) - _LOGGED_PRECISION)))


def _huge_pages_always() -> bool:
    """Whether the kernel backs any anonymous memory with 2 MiB pages (``[always]``): there a page
    handed back is committed again with its whole 2 MiB block at the first write to any cell in it,
    and khugepaged merges partly used blocks back, so the cache would fill again with a few cells per
    tensor. The host's choice of huge pages (faster attention reads) stands."""
    try:
        return "[always]" in THP_SETTING.read_text()
    except OSError:
        return False


@contextmanager
def _optional(what: str) -> Iterator[None]:
    """Memory saved is no reason to fail a load: whatever goes wrong (a /proc/self/mem this process
    may not open, a layout not foreseen) is logged and the cache left resident."""
    try:
        yield
    except Exception as exc:
        log.warning("could not %s (%s: %s); it stays resident", what, type(exc).__name__, exc)


def _anonymous_mappings() -> set[tuple[int, int]] | None:
    """The process's private anonymous read-write mappings; None where /proc/self/maps cannot be read."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return None
    mappings = set()
    for line in lines:
        fields = line.split()
        if len(fields) == 5 and fields[1] == "rw-p" and fields[4] == "0":
            start, end = (int(part, 16) for part in fields[0].split("-"))
            mappings.add((start, end))
    return mappings


def _new_mappings(before: set[tuple[int, int]], at_least: float) -> list[tuple[int, int]]:
    """The mappings made since ``before`` that could hold a chunk of ``at_least`` bytes."""
    return sorted(m for m in (_anonymous_mappings() or set()) - before if m[1] - m[0] >= at_least)


def _locate(memory: _Memory, sizes: list[float], mappings: list[tuple[int, int]]) -> Iterator[Span]:
    """The chunks in ``mappings`` that hold the logged sizes: for a size logged k times (two
    caches of one model may be of one size), exactly k chunks, or none at all."""
    chunks = [chunk for start, end in mappings for chunk in _chunks(memory, start, end)]
    for size in sorted(set(sizes)):
        matches = [chunk for chunk in chunks if _holds(chunk, size)]
        if len(matches) == sizes.count(size):
            yield from matches
        else:
            log.debug("%d host chunks of %.2f MiB where %d were logged: left resident", len(matches), size / (1 << 20), sizes.count(size))


def _chunks(memory: _Memory, start: int, end: int) -> Iterator[Span]:
    """The memory of the glibc mmapped chunks laid side by side in one mapping, from its start;
    a page no chunk starts at is stepped over (merged mappings of other kinds)."""
    page = start
    while page < end:
        length = _chunk_at(memory.read(page, PAGE + _CHUNK_HEADER), page, end)
        if length is None:
            page += PAGE
            continue
        yield Span(page + length[0] + _CHUNK_HEADER, page + length[1])
        page += length[1]


def _chunk_at(head: bytes | None, page: int, end: int) -> tuple[int, int] | None:
    """(padding, whole length) of a glibc mmapped chunk whose mapping starts at ``page`` (``head``:
    its first page and a header's more), or None."""
    for lead in _LEADS if head is not None else ():
        prev_size, size = struct.unpack_from("<QQ", head, lead)  # type: ignore[arg-type]
        length = lead + (size & ~0x7)
        if prev_size == lead and size & _IS_MMAPPED and length % PAGE == 0 and page < page + length <= end:
            return lead, length
    return None


def _holds(chunk: Span, size: float) -> bool:
    """Whether a chunk's memory could be an allocation of ``size`` bytes (printed to 0.01 MiB):
    at least that large, and larger by less than a page and the alignment's padding."""
    usable = chunk.end - chunk.start
    return size - _LOGGED_PRECISION <= usable <= size + _LOGGED_PRECISION + PAGE + _LEADS[0]


def _release_zero_pages(memory: _Memory, span: Span) -> int:
    """madvise(MADV_DONTNEED) the whole pages of ``span`` if every byte of it is zero (as the
    cache is right after a clear with its data; anything else is not the cache); the bytes handed back."""
    start = -(-span.start // PAGE) * PAGE
    end = span.end // PAGE * PAGE
    if end <= start or not _all_zero(memory, span.start, span.end):
        log.debug("a host chunk of %.2f MiB is not all zero: left resident", (span.end - span.start) / (1 << 20))
        return 0
    return end - start if _madvise(start, end - start, MADV_DONTNEED) else 0


def _all_zero(memory: _Memory, start: int, end: int) -> bool:
    """Whether [start, end) holds only zero bytes, read a MiB at a time."""
    for block in range(start, end, len(_ZERO_BLOCK)):
        length = min(len(_ZERO_BLOCK), end - block)
        if memory.read(block, length) != _ZERO_BLOCK[:length]:
            return False
    return True


class _Memory:
    """This process's memory, read through /proc/self/mem (the module docstring says why)."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)

    def __enter__(self) -> _Memory:
        return self

    def __exit__(self, *_exc: object) -> None:
        os.close(self._fd)

    def read(self, address: int, length: int) -> bytes | None:
        """``length`` bytes at ``address``, or None where they are not all mapped."""
        try:
            data = os.pread(self._fd, length, address)
        except OSError:
            return None
        return data if len(data) == length else None


_libc = None


def _madvise(address: int, length: int, advice: int) -> bool:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _libc.madvise(address, length, advice) == 0
