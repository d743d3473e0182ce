"""A fake HuggingFace Hub on localhost for the real huggingface_hub client and our downloader.

Serves the routes and headers the client needs (see shared notes §3): model search, model info
with LFS sha256s, and `resolve` downloads with X-Repo-Commit / ETag / X-Linked-Size and Range.
Runs an aiohttp app in its own thread, because the code under test makes blocking calls. A
second "CDN" site on another port stands in for the Hub's file storage behind redirects.
Faults are switched on per file path (drop the connection once, stall, pause until the test says
go on, serve corrupt bytes) or for the whole API (hang without answering). Repo descriptions can
be held back until a given set of them is asked at once, to show whether a client asks in parallel.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pytest
from aiohttp import web

TINY_MODEL = Path(__file__).resolve().parent.parent / "vramsupply" / "assets" / "stories260K.gguf"
TOKEN = "hf_fake_valid_token"
HOLD_LIMIT = 15.0  # seconds a held repo description (FakeHub.held_together) waits for the others


def generated_gguf(size: int, seed: int) -> bytes:
    """Deterministic bytes that look like a GGUF file from the outside (magic + noise)."""
    return b"GGUF" + random.Random(seed).randbytes(size - 4)


@dataclass
class FakeFile:
    data: bytes
    lfs: bool = True
    claimed_size: int | None = None

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> int:
        return self.claimed_size if self.claimed_size is not None else len(self.data)


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, FakeFile]
    tags: list[str] = field(default_factory=list)
    downloads: int = 0
    gated: bool = False
    via_cdn: bool = False

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.repo_id.encode()).hexdigest()


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _range_start(header: str | None, size: int) -> int | None:
    if not header or not header.startswith("bytes="):
        return None
    start = header[len("bytes=") :].split("-", 1)[0]
    return int(start) if start.isdigit() and int(start) < size else -1


def _range_end(header: str | None, size: int) -> int:
    """The last byte a `bytes=N-M` range asks for (capped at the file), else the file's last byte."""
    spec = header[len("bytes=") :].split("-", 1)[1] if header and header.startswith("bytes=") and "-" in header else ""
    return min(int(spec), size - 1) if spec.isdigit() else size - 1


