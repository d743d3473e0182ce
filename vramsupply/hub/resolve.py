"""`org/model` + quant → the GGUF repository, commit and file(s) to download.

Order: a repo that itself holds .gguf files is used as is; otherwise GGUF repos of the model are
found through the Hub's model tree (`base_model:quantized:<id>`) and a name search, ranked by a
preference list of publishers and then by downloads, and the first that has the quant wins.

`resolve_each` answers for every quant at once, for the memory plan: each quant from the repo
`resolve` would take it from, so that the quant the plan chooses is the file serve downloads (a
preferred publisher's repo with only Q6_K gives Q6_K, a lower one's Q4_K_M still counts). It
asks every candidate repo anyway, so it asks them all at once (hub/fetch.py) and then weighs the
answers in rank order; `resolve` asks them one by one and stops at the first with the quant, so
that serve asks no more repos than the one it downloads from and those ranked above it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from huggingface_hub import HfApi, ModelInfo
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id

from vramsupply.config import DEFAULT_GGUF_PUBLISHERS
from vramsupply.hub.access import DEFAULT_TIMEOUT, HubAccess, hub_errors
from vramsupply.hub.errors import HubAuthError, HubError, HubUnreachable, InvalidModelSpec, ModelNotFound, QuantNotFound
from vramsupply.hub.fetch import Answer, AskedOnce, ask_one_by_one, ask_together
from vramsupply.hub.quant import QuantGroup, available_quants, group_models, incomplete_sets, normalize_quant, select_quant

log = logging.getLogger(__name__)

OWN_ORG = "{org}"
DEFAULT_PUBLISHERS = DEFAULT_GGUF_PUBLISHERS
# Enough to reach past forks and fine-tunes in the search results without hammering the Hub.
SEARCH_LIMIT = 50
MAX_CANDIDATES_CHECKED = 8

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_QUANTIZED_TAG = "base_model:quantized:"
_GGUF_SUFFIX = re.compile(r"[-_.]gguf$", re.IGNORECASE)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo. Its path and sha256 name files in the cache, so they are checked:
    nothing the Hub (or an edited cache record) says may point outside the cache."""

    path: str
    size: int
    sha256: str

    def __post_init__(self) -> None:
        if not _SHA256.match(self.sha256) or self.size < 0 or self.path.startswith("/") or ".." in PurePosixPath(self.path).parts:
            raise ValueError(f"unusable file metadata: path {self.path!r}, size {self.size}, sha256 {self.sha256!r}")


@dataclass(frozen=True)
class ResolvedModel:
    """What to download: `files` are all parts of the model in order; the first one is loaded."""

    model_id: str
    repo_id: str
    revision: str
    quant: str
    files: tuple[RemoteFile, ...]
    available_quants: tuple[str, ...]

    @property
    def total_size(self) -> int:
        return sum(file.size for file in self.files)

    @property
    def primary(self) -> RemoteFile:
        return self.files[0]


def parse_repo_id(model: str) -> str:
    """`org/model`, as our regex and huggingface_hub's own validator (which the Hub calls use) accept it."""
    if not _REPO_ID.match(model) or ".." in model:
        raise InvalidModelSpec(f"{model!r} is neither a HuggingFace model id (org/model) nor a path to a .gguf file")
    try:
        validate_repo_id(model)
    except HFValidationError as exc:
        reason = str(exc).splitlines()[0].rstrip(".").partition(": '")[0]
        raise InvalidModelSpec(f"{model!r} is not a valid HuggingFace model id ({reason})") from None
    return model


def is_gguf_repo_name(repo_id: str, org: str, name: str) -> bool:
    """`unsloth/Qwen3-8B-GGUF` and `bartowski/Qwen_Qwen3-8B-GGUF` name Qwen/Qwen3-8B; `Qwen3-8B-abliterated-GGUF` does not."""
    repo_name = _GGUF_SUFFIX.sub("", repo_id.split("/", 1)[1]).lower()
    prefix = org.lower() + "_"
    if repo_name.startswith(prefix):
        repo_name = repo_name[len(prefix) :]
    return repo_name == name.lower()


def publisher_rank(repo_id: str, org: str, publishers: Sequence[str]) -> int:
    names = [org.lower() if publisher == OWN_ORG else publisher.lower() for publisher in publishers]
    author = repo_id.split("/", 1)[0].lower()
    return names.index(author) if author in names else len(names)


def rank_candidates(candidates: Iterable[ModelInfo], base_id: str, publishers: Sequence[str]) -> list[ModelInfo]:
    """Preferred publishers first, in the configured order; then the most downloaded."""
    org = base_id.split("/", 1)[0]
    unique = {info.id.lower(): info for info in candidates}
    return sorted(unique.values(), key=lambda info: (publisher_rank(info.id, org, publishers), -(info.downloads or 0), info.id.lower()))


