"""A Hub (or what stands in its place) that answers as no real Hub does: every such answer ends in
one readable HubError, never a traceback and never a download that starts over forever.

The fake Hub of tests/fakehub.py, with answers switched per file path or for the whole API.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from conftest import run_cli
from fakehub import TINY_MODEL, FakeFile, FakeHub, FakeRepo, point_hf_at, standard_repos
from test_hub_cli import env_for
from vramsupply.gpu.source import SourceError, model_source
from vramsupply.hub import DownloadError, HubError, HubUnreachable, InvalidModelSpec, ModelNotFound, prepare_model
from vramsupply.hub.resolve import resolve
from vramsupply.hub.store import RepoCache

TINY = TINY_MODEL.read_bytes()


class HostileHub(FakeHub):
    """Set `api_body` to answer every model-info call with it (HTTP 200); `api_redirects` to
    redirect them to themselves. Per file path: `looping` downloads redirect to themselves,
    `garbled` bodies say gzip but are not, `unsized` ones come without a length and ignore Range,
    `failing` ones answer HTTP 500."""

    def __init__(self, repos: list[FakeRepo]) -> None:
        super().__init__(repos)
        self.api_body: tuple[bytes, str] | None = None
        self.api_redirects = False
        self.looping: set[str] = set()
        self.garbled: set[str] = set()
        self.unsized: set[str] = set()
        self.failing: set[str] = set()

    async def _info(self, request: web.Request) -> web.Response:
        if self.api_redirects:
            self._log(request)
            raise web.HTTPFound(str(request.url))
        if self.api_body is not None:
            self._log(request)
            return web.Response(body=self.api_body[0], content_type=self.api_body[1])
        return await super()._info(request)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        if path in self.looping:
            self._log(request)
            raise web.HTTPFound(str(request.url))
        if path in self.failing:
            self._log(request)
            raise web.HTTPInternalServerError()
        if path in self.garbled:
            self._log(request)
            return web.Response(body=b"not gzip at all", headers={"Content-Encoding": "gzip"})
        if path in self.unsized:
            self._log(request)
            response = web.StreamResponse(status=200)
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(self._repo(request).files[path].data)
            await response.write_eof()
            return response
        return await super()._resolve(request)


SHORT = "Short-Q4_K_M.gguf"


def hostile_repos() -> list[FakeRepo]:
    return [
        *standard_repos(),
        # The Hub lists 1000 bytes more than the server has.
        FakeRepo("x/Short-GGUF", {SHORT: FakeFile(TINY, claimed_size=len(TINY) + 1000)}, ["gguf"]),
        FakeRepo("x/Zero-GGUF", {"Zero-Q4_K_M.gguf": FakeFile(b"")}, ["gguf"]),
        FakeRepo("x/Hdr-GGUF", {"Hdr-Q4_K_M.gguf": FakeFile(TINY)}, ["gguf"]),
        FakeRepo("x/Shard-GGUF", {"Shard-Q4_K_M-00001-of-00003.gguf": FakeFile(TINY), "Shard-Q4_K_M-00003-of-00003.gguf": FakeFile(b"p3" * 100)}, ["gguf"]),
    ]


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostileHub]:
    with HostileHub(hostile_repos()) as fake:
        point_hf_at(monkeypatch, fake)
        yield fake


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"


# --- a file whose size is not the size the Hub lists ------------------------------------------


@pytest.mark.timeout(60)
def test_a_file_shorter_than_the_hub_lists_fails_at_once_instead_of_downloading_forever(hub: HostileHub, cache: Path) -> None:
    with pytest.raises(DownloadError, match=rf"x/Short-GGUF/{SHORT} failed: the Hub lists {len(TINY) + 1000} bytes but the server's file differs \(it serves {len(TINY)} bytes\)"):
        prepare_model("x/Short-GGUF", "Q4_K_M", cache_dir=cache, timeout=5)
    assert len(hub.downloads_of(SHORT)) == 1


@pytest.mark.timeout(60)
def test_a_resume_answered_416_is_a_size_mismatch_and_keeps_the_partial_file(hub: HostileHub, cache: Path) -> None:
    """A partial file holding every byte the server has: the resume gets HTTP 416."""
    partial = RepoCache(cache, "x/Short-GGUF").incomplete(hub.file("x/Short-GGUF", SHORT).sha256)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(TINY)

    with pytest.raises(DownloadError, match=rf"the server's file differs \(it has nothing from byte {len(TINY)} on \(HTTP 416\)\)"):
        prepare_model("x/Short-GGUF", "Q4_K_M", cache_dir=cache, timeout=5)
    assert [request.headers.get("Range") for request in hub.downloads_of(SHORT)] == [f"bytes={len(TINY)}-"]
    assert partial.read_bytes() == TINY


@pytest.mark.timeout(60)
def test_a_body_without_a_length_that_ends_short_twice_at_the_same_byte_fails(hub: HostileHub, cache: Path) -> None:
    hub.unsized.add(SHORT)
    with pytest.raises(DownloadError, match=rf"the server's file differs \(its body ends at byte {len(TINY)}, twice\)"):
        prepare_model("x/Short-GGUF", "Q4_K_M", cache_dir=cache, timeout=5)
    assert len(hub.downloads_of(SHORT)) == 2


def test_a_zero_byte_model_file_is_said_to_be_no_gguf(hub: HostileHub, cache: Path) -> None:
    with pytest.raises(HubError, match=r"Zero-Q4_K_M.gguf is not a GGUF file \(it does not start with the GGUF magic bytes\)"):
        prepare_model("x/Zero-GGUF", "Q4_K_M", cache_dir=cache)


# --- HTTP errors that are not transport errors ---------------------------------------------------


def test_a_download_that_redirects_to_itself_fails_in_one_line(hub: HostileHub, cache: Path) -> None:
    hub.looping.add(SHORT)
    with pytest.raises(DownloadError, match=rf"^download of x/Short-GGUF/{SHORT} failed: TooManyRedirects: "):
        prepare_model("x/Short-GGUF", "Q4_K_M", cache_dir=cache, timeout=5)


def test_an_api_that_redirects_to_itself_counts_as_unreachable(hub: HostileHub) -> None:
    hub.api_redirects = True
    with pytest.raises(HubUnreachable, match=r"cannot reach the Hub at .* \(TooManyRedirects: "):
        resolve("acme/Widget-7B", "Q4_K_M")


def test_a_body_that_is_not_the_gzip_it_claims_fails_header_reads_and_downloads_in_one_line(hub: HostileHub, cache: Path) -> None:
    hub.garbled.add("Hdr-Q4_K_M.gguf")
    with pytest.raises(SourceError, match=r"^x/Hdr-GGUF/Hdr-Q4_K_M.gguf: DecodingError: "):
        model_source("x/Hdr-GGUF", "Q4_K_M", 5, ())
    with pytest.raises(DownloadError, match=r"^download of x/Hdr-GGUF/Hdr-Q4_K_M.gguf failed: DecodingError: "):
        prepare_model("x/Hdr-GGUF", "Q4_K_M", cache_dir=cache, timeout=5)


def test_a_header_read_the_server_refuses_names_the_file(hub: HostileHub) -> None:
    hub.failing.add("Hdr-Q4_K_M.gguf")
    with pytest.raises(SourceError, match=r"^x/Hdr-GGUF/Hdr-Q4_K_M.gguf: HTTP 500 while reading the header$"):
        model_source("x/Hdr-GGUF", "Q4_K_M", 5, ())


# --- API answers that are not the Hub's JSON -----------------------------------------------------


def test_a_captive_portals_html_page_is_one_line_not_a_json_traceback(hub: HostileHub, tmp_path: Path) -> None:
    hub.api_body = (b"<html><body>Please log in to the hotel Wi-Fi</body></html>", "text/html")
    with pytest.raises(HubError, match=r"answered the request for acme/Widget-7B with something that is not JSON .*captive portal"):
        resolve("acme/Widget-7B", "Q4_K_M")

    result = run_cli("models", "resolve", "acme/Widget-7B", env=env_for(hub, tmp_path / "hf-home"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: the Hub at ") and len(result.stderr.strip().splitlines()) == 1


LISTED = {"id": "x/Y-GGUF", "sha": "a" * 40, "tags": ["gguf"]}
MALFORMED_FILES = {
    "lfs without pointerSize": [{"rfilename": "Y-Q4_K_M.gguf", "lfs": {"sha256": "a" * 64, "size": 10}}],
    "lfs as a string": [{"rfilename": "Y-Q4_K_M.gguf", "lfs": "yes"}],
    "file name as a number": [{"rfilename": 5}],
    "size as a string": [{"rfilename": "Y-Q4_K_M.gguf", "lfs": {"sha256": "a" * 64, "size": "big", "pointerSize": 134}}],
    "files as a string": "Y-Q4_K_M.gguf",
}


@pytest.mark.parametrize("case", sorted(MALFORMED_FILES))
def test_a_malformed_file_list_is_one_line(hub: HostileHub, case: str) -> None:
    hub.api_body = (json.dumps({**LISTED, "siblings": MALFORMED_FILES[case]}).encode(), "application/json")
    with pytest.raises(HubError, match=r"^the Hub at \S+ sent metadata for x/Y-GGUF that cannot be read \("):
        resolve("x/Y-GGUF", "Q4_K_M")


# --- model ids and quants the Hub cannot take --------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("acme/Widget--7B", "Cannot have -- or .. in repo_id"),
        ("acme/Widget-7B-", "cannot start or end with '-' or '.'"),
        ("acme/Widget-7B.", "cannot start or end with '-' or '.'"),
        ("acme/Widget.git", "cannot end by '.git'"),
        ("acme/" + "w" * 97, "maximum length is 96"),
    ],
)
def test_a_model_id_the_hub_would_reject_is_refused_before_asking_it(hub: HostileHub, cache: Path, model: str, reason: str) -> None:
    with pytest.raises(InvalidModelSpec, match=rf"^'{model}' is not a valid HuggingFace model id \(.*{reason}"):
        prepare_model(model, "Q4_K_M", cache_dir=cache)
    assert hub.requests == []


def test_serve_and_plan_refuse_such_a_model_id_in_one_line(hub: HostileHub, tmp_path: Path) -> None:
    for args in (("plan", "--model", "acme/Widget--7B"), ("serve", "--model", "acme/Widget--7B", "--no-register", "--port", "0")):
        result = run_cli(*args, env=env_for(hub, tmp_path / "hf-home"))
        assert result.returncode == 2, result.stderr  # a usage error: no Hub could ever serve it
        assert result.stderr.strip() == "error: 'acme/Widget--7B' is not a valid HuggingFace model id (Cannot have -- or .. in repo_id)"


def test_a_malformed_model_argument_is_a_usage_error_in_every_command_and_a_model_the_hub_lacks_is_not(hub: HostileHub, tmp_path: Path) -> None:
    """`-m foo` (no file of that name, no org/model id) can never work: exit 2, as `-m ''` and every
    invalid setting, said once and before the Hub is asked; a well-formed id the Hub does not have
    is a runtime failure, exit 1 (README, on exit codes). `foo` exited 1 where `''` exited 2."""
    env = env_for(hub, tmp_path / "hf-home")
    local = ("--no-register", "--port", "0")
    for args in (("serve", "-m", "foo", *local), ("plan", "-m", "foo"), ("bench", "-m", "foo"), ("models", "pull", "foo"), ("models", "resolve", "foo")):
        result = run_cli(*args, env=env)
        assert (result.returncode, result.stderr) == (2, "error: 'foo' is neither a HuggingFace model id (org/model) nor a path to a .gguf file\n"), args
    assert run_cli("serve", "-m", "", *local, env=env).returncode == 2
    assert hub.requests == []

    absent = run_cli("serve", "-m", "acme/Absent-7B", *local, env=env)
    assert absent.returncode == 1, absent.stderr
    [error] = [line for line in absent.stderr.splitlines() if line.startswith("error:")]
    assert "acme/Absent-7B" in error


def test_an_empty_quant_is_refused(hub: HostileHub) -> None:
    with pytest.raises(InvalidModelSpec, match=r"--quant is empty: name a quantization such as Q4_K_M"):
        resolve("acme/Widget-7B", "")


def test_a_repo_holding_only_an_incomplete_split_set_says_which_part_is_missing(hub: HostileHub) -> None:
    with pytest.raises(ModelNotFound, match=r"x/Shard-GGUF holds only incomplete split sets \(Shard-Q4_K_M-\*-of-00003.gguf lacks part 2 of 3\)"):
        resolve("x/Shard-GGUF", "Q4_K_M")