class FakeHub:
    """Start with `with FakeHub(repos) as hub:`; `hub.url` is the endpoint to pass as HF_ENDPOINT."""

    def __init__(self, repos: Iterable[FakeRepo]) -> None:
        self.repos = {repo.repo_id.lower(): repo for repo in repos}
        self.requests: list[Request] = []
        self.drop_once: dict[str, int] = {}
        self.stall_after: dict[str, int] = {}
        self.pause_at: dict[str, tuple[int, threading.Event]] = {}
        self.corrupt: set[str] = set()
        self.failing: set[str] = set()  # repo ids whose description answers 500
        self.refusing: set[str] = set()  # repo ids whose description answers 403 (a token without access)
        # Rate limits: file path -> (how many more GETs answer 429, their Retry-After); repo id -> the
        # Retry-After of a 429 its description answers.
        self.limiting_downloads: dict[str, tuple[int, str]] = {}
        self.limiting_infos: dict[str, str] = {}
        # Repo ids whose descriptions wait until all of them are being asked at once (or until
        # HOLD_LIMIT): most_held_at_once is how many of them a client had in flight together.
        self.held_together: set[str] = set()
        self.most_held_at_once = 0
        self._held: list[str] = []
        self._all_held: asyncio.Event | None = None
        self.hang_api = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._release: asyncio.Event | None = None
        self._runners: list[web.AppRunner] = []
        self.url = ""
        self.cdn_url = ""

    # lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> FakeHub:
        self._thread.start()
        self.url, self.cdn_url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> tuple[str, str]:
        self._release = asyncio.Event()
        self._all_held = asyncio.Event()
        hub = web.Application()
        hub.router.add_get("/api/models", self._search)
        hub.router.add_get("/api/models/{org}/{name}", self._info)
        hub.router.add_get("/api/models/{org}/{name}/revision/{rev}", self._info)
        hub.router.add_get("/{org}/{name}/resolve/{rev}/{path:.+}", self._resolve)
        cdn = web.Application()
        cdn.router.add_get("/blobs/{org}/{name}/{path:.+}", self._cdn)
        urls = []
        for app in (hub, cdn):
            runner = web.AppRunner(app, shutdown_timeout=0.5)
            await runner.setup()
            sock = _free_socket()
            await web.SockSite(runner, sock).start()
            self._runners.append(runner)
            urls.append(f"http://127.0.0.1:{sock.getsockname()[1]}")
        return urls[0], urls[1]

    async def _stop(self) -> None:
        assert self._release is not None
        self._release.set()
        for runner in self._runners:
            await runner.cleanup()

    # helpers for tests -----------------------------------------------------------------------
    def file(self, repo_id: str, path: str) -> FakeFile:
        return self.repos[repo_id.lower()].files[path]

    def downloads_of(self, path: str) -> list[Request]:
        """GET requests for one file, through the Hub or the CDN."""
        return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + path) and "/api/" not in r.path]

    # routes ----------------------------------------------------------------------------------
    def _log(self, request: web.Request) -> None:
        self.requests.append(Request(request.method, request.path, dict(request.headers)))

    async def _maybe_hang(self) -> None:
        """With `hang_api` set, API calls accept the connection and never answer (until stop)."""
        if self.hang_api:
            assert self._release is not None
            await self._release.wait()

    def _repo(self, request: web.Request) -> FakeRepo:
        repo = self.repos.get(f"{request.match_info['org']}/{request.match_info['name']}".lower())
        if repo is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        return repo

    async def _search(self, request: web.Request) -> web.Response:
        self._log(request)
        await self._maybe_hang()
        filters = request.query.getall("filter", [])
        search = request.query.get("search", "").lower()
        author = request.query.get("author", "").lower()
        found = [
            repo
            for repo in self.repos.values()
            if all(tag in repo.tags for tag in filters)
            and search in repo.repo_id.lower()
            and (not author or repo.repo_id.lower().startswith(author + "/"))
        ]
        if request.query.get("sort") == "downloads":
            found.sort(key=lambda repo: -repo.downloads)
        found = found[: int(request.query.get("limit", "1000"))]
        return web.json_response(
            [{"id": r.repo_id, "modelId": r.repo_id, "downloads": r.downloads, "likes": 0, "tags": r.tags, "private": False} for r in found]
        )

    async def _info(self, request: web.Request) -> web.Response:
        self._log(request)
        await self._maybe_hang()
        repo = self._repo(request)
        await self._hold(repo.repo_id.lower())
        if repo.repo_id.lower() in self.failing:
            raise web.HTTPInternalServerError()
        if repo.repo_id.lower() in self.limiting_infos:
            raise web.HTTPTooManyRequests(headers={"Retry-After": self.limiting_infos[repo.repo_id.lower()]})
        if repo.repo_id.lower() in self.refusing:
            raise web.HTTPForbidden(headers={"X-Error-Code": "GatedRepo", "X-Error-Message": f"Access to model {repo.repo_id} is restricted."})
        with_blobs = request.query.get("blobs", "").lower() == "true"
        siblings = []
        for path, file in repo.files.items():
            sibling: dict[str, object] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=file.size, blobId=hashlib.sha1(file.data).hexdigest())
                if file.lfs:
                    sibling["lfs"] = {"sha256": file.sha256, "size": file.size, "pointerSize": 134}
            siblings.append(sibling)
        return web.json_response(
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": repo.sha,
                "tags": repo.tags,
                "downloads": repo.downloads,
                "private": False,
                "gated": "auto" if repo.gated else False,
                "siblings": siblings,
            }
        )

    async def _hold(self, repo_id: str) -> None:
        """With `held_together`, one of those repos' description waits for all of them to be asked."""
        if repo_id not in self.held_together:
            return
        assert self._all_held is not None
        self._held.append(repo_id)
        self.most_held_at_once = max(self.most_held_at_once, len(self._held))
        if set(self._held) >= self.held_together:
            self._all_held.set()
        try:
            await asyncio.wait_for(self._all_held.wait(), HOLD_LIMIT)
        except asyncio.TimeoutError:
            self._all_held.set()  # asked one by one: the test fails on most_held_at_once, not on waiting
        finally:
            self._held.remove(repo_id)

    def _check_access(self, request: web.Request, repo: FakeRepo) -> None:
        if not repo.gated:
            return
        auth = request.headers.get("Authorization")
        if auth == f"Bearer {TOKEN}":
            return
        error = web.HTTPForbidden if auth else web.HTTPUnauthorized
        raise error(headers={"X-Error-Code": "GatedRepo", "X-Error-Message": f"Access to model {repo.repo_id} is restricted."})

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        self._log(request)
        repo = self._repo(request)
        self._check_access(request, repo)
        path = request.match_info["path"]
        file = repo.files.get(path)
        if file is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha})
        headers = {
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{file.sha256}"' if file.lfs else f'"{hashlib.sha1(file.data).hexdigest()}"',
            "X-Linked-Size": str(file.size),
            "Accept-Ranges": "bytes",
        }
        if repo.via_cdn:
            raise web.HTTPFound(f"{self.cdn_url}/blobs/{repo.repo_id}/{path}", headers=headers)
        return await self._send(request, path, file, headers)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        self._log(request)
        repo = self._repo(request)
        path = request.match_info["path"]
        return await self._send(request, path, repo.files[path], {"Accept-Ranges": "bytes"})

    async def _send(self, request: web.Request, path: str, file: FakeFile, headers: dict[str, str]) -> web.StreamResponse:
        left, wait = self.limiting_downloads.get(path, (0, ""))
        if left and request.method == "GET":
            self.limiting_downloads[path] = (left - 1, wait)
            raise web.HTTPTooManyRequests(headers={"Retry-After": wait})
        data = file.data
        if path in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if request.method == "HEAD":
            return web.Response(status=200, headers=headers)
        start = _range_start(request.headers.get("Range"), len(data))
        if start == -1:
            raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{len(data)}"})
        status = 200
        if start is not None:
            status = 206
            end = _range_end(request.headers.get("Range"), len(data))
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
            data = data[start : end + 1]
        else:
            start = 0
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(data)
        await response.prepare(request)
        if path in self.pause_at:
            offset, resume = self.pause_at[path]
            sent = max(0, min(offset - start, len(data)))
            await response.write(data[:sent])
            await asyncio.to_thread(resume.wait, 60)
            data = data[sent:]
        cut = self._cut(path, start, len(data))
        if cut is None:
            await response.write(data)
            await response.write_eof()
            return response
        await response.write(data[:cut])
        if path in self.stall_after:
            assert self._release is not None
            await self._release.wait()
        assert request.transport is not None
        request.transport.abort()
        return response

    def _cut(self, path: str, start: int, length: int) -> int | None:
        """Bytes to send before a fault, for this request; None to send the whole body."""
        if path in self.drop_once:
            at = self.drop_once.pop(path)
            return max(0, min(at - start, length))
        if path in self.stall_after:
            return max(0, min(self.stall_after[path] - start, length))
        return None