def is_quantized_repo(info: ModelInfo) -> bool:
    """A GGUF repo proper, rather than an original model that also ships a .gguf or two
    (whose missing quant is then looked for in other publishers' repos)."""
    return bool(_GGUF_SUFFIX.search(info.id)) or any(tag.startswith(_QUANTIZED_TAG) for tag in info.tags or ())


def canonical_id(info: ModelInfo) -> str:
    """The marketplace id of a GGUF repo: its base model when the Hub records exactly one."""
    bases = [tag[len(_QUANTIZED_TAG) :] for tag in info.tags or () if tag.startswith(_QUANTIZED_TAG)]
    return (bases[0] if len(bases) == 1 else info.id).lower()


def _paths(info: ModelInfo) -> list[str]:
    return [sibling.rfilename for sibling in info.siblings or ()]


def _remote_files(info: ModelInfo, group: QuantGroup) -> tuple[RemoteFile, ...]:
    """The files with their LFS size and sha256."""
    siblings = {sibling.rfilename: sibling for sibling in info.siblings or ()}
    files = []
    for path in group.paths:
        lfs = siblings[path].lfs
        if lfs is None:
            raise HubError(f"{info.id}/{path} has no sha256 in the Hub's metadata (not stored with LFS), so it cannot be verified")
        try:
            files.append(RemoteFile(path=path, size=lfs.size, sha256=lfs.sha256))
        except ValueError as exc:
            raise HubError(f"the Hub sent unusable metadata for {info.id}/{path}: {exc}") from None
    return tuple(files)


def _resolved(info: ModelInfo, group: QuantGroup, model_id: str, quant: str) -> ResolvedModel:
    revision = info.sha or ""
    if not _COMMIT.match(revision):
        raise HubError(f"the Hub sent no usable commit for {info.id} (sha {info.sha!r})")
    return ResolvedModel(
        model_id=model_id,
        repo_id=info.id,
        revision=revision,
        quant=quant,
        files=_remote_files(info, group),
        available_quants=tuple(available_quants(group_models(_paths(info)))),
    )


def _describe_quants(info: ModelInfo) -> str:
    quants = available_quants(group_models(_paths(info)))
    described = ", ".join(quants) if quants else "no quant-tagged GGUF files"
    incomplete = incomplete_sets(_paths(info))
    return described + (f" (and incomplete split sets: {'; '.join(incomplete[:3])})" if incomplete else "")


def _unreadable(info: ModelInfo) -> str | None:
    """What in a Hub answer has the wrong type, if anything. huggingface_hub passes the JSON's
    fields on unchecked, and a file name that is a number would fail far from here."""
    if not isinstance(info.id, str) or not isinstance(info.sha, (str, type(None))):
        return f"id {info.id!r}, sha {info.sha!r}"
    if not isinstance(info.downloads, (int, type(None))) or not all(isinstance(tag, str) for tag in info.tags or ()):
        return f"downloads {info.downloads!r}, tags {info.tags!r}"
    for sibling in info.siblings or ():
        lfs = sibling.lfs
        if not isinstance(sibling.rfilename, str) or not isinstance(sibling.size, (int, type(None))):
            return f"file {sibling.rfilename!r} of size {sibling.size!r}"
        if lfs is not None and not (isinstance(lfs.size, int) and isinstance(lfs.sha256, str)):
            return f"file {sibling.rfilename!r} with LFS size {lfs.size!r}, sha256 {lfs.sha256!r}"
    return None


