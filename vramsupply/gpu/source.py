"""Where a plan's model comes from: a local .gguf, or a Hub repo read without downloading the weights.

For a Hub model every quant is resolved as `serve --quant Q` would resolve it (hub/resolve.py
`resolve_each`): a preferred publisher's repo may lack a quant that a lower-ranked one has, and
the quant the plan chooses must be the file serve then downloads, not another repo's file of the
same name. Sizes come from the Hub's file listing; the shape from one file's GGUF header, read
over HTTP Range. All quants of a repo share the shape; another repo's file may not (a longer
trained context, other metadata), so the plan reads the header of the chosen quant's own repo
when it differs (``ModelSource.with_shape_of``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from vramsupply.userpath import expand_user
from vramsupply.errors import VramsupplyError
from vramsupply.gpu.estimate import ModelShape
from vramsupply.gpu.gguf_header import GgufError, GgufHeader, HeaderFetchError, data_end, read_local_header, read_remote_header
from vramsupply.hub.errors import HubAuthError, HubError, HubOffline, HubUnreachable, InvalidModelSpec
from vramsupply.hub.local import is_local_path
from vramsupply.hub.quant import incomplete_sets, normalize_quant, parse_gguf_path

if TYPE_CHECKING:
    from vramsupply.hub.access import HubAccess  # imported where used: only Hub models need it
    from vramsupply.hub.resolve import ResolvedModel

# llama.cpp's general.file_type (enum llama_ftype) -> quant tag, for local files named without one.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M",
    13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS",
    21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4",
    40: "Q1_0", 41: "Q2_0",
}
# ggml's tensor type -> the file type llama.cpp guesses from it for a file without
# general.file_type (llama_model_loader: the type most tensors have; K-quants as their _M mix).
GUESSED_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K_M", 12: "Q4_K_M",
    13: "Q5_K_M", 14: "Q6_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4_MOE", 40: "NVFP4",
    41: "Q1_0", 42: "Q2_0",
}


class SourceError(VramsupplyError):
    """The model cannot be read for planning; one line."""


class SourceUnreachable(SourceError):
    """The Hub cannot be asked now (offline, unreachable); serve plans on the cached file instead."""


SHAPE_QUANT = "Q4_K_M"
"""Without a quant asked for, the quant whose file's header gives a Hub model's shape: the one
most repos have, so usually in the top-ranked repo (and the file planned on before)."""


@dataclass(frozen=True)
class QuantFile:
    quant: str
    file_bytes: int  # all parts
    parts: int
    resolved: ResolvedModel | None = None  # a Hub model's: the repo and file(s) serve downloads for it

    @property
    def repo_id(self) -> str | None:
        return self.resolved.repo_id if self.resolved else None


@dataclass(frozen=True)
class ModelSource:
    """A model's shape and the quants it can be had in."""

    label: str
    shape: ModelShape
    quants: tuple[QuantFile, ...]
    local_path: Path | None = None
    shape_repo: str | None = None  # a Hub model's: the repo whose header gave the shape
    read_shape: Callable[[ResolvedModel], ModelShape] | None = field(default=None, compare=False, repr=False)

    def weights_bytes(self, quant: QuantFile) -> int:
        """Tensor data: the file(s) minus their headers (every part of a split model has one)."""
        return max(0, quant.file_bytes - self.shape.header_bytes * quant.parts)

    def with_shape_of(self, quant: str) -> ModelSource | None:
        """This source with the shape read from `quant`'s own file, where another repo's header gave
        it; None where it already is that repo's (or the model is a local file)."""
        offer = next((q for q in self.quants if q.quant == quant), None)
        if offer is None or offer.resolved is None or self.read_shape is None or offer.repo_id == self.shape_repo:
            return None
        return replace(self, shape=self.read_shape(offer.resolved), shape_repo=offer.repo_id)