def _quantized(base: str) -> list[str]:
    return ["gguf", f"base_model:quantized:{base}", f"base_model:{base}"]


BIG = 12 * 1024 * 1024  # larger than huggingface_hub's 10 MiB chunk, so partial writes happen


def standard_repos() -> list[FakeRepo]:
    """The fake Hub's contents: original models, their GGUF repos by several publishers, and traps."""
    tiny = FakeFile(TINY_MODEL.read_bytes())
    return [
        # acme/Widget-7B: the org publishes its own GGUF repo, third parties have more downloads.
        FakeRepo("acme/Widget-7B", {"config.json": FakeFile(b"{}", lfs=False), "model.safetensors": FakeFile(b"weights")}, ["transformers"]),
        FakeRepo("acme/Widget-7B-GGUF", {"Widget-7B-Q4_K_M.gguf": tiny, "Widget-7B-Q8_0.gguf": FakeFile(generated_gguf(4096, 1))}, _quantized("acme/Widget-7B"), downloads=10),
        FakeRepo("unsloth/Widget-7B-GGUF", {"Widget-7B-Q4_K_M.gguf": FakeFile(generated_gguf(4096, 2))}, _quantized("acme/Widget-7B"), downloads=9000),
        FakeRepo("bartowski/acme_Widget-7B-GGUF", {"acme_Widget-7B-Q4_K_M.gguf": FakeFile(generated_gguf(4096, 3))}, _quantized("acme/Widget-7B"), downloads=5000),
        # acme/Gadget-3B: no own GGUF repo; preferred publishers beat a more downloaded stranger.
        FakeRepo("acme/Gadget-3B", {"model.safetensors": FakeFile(b"weights")}, ["transformers"]),
        FakeRepo("stranger/Gadget-3B-GGUF", {"Gadget-3B-Q4_K_M.gguf": FakeFile(generated_gguf(4096, 4))}, _quantized("acme/Gadget-3B"), downloads=99999),
        FakeRepo("lmstudio-community/Gadget-3B-GGUF", {"Gadget-3B-Q8_0.gguf": FakeFile(generated_gguf(4096, 5))}, _quantized("acme/Gadget-3B"), downloads=50),
        FakeRepo(
            "bartowski/acme_Gadget-3B-GGUF",
            {"acme_Gadget-3B-Q4_K_M.gguf": tiny, "acme_Gadget-3B-Q6_K.gguf": FakeFile(generated_gguf(4096, 6))},
            _quantized("acme/Gadget-3B"),
            downloads=700,
        ),
        # acme/Gizmo-1B: found by name only (no model-tree tags); a fine-tune's repo must not match.
        FakeRepo("acme/Gizmo-1B", {"model.safetensors": FakeFile(b"weights")}, ["transformers"]),
        FakeRepo("ggml-org/Gizmo-1B-GGUF", {"gizmo-1b-q4_k_m.gguf": tiny}, ["gguf"], downloads=20),
        FakeRepo("someone/Gizmo-1B-abliterated-GGUF", {"Gizmo-1B-abliterated-Q4_K_M.gguf": FakeFile(generated_gguf(4096, 7))}, ["gguf"], downloads=80000),
        # acme/Original-1B ships an F16 .gguf itself; its Q4_K_M is published by others.
        FakeRepo("acme/Original-1B", {"model.safetensors": FakeFile(b"weights"), "original-1b-f16.gguf": FakeFile(generated_gguf(2048, 8))}, ["transformers", "gguf"]),
        FakeRepo("unsloth/Original-1B-GGUF", {"Original-1B-Q4_K_M.gguf": FakeFile(generated_gguf(2048, 9))}, _quantized("acme/Original-1B"), downloads=3),
        # acme/Lonely-2B: nothing quantized anywhere.
        FakeRepo("acme/Lonely-2B", {"model.safetensors": FakeFile(b"weights")}, ["transformers"]),
        # Direct GGUF repos.
        FakeRepo(
            "quantco/Splitty-GGUF",
            {
                "Q4_K_M/Splitty-Q4_K_M-00001-of-00003.gguf": FakeFile(generated_gguf(3000, 10)),
                "Q4_K_M/Splitty-Q4_K_M-00002-of-00003.gguf": FakeFile(b"part two" * 100),
                "Q4_K_M/Splitty-Q4_K_M-00003-of-00003.gguf": FakeFile(b"part three" * 100),
                "Splitty-Q8_0.gguf": FakeFile(generated_gguf(2048, 11)),
                "mmproj-Splitty-F16.gguf": FakeFile(generated_gguf(1024, 12)),
                "README.md": FakeFile(b"# Splitty", lfs=False),
            },
            _quantized("quantco/Splitty"),
        ),
        FakeRepo(
            "quantco/Tricky-GGUF",
            {
                "Tricky-Q4_K_M_L.gguf": FakeFile(generated_gguf(1024, 20)),
                "Tricky-IQ4_K_M.gguf": FakeFile(generated_gguf(1024, 21)),
                "Tricky-UD-Q4_K_M.gguf": FakeFile(generated_gguf(1024, 22)),
            },
            ["gguf"],
        ),
        FakeRepo("bigco/Huge-GGUF", {"Huge-Q4_K_M.gguf": FakeFile(generated_gguf(BIG, 30))}, ["gguf"]),
        FakeRepo("bigco/Broken-GGUF", {"Broken-Q4_K_M.gguf": FakeFile(generated_gguf(2 * 1024 * 1024, 31))}, ["gguf"]),
        FakeRepo("bigco/Enormous-GGUF", {"Enormous-Q4_K_M.gguf": FakeFile(generated_gguf(1024, 32), claimed_size=10**16)}, ["gguf"]),
        FakeRepo("evil/Escape-GGUF", {"../../escape-Q4_K_M.gguf": FakeFile(generated_gguf(1024, 33))}, ["gguf"]),
        FakeRepo("gatedco/Locked-GGUF", {"Locked-Q4_K_M.gguf": tiny}, ["gguf"], gated=True, via_cdn=True),
    ]


def point_hf_at(monkeypatch: pytest.MonkeyPatch, hub: FakeHub) -> None:
    """The real huggingface_hub client, in this process, talks to ``hub`` and nothing else (no
    token or offline mode of the developer's)."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