class Resolver:
    """One resolution against one Hub; holds the API client and the access settings."""

    def __init__(self, access: HubAccess, publishers: Sequence[str]) -> None:
        self.access = access
        self.publishers = publishers
        self.api: HfApi = access.api()
        # Repos the Hub called missing with HTTP 401 (perhaps private); added to from the threads
        # that ask together (set.add is atomic), read once they are done.
        self.unauthorized: set[str] = set()
        # Each repo and search is asked about once per Resolver: the plan's `resolve_each` after a
        # `resolve` reuses what it fetched. `_infos` may be asked from several threads at once.
        self._infos: AskedOnce[str, ModelInfo | None] = AskedOnce(self._fetch_info)
        self._denied: set[str] = set()  # read and written by the calling thread only
        self._candidates: dict[str, list[ModelInfo]] = {}

    def repo_info(self, repo_id: str) -> ModelInfo | None:
        """The repo's description with its files, None where the Hub says there is no such repo.
        Safe to call from several threads: a repo is asked about once, and kept (a failure is not)."""
        return self._infos.get(repo_id)

    def _fetch_info(self, repo_id: str) -> ModelInfo | None:
        with hub_errors(repo_id, self.access):
            try:
                return self._readable(self.api.model_info(repo_id, files_metadata=True, timeout=self.access.timeout), repo_id)
            except GatedRepoError:  # a RepositoryNotFoundError too, but a refusal: hub_errors says it
                raise
            except RepositoryNotFoundError as exc:
                # The Hub answers 401 RepoNotFound for a private repo asked about without access.
                if exc.response is not None and exc.response.status_code == 401:
                    self.unauthorized.add(repo_id)
                return None

    def _readable(self, info: ModelInfo, asked: str) -> ModelInfo:
        problem = _unreadable(info)
        if problem is not None:
            raise HubError(f"the Hub at {self.access.endpoint} sent metadata for {asked} that cannot be read ({problem[:200]})")
        return info

    def find_candidates(self, base_id: str) -> list[ModelInfo]:
        if base_id not in self._candidates:
            self._candidates[base_id] = self._search(base_id)
        return self._candidates[base_id]

    def _search(self, base_id: str) -> list[ModelInfo]:
        org, name = base_id.split("/", 1)
        with hub_errors(base_id, self.access):
            related = [self._readable(info, base_id) for info in self.api.list_models(filter=["gguf", _QUANTIZED_TAG + base_id], sort="downloads", limit=SEARCH_LIMIT)]
            found = [self._readable(info, base_id) for info in self.api.list_models(search=name, filter="gguf", sort="downloads", limit=SEARCH_LIMIT)]
        named = [info for info in found if is_gguf_repo_name(info.id, org, name)]
        return rank_candidates(related + named, base_id, self.publishers)

    def _online_id(self, model: str) -> str:
        repo_id = parse_repo_id(model)
        if self.access.offline:
            raise HubUnreachable(
                f"HF_HUB_OFFLINE is set, so {self.access.endpoint} is not asked about {model}: "
                "unset HF_HUB_OFFLINE and run this command again while online"
            )
        return repo_id

    def resolve(self, model: str, quant: str) -> ResolvedModel:
        repo_id = self._online_id(model)
        wanted = normalize_quant(quant)
        if not wanted:
            raise InvalidModelSpec("--quant is empty: name a quantization such as Q4_K_M")
        info = self.repo_info(repo_id)
        if info is not None and group_models(_paths(info)):
            group = select_quant(_paths(info), wanted)
            if group is not None:
                return _resolved(info, group, canonical_id(info), wanted)
            if is_quantized_repo(info):
                raise QuantNotFound(f"{info.id} has no {wanted} GGUF file; it has {_describe_quants(info)}")
        base_id = info.id if info is not None else repo_id
        candidates = self.find_candidates(base_id)
        if not candidates:
            raise ModelNotFound(self._nothing_found(model, base_id, info))
        return self._first_with_quant(candidates, wanted, model.lower())

    def _accessible(self, candidates: list[ModelInfo], skipped: list[HubError] | None = None) -> Iterator[ModelInfo]:
        """The ranked candidates a quant may come from, with their files: the first
        MAX_CANDIDATES_CHECKED, less those the Hub hides or refuses (gated, private). With
        ``skipped`` (weighing every quant, which needs every candidate), they are all asked at once
        and a candidate the Hub fails to describe (a 5xx, a timeout, a listing it cannot read) is
        left out and its error kept there, rather than ending the search: one third-party repo
        must not cost the plan the repos serve can use. Without, each is asked only once the ones
        above it lacked the quant (serve's `resolve`). Either way the answers are handled here,
        in rank order, as they were when every call was made one after another."""
        asked = [candidate.id for candidate in candidates[:MAX_CANDIDATES_CHECKED] if candidate.id not in self._denied]
        answers = ask_one_by_one(self.repo_info, asked) if skipped is None else ask_together(self.repo_info, asked)
        for repo_id, answer in zip(asked, answers):
            info = self._accessible_info(repo_id, answer, skipped)
            if info is not None:
                yield info

    def _accessible_info(self, repo_id: str, answer: Answer[ModelInfo | None], skipped: list[HubError] | None) -> ModelInfo | None:
        try:
            return answer.result()
        except HubAuthError:
            self._denied.add(repo_id)
            return None
        except HubError as exc:
            if skipped is None:
                raise
            log.info("leaving %s out of the quants weighed: %s", repo_id, exc)
            skipped.append(exc)
            return None

    def _first_with_quant(self, candidates: list[ModelInfo], quant: str, model_id: str) -> ResolvedModel:
        checked = []
        for info in self._accessible(candidates):
            group = select_quant(_paths(info), quant)
            if group is not None:
                return _resolved(info, group, model_id, quant)
            checked.append(f"{info.id} has {_describe_quants(info)}")
        if not checked:
            raise ModelNotFound(f"no accessible GGUF repository found for {model_id}{self._refused_note(candidates)}; pass --model <org>/<gguf-repo> or a local .gguf path")
        raise QuantNotFound(f"no GGUF repository of {model_id} has {quant}: " + "; ".join(checked))

    def resolve_each(self, model: str) -> tuple[ResolvedModel, ...]:
        """Every quant `model` can be had in, each as `resolve(model, quant)` resolves it: from a
        repo that holds GGUFs itself (only from it, where it is a GGUF repo proper), else from the
        first ranked candidate that has it; so the repos' publisher order holds per quant. A quant
        whose file `resolve` would refuse (no sha256, no commit) is left out: serve cannot get it."""
        repo_id = self._online_id(model)
        info = self.repo_info(repo_id)
        own = [(info, canonical_id(info))] if info is not None and group_models(_paths(info)) else []
        if own and is_quantized_repo(own[0][0]):
            return self._each_quant(own, model)
        base_id = info.id if info is not None else repo_id
        candidates = self.find_candidates(base_id)
        if not candidates and not own:
            raise ModelNotFound(self._nothing_found(model, base_id, info))
        skipped: list[HubError] = []
        sources = own + [(found, model.lower()) for found in self._accessible(candidates, skipped)]
        if not sources and skipped:
            raise skipped[0]
        return self._each_quant(sources, model)

    def _each_quant(self, sources: list[tuple[ModelInfo, str]], model: str) -> tuple[ResolvedModel, ...]:
        """Per quant, the first source (repo, model id) that has it."""
        taken: dict[str, ResolvedModel | HubError] = {}
        for info, model_id in sources:
            for quant in available_quants(group_models(_paths(info))):
                group = select_quant(_paths(info), quant)
                if quant in taken or group is None:
                    continue
                try:
                    taken[quant] = _resolved(info, group, model_id, quant)
                except HubError as exc:  # resolve(model, quant) stops at this repo too
                    taken[quant] = exc
        usable = tuple(found for found in taken.values() if isinstance(found, ResolvedModel))
        if usable:
            return usable
        refused = [found for found in taken.values() if isinstance(found, HubError)]
        if refused:
            raise refused[0]
        if not sources:
            raise ModelNotFound(f"no accessible GGUF repository found for {model.lower()}; pass --model <org>/<gguf-repo> or a local .gguf path")
        described = "; ".join(f"{info.id} has {_describe_quants(info)}" for info, _ in sources)
        raise QuantNotFound(f"no GGUF repository of {model.lower()} has a quant-tagged model file: {described}")

    def _refused_note(self, candidates: list[ModelInfo]) -> str:
        """What the Hub refused among ``candidates`` (gated or private to this token), and what to do."""
        refused = [c.id for c in candidates if c.id in self._denied]
        if not refused:
            return ""
        return (
            f" (the Hub refused access to {', '.join(refused[:3])}{' and others' if len(refused) > 3 else ''}: accept the model's licence "
            "there and set HF_TOKEN to an access token of that account)"
        )

    def _nothing_found(self, model: str, base_id: str, info: ModelInfo | None) -> str:
        name = base_id.split("/", 1)[1]
        named = name if name.lower().endswith("-gguf") else f"{name}-GGUF"
        incomplete = incomplete_sets(_paths(info)) if info is not None else []
        if incomplete:
            where = f"{base_id} holds only incomplete split sets ({'; '.join(incomplete[:3])})"
        else:
            where = f"{base_id} holds no .gguf files" if info is not None else f"{model} is not a repository on {self.access.endpoint}"
            if info is None and parse_repo_id(model) in self.unauthorized:
                where = (
                    f"{self.access.endpoint} answered HTTP 401 for {model} (no such repository, or one this request may not see: "
                    "if it is private or gated, set HF_TOKEN to an access token of an account that can see it)"
                )
        return (
            f"no GGUF repository found for {model}: {where}, and the Hub lists no GGUF repos tagged "
            f"{_QUANTIZED_TAG}{base_id} or named {named}; pass --model <org>/<gguf-repo> or a path to a local .gguf file"
        )


def resolve(
    model_id: str, quant: str, *, access: HubAccess | None = None, publishers: Sequence[str] = DEFAULT_PUBLISHERS
) -> ResolvedModel:
    """Find the GGUF repo, commit and file(s) for `model_id` at `quant` (one-line HubError otherwise)."""
    return Resolver(access or HubAccess.from_env(DEFAULT_TIMEOUT), publishers).resolve(model_id, quant)
