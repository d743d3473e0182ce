"""Reading a GGUF file's header (metadata and tensor table) without its weights.

The memory plan needs a model's shape before anything is downloaded, so the header of a Hub file is
read over HTTP Range requests: a prefix is fetched, parsed, and grown only if the header is longer
(a large vocabulary makes it a few MB; the weights behind it are GBs). The `gguf` package's
GGUFReader maps a whole file and needs every tensor's data present, so it cannot read a prefix;
this parser walks the documented layout (ggml docs/gguf.md) and keeps only what the plan uses.

It also reads what llama.cpp would abort the process on rather than refuse (estimate.py's
`check_loadable`): the vocabulary's token strings are read, not skipped, to find a token listed
twice and the byte tokens an SPM tokenizer falls back on. A 152k-token vocabulary's header then
reads in 0.10 s instead of 0.08 s, holding about 100 bytes a token while it is parsed.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx2

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
FIRST_READ = 1 << 20
MAX_HEADER = 256 << 20  # no real header comes near this; a corrupt length must not make us fetch GBs
# Numeric arrays up to this length are read (per-layer values such as the KV head count of each
# layer; llama.cpp allows 512 layers); longer ones (a vocabulary's token types) only counted.
MAX_KEPT_ARRAY = 4096
TOKENS_KEY = "tokenizer.ggml.tokens"
# The largest vocabulary read: 8x the largest real one (Gemma's 262144), so a corrupt length
# cannot make the duplicate check hold GBs of token strings.
MAX_VOCAB = 1 << 21
_HEX_DIGITS = frozenset(b"0123456789ABCDEF")

# GGUF value types -> struct format of a scalar (8: string, 9: array are handled apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_UINT32 = 4
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}
_U64 = struct.Struct("<Q")


class GgufError(Exception):
    """The bytes are not a GGUF header we can read; the message says which file and why."""


class HeaderFetchError(GgufError):
    """The Hub did not hand over the header's bytes: `status` is its HTTP answer, or None when no
    answer came (a timeout, a dropped connection). The caller decides what each means: the Hub's
    refusal of a gated repo and its being down call for different advice (gpu/source.py)."""

    def __init__(self, message: str, status: int | None, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.timed_out = timed_out  # no answer within the timeout: the one case a longer one may mend


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GgufHeader:
    """Metadata and the tensor table. Short numeric arrays are kept as tuples; others (token
    lists) only as their length, `ArrayLength`."""

    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int  # where the tensor data starts in the file

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "llama"))

    def arch(self, key: str, default: Any = None) -> Any:
        """A `{architecture}.{key}` value, such as `block_count`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def most_common_type(self) -> int | None:
        """The ggml type most tensors have, as llama.cpp's loader counts it to guess a file type
        the file does not state (``general.file_type``): by name order, the first to lead wins a tie."""
        counts: dict[int, int] = {}
        best, most = None, 0
        for tensor in sorted(self.tensors, key=lambda t: t.name):
            counts[tensor.ggml_type] = counts.get(tensor.ggml_type, 0) + 1
            if counts[tensor.ggml_type] > most:
                best, most = tensor.ggml_type, counts[tensor.ggml_type]
        return best

    def tensor_bytes(self, file_bytes: int) -> dict[str, int]:
        """Each tensor's size in bytes, from the gaps between offsets (padding included), so no
        table of quantization block sizes is needed. `file_bytes` bounds the last tensor."""
        ordered = sorted(self.tensors, key=lambda t: t.offset)
        ends = [t.offset for t in ordered[1:]] + [file_bytes - self.data_offset]
        return {t.name: max(0, end - t.offset) for t, end in zip(ordered, ends)}


@dataclass(frozen=True)
class ArrayLength:
    """An array value we skipped (token lists): only its item count is kept."""

    item_type: int
    length: int


@dataclass(frozen=True)
class TokenList(ArrayLength):
    """The vocabulary's strings, summed up: llama.cpp aborts on a token listed twice, and an SPM
    tokenizer on a byte it can spell neither as `<0xNN>` nor as the byte itself."""

    duplicate: tuple[int, int] | None = None  # the first token listed twice: (first id, second id)
    byte_tokens: frozenset[int] = frozenset()  # bytes that have a token of their own