def quant_of_header(header: GgufHeader, path: Path) -> str:
    """The quant a local file is: its name's tag, else the file type its header states, else (none
    stated) the one llama.cpp guesses from its tensors: the bundled model states none, and is F32."""
    parsed = parse_gguf_path(path.name)
    if parsed is not None and parsed.quant:
        return parsed.quant
    file_type = header.get("general.file_type")
    if file_type is None:
        return GUESSED_FILE_TYPES.get(header.most_common_type(), "unknown")
    return FILE_TYPES.get(file_type, "unknown") if isinstance(file_type, int) else "unknown"


def local_source(model: str) -> ModelSource:
    path = expand_user(model)
    if not path.is_file():
        raise SourceError(_not_a_model_file(path))
    try:
        header = read_local_header(path)
    except GgufError as exc:
        raise SourceError(str(exc)) from None
    size = path.stat().st_size
    parts = split_parts(path)
    quant = QuantFile(quant_of_header(header, path), sum(part.stat().st_size for part in parts), len(parts))
    return ModelSource(str(path), _shape(header, size, str(path)), (quant,), path)


def split_parts(path: Path) -> list[Path]:
    """Every file of the model ``path`` is: itself, or all parts of a split model given as its
    first (``m-00001-of-00003.gguf``: llama.cpp loads the others from its folder by name), whose
    weights the plan must count whole. Another part, or a missing one, is said: no model loads."""
    parsed = parse_gguf_path(path.name)
    if parsed is None or parsed.parts == 1:
        return [path]
    parts = [path.with_name(f"{parsed.prefix}-{index:05d}-of-{parsed.parts:05d}.gguf") for index in range(1, parsed.parts + 1)]
    if parsed.part != 1:
        raise SourceError(f"{path} is part {parsed.part} of a model split in {parsed.parts} files: give the first, {parts[0].name} (llama.cpp loads the others from it)")
    [incomplete] = incomplete_sets([part.name for part in parts if part.is_file()]) or [None]
    if incomplete is not None:
        raise SourceError(f"{path} is part 1 of a model split in {parsed.parts} files, but in {path.parent} {incomplete}: every part must be in the same folder")
    return parts


def _not_a_model_file(path: Path) -> str:
    """What is at `path` instead of a model file, as `bench` and `serve` say it."""
    from vramsupply.hub.local import not_a_model_file

    return not_a_model_file(path)


def hub_source(model: str, quant: str | None, timeout: float, publishers: Sequence[str]) -> ModelSource:
    """Every quant of `model` as serve would resolve it, the shape read from one file's header:
    `quant`'s, where one is asked for (resolved first, so that a missing quant is the error
    `serve --quant` gives), else SHAPE_QUANT's, else the top-ranked repo's first quant."""
    # Imported here: planning for a local file never needs huggingface_hub (hub/local.py).
    from vramsupply.hub.access import HubAccess
    from vramsupply.hub.resolve import Resolver

    access = HubAccess.from_env(timeout)
    resolver = Resolver(access, publishers)
    asked = resolver.resolve(model, quant) if quant else None
    each = resolver.resolve_each(model)  # reuses the repos `resolve` fetched
    first = asked or next((r for r in each if r.quant == SHAPE_QUANT), each[0])
    quants = tuple(QuantFile(r.quant, r.total_size, len(r.files), r) for r in each)

    def read_shape(resolved: ResolvedModel) -> ModelShape:
        with _source_errors(model, None):
            return _remote_shape(access, resolved)

    return ModelSource(first.model_id, _remote_shape(access, first), quants, shape_repo=first.repo_id, read_shape=read_shape)


def _remote_shape(access: HubAccess, resolved: ResolvedModel) -> ModelShape:
    """The shape in the header of `resolved`'s first file, read over HTTP Range."""
    import httpx2

    from vramsupply.hub.access import hub_errors

    url = access.file_url(resolved.repo_id, resolved.revision, resolved.primary.path)
    label = f"{resolved.repo_id}/{resolved.primary.path}"
    with hub_errors(resolved.repo_id, access), httpx2.Client(follow_redirects=True, timeout=httpx2.Timeout(access.timeout)) as client:
        try:
            header = read_remote_header(client, url, access.headers(), label)
        except HeaderFetchError as exc:
            raise _refused_header(exc, resolved.repo_id, access) from None
        except GgufError as exc:
            raise SourceError(str(exc)) from None
    return _shape(header, resolved.primary.size, label)