class _NeedMore(Exception):
    """The prefix ends inside the header; fetch more and parse again."""


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise _NeedMore
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.unpack("<Q")
        if length > MAX_HEADER:
            raise GgufError(f"a string of {length} bytes in the header")
        return self.take(length).decode("utf-8", errors="replace")

    def value(self, kind: int, key: str) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_type, length = self.unpack("<I"), self.unpack("<Q")
            if item_type == _STRING and key == TOKENS_KEY:
                return self.token_list(length)
            if item_type in _SCALARS and length <= MAX_KEPT_ARRAY:
                fmt = _SCALARS[item_type]
                return struct.unpack(f"<{length}{fmt[1]}", self.take(struct.calcsize(fmt) * length))
            self.skip_array(item_type, length, key)
            return ArrayLength(item_type, length)
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise GgufError(f"unknown metadata value type {kind} of {key}")
        return self.unpack(fmt)

    def skip_array(self, item_type: int, length: int, key: str) -> None:
        if item_type in _SCALARS:
            self.take(struct.calcsize(_SCALARS[item_type]) * length)
        elif item_type == _STRING:
            for _ in range(length):
                self.take(self.unpack("<Q"))
        elif item_type == _ARRAY:  # gguf.cpp refuses them too; and nesting must not recurse
            raise GgufError(f"{key} is an array of arrays, which llama.cpp cannot read")
        else:
            raise GgufError(f"unknown array item type {item_type} of {key}")

    def token_list(self, length: int) -> TokenList:
        """Read the vocabulary's strings as llama.cpp keys them: as C strings, cut at a NUL byte,
        and an empty one as `[EMPTY_<id>]`."""
        if length > MAX_VOCAB:
            raise GgufError(f"a vocabulary of {length} tokens (vramsupply reads up to {MAX_VOCAB})")
        data, pos = self.data, self.pos
        first: dict[bytes, int] = {}
        duplicate: tuple[int, int] | None = None
        covered: set[int] = set()
        for i in range(length):  # the header's hottest loop: no method calls per token
            if pos + 8 > len(data):
                raise _NeedMore
            end = pos + 8 + _U64.unpack_from(data, pos)[0]
            if end > len(data):
                raise _NeedMore
            word = data[pos + 8 : end].partition(b"\0")[0] or b"[EMPTY_%d]" % i
            pos = end
            seen = first.setdefault(word, i)
            if seen != i and duplicate is None:
                duplicate = (seen, i)
            if len(word) == 1:
                covered.add(word[0])
            elif len(word) == 6 and word.startswith(b"<0x") and word[5] == 0x3E and _HEX_DIGITS.issuperset(word[3:5]):
                covered.add(int(word[3:5], 16))
        self.pos = pos
        return TokenList(_STRING, length, duplicate, frozenset(covered))