def _refused_header(exc: HeaderFetchError, repo_id: str, access: HubAccess) -> HubError:
    """The Hub's answer to the header read, judged as hub/access.py judges its API's: 401/403 is a
    gated or private repo (the licence and token advice); 429, 5xx and no answer mean the Hub is
    down for now, so serve falls back on a verified cached copy (HubUnreachable). No answer in time
    names the Hub and what to check: the bare "ReadTimeout: timed out" said neither."""
    from vramsupply.hub.access import auth_help

    if exc.status in (401, 403):
        return HubAuthError(auth_help(repo_id, access.endpoint))
    if exc.timed_out:
        return HubUnreachable(
            f"cannot read the model's header from the Hub at {access.endpoint}: {exc}; check the network, "
            f"or raise VRAM_SUPPLY_DOWNLOAD_TIMEOUT ({access.timeout:g} s) for a slow link"
        )
    if exc.status is None or exc.status == 429 or exc.status >= 500:
        return HubUnreachable(str(exc))
    return HubError(str(exc))


def _shape(header: GgufHeader, file_bytes: int, label: str) -> ModelShape:
    end = data_end(header)
    if end is not None and end[1] > file_bytes:
        name, needed = end
        raise SourceError(f"{label} is truncated: its tensor '{name}' ends at byte {needed:,} but the file has {file_bytes:,} bytes; download it again")
    try:
        return ModelShape.from_header(header, file_bytes)
    except ValueError as exc:
        raise SourceError(f"{label}: {exc}") from None


def model_source(model: str, quant: str | None, timeout: float, publishers: Sequence[str], cache_dir: Path | None = None) -> ModelSource:
    """A local path or a Hub id, as `serve --model` takes it; Hub calls time out after ``timeout`` s.
    `quant`: the one asked for (None: every quant is a candidate). ``cache_dir`` is the cache_dir
    setting (None: the shared HF cache), where an offline plan looks for a copy serve could use."""
    if is_local_path(model):
        return local_source(model)
    with _source_errors(model, cache_dir):
        return hub_source(model, normalize_quant(quant) if quant else None, timeout, publishers)


@contextmanager
def _source_errors(model: str, cache_dir: Path | None) -> Iterator[None]:
    """The Hub's errors as the plan's: unreachable (serve then goes on with a cached copy) or not.
    A malformed model argument stays itself: a usage error (exit 2), not a plan that failed (1)."""
    try:
        yield
    except InvalidModelSpec:
        raise
    except (HubUnreachable, HubOffline) as exc:
        raise SourceUnreachable(_with_cached_copy(str(exc), model, cache_dir)) from None
    except HubError as exc:
        raise SourceError(str(exc)) from None


def _with_cached_copy(message: str, model: str, cache_dir: Path | None) -> str:
    """Offline, `plan` cannot read the Hub; where a verified cached copy exists, say that serve
    would use it and which quant it is, so the provider knows serving still works offline. The
    cache is the one serve reads: the cache_dir setting (flag, environment or config file), as
    given by the caller; the environment alone would miss a config file's."""
    from vramsupply.gpu.plan import QUALITY_ORDER
    from vramsupply.hub.cache import best_cached_quant
    from vramsupply.hub.store import default_cache_dir

    if not message.startswith("HF_HUB_OFFLINE is set"):
        return message
    cache = cache_dir or default_cache_dir()
    quant = best_cached_quant(cache, model, QUALITY_ORDER)
    if quant is None:
        return message
    return f"{message}; offline, serve --model {model} uses the cached {quant} in {cache} (vramsupply models list shows it)"