def parse_header(data: bytes) -> GgufHeader:
    """Parse a prefix of a GGUF file; raises _NeedMore when the header runs past it."""
    cursor = _Cursor(data)
    if cursor.take(4) != MAGIC:
        raise GgufError("not a GGUF file (no GGUF magic)")
    version = cursor.unpack("<I")
    if version not in (2, 3):
        raise GgufError(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cursor.unpack("<Q"), cursor.unpack("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cursor.string()
        kind = cursor.unpack("<I")
        if key == "general.alignment" and kind != _UINT32:  # as gguf.cpp requires
            raise GgufError(f"general.alignment is of type {_TYPE_NAMES.get(kind, kind)}, not uint32")
        metadata[key] = cursor.value(kind, key)
    tensors = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.unpack("<I")
        shape = tuple(cursor.unpack("<Q") for _ in range(n_dims))
        tensors.append(TensorInfo(name, shape, cursor.unpack("<I"), cursor.unpack("<Q")))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
        raise GgufError(f"general.alignment {alignment} is not a power of 2")
    data_offset = -(-cursor.pos // alignment) * alignment
    return GgufHeader(metadata, tuple(tensors), data_offset)


def read_header(fetch: Callable[[int], bytes], label: str) -> GgufHeader:
    """Parse the header from `fetch(n)` (the first n bytes, or fewer at end of file), doubling n until it fits."""
    size = FIRST_READ
    while True:
        try:
            data = fetch(size)
            return parse_header(data)
        except _NeedMore:
            if len(data) < size:
                raise GgufError(f"{label}: the file ends inside its GGUF header (truncated download?)") from None
            if size >= MAX_HEADER:
                raise GgufError(f"{label}: GGUF header larger than {MAX_HEADER >> 20} MiB") from None
            size *= 4
        except HeaderFetchError:
            raise
        except (GgufError, struct.error) as exc:
            raise GgufError(f"{label}: {exc}") from None


@lru_cache(maxsize=1)
def _ggml_types() -> tuple[ctypes.CDLL, int]:
    """ggml's own type table (block and type sizes), and how many types it has: ggml does not
    bounds-check a type, so only those below the count llama-cpp-python ships with are asked."""
    import llama_cpp
    from llama_cpp._ctypes_extensions import load_shared_library

    base = load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
    base.ggml_blck_size.argtypes = base.ggml_type_size.argtypes = [ctypes.c_int]
    base.ggml_blck_size.restype = ctypes.c_int64
    base.ggml_type_size.restype = ctypes.c_size_t
    return base, int(getattr(llama_cpp, "GGML_TYPE_COUNT", 0))


def tensor_nbytes(tensor: TensorInfo) -> int | None:
    """The bytes of a tensor's data as ggml counts them; None for a type or shape ggml would
    refuse itself (llama.cpp then says so when it loads the file)."""
    base, count = _ggml_types()
    if not 0 <= tensor.ggml_type < count or not tensor.shape:
        return None
    block = base.ggml_blck_size(tensor.ggml_type)
    if block <= 0 or tensor.shape[0] % block:
        return None
    return base.ggml_type_size(tensor.ggml_type) * (tensor.shape[0] // block) * prod(tensor.shape[1:])


def data_end(header: GgufHeader) -> tuple[str, int] | None:
    """The tensor whose data reaches furthest into the file, and the byte it ends at: a file
    shorter than that is truncated, and llama.cpp refuses it ("not within the file bounds")."""
    ends = [(header.data_offset + t.offset + (tensor_nbytes(t) or 0), t.name) for t in header.tensors]
    if not ends:
        return None
    end, name = max(ends)
    return name, end


def read_local_header(path: Path) -> GgufHeader:
    def fetch(n: int) -> bytes:
        with path.open("rb") as fh:
            return fh.read(n)

    try:
        return read_header(fetch, str(path))
    except OSError as exc:
        raise GgufError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_remote_header(client: httpx2.Client, url: str, headers: dict[str, str], label: str) -> GgufHeader:
    """The header of a file on the Hub, fetched with `Range: bytes=0-(n-1)` requests.

    The body is read only up to n bytes even if a server ignores the range's end, so a
    multi-GB model is never downloaded to plan for it."""
    import httpx2  # here, not at the top: only Hub models need it

    def fetch(n: int) -> bytes:
        with client.stream("GET", url, headers={**headers, "Range": f"bytes=0-{n - 1}"}) as response:
            if response.status_code not in (200, 206):
                raise HeaderFetchError(f"{label}: HTTP {response.status_code} while reading the header", response.status_code)
            chunks, got = [], 0
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                got += len(chunk)
                if got >= n:
                    break
            return b"".join(chunks)[:n]

    try:
        return read_header(fetch, label)
    except httpx2.RequestError as exc:  # TooManyRedirects and DecodingError are not TransportErrors
        message = f"{label}: {type(exc).__name__}: {exc}" if str(exc) else f"{label}: {type(exc).__name__}"
        raise HeaderFetchError(message, None, timed_out=isinstance(exc, httpx2.TimeoutException)) from None
