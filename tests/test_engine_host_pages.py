"""A large context costs host memory for the KV cells used, not for the whole cache at load
(``engine/host_pages.py``): llama.cpp's zeroed cache pages are handed back to the kernel."""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor

import pytest

from conftest import TINY_MODEL
from vramsupply.engine import Engine, EngineOptions, GenerationRequest, SamplingParams
from vramsupply.engine import host_pages
from vramsupply.engine.model import _forward_llama_log

MIB = 1 << 20
PAGE = 4096
# The tiny model's cache is 640 bytes a cell (5 layers, 32 K and 32 V values of 2 bytes): 64 Ki
# cells are 40 MiB, more than glibc's largest threshold for a mapping of its own, 32 MiB (32 slots:
# the shared cache is at most 32 requests of the 2,048 tokens the model was trained on).
BIG_CONTEXT = 65536
KV_MIB = BIG_CONTEXT * 640 / MIB
PROMPTS = ["Once upon a time", "The dog", "Lily and Tom went to the park"]

libc = ctypes.CDLL(None)
libc.posix_memalign.argtypes = (ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t)
libc.free.argtypes = (ctypes.c_void_p,)
libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)


def resident_mib(address: int, length: int) -> float:
    """How much of [address, address + length) is in RAM (mincore), in MiB."""
    start = address // PAGE * PAGE
    pages = (address + length - start + PAGE - 1) // PAGE
    vector = ctypes.create_string_buffer(pages)
    assert libc.mincore(start, pages * PAGE, vector) == 0
    return sum(byte & 1 for byte in vector.raw) * PAGE / MIB


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+) kB", status.read()).group(1)) / 1024  # type: ignore[union-attr]


def in_a_fresh_process(scenario: Callable[[], object]) -> object:
    """Run ``scenario`` in a new interpreter and return what it returns (its assertion errors are
    raised here). glibc serves a large allocation from a mapping of its own only while its heap has
    no free room that large: true of an agent's process at load, not of a test worker that has run
    other tests (in CI one such worker's 36 MiB came from its heap)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(scenario).result()


def huge_pages_only_on_request() -> None:
    """The scenarios below test finding and handing back, whatever this host's huge pages."""
    setting = Path(tempfile.mkdtemp()) / "enabled"
    setting.write_text("always [madvise] never\n")
    host_pages.THP_SETTING = setting


def ggml_buffer(mib: int, fill: int = 0) -> int:
    """A buffer of ``mib`` MiB made as ggml makes one (posix_memalign, 64) and cleared (committing
    it) as llama.cpp clears a cache; the process ends without freeing it."""
    address = ctypes.c_void_p()
    assert libc.posix_memalign(ctypes.byref(address), 64, mib * MIB) == 0
    ctypes.memset(address.value, fill, mib * MIB)
    return address.value  # type: ignore[return-value]


def llama_logs(line: str) -> None:
    _forward_llama_log(2, line.encode(), None)


def logged_cache_and_state_are_handed_back() -> None:
    huge_pages_only_on_request()
    with host_pages.host_buffers_made() as found:
        cache = ggml_buffer(40)
        state = ggml_buffer(36)
        llama_logs("llama_kv_cache:        CPU KV buffer size =    40.00 MiB\n")
        llama_logs("llama_memory_recurrent:        CPU RS buffer size =    36.00 MiB\n")
    assert sorted(span.start for span in found.spans) == sorted([cache, state])
    assert resident_mib(cache, 40 * MIB) == pytest.approx(40, abs=0.01)  # found, not yet handed back
    assert found.release() >= 76 * MIB - 2 * PAGE
    assert resident_mib(cache, 40 * MIB) < 0.1 and resident_mib(state, 36 * MIB) < 0.1
    ctypes.memset(cache, 7, MIB)  # written again, it is committed again, page by page
    assert resident_mib(cache, 40 * MIB) == pytest.approx(1, abs=0.01)
    # and the rest reads as it did: zeros (read last: mincore counts pages mapped to the zero page)
    assert ctypes.string_at(cache + MIB, 39 * MIB) == bytes(39 * MIB)


def test_the_cache_llama_cpp_logs_is_found_and_its_zeroed_pages_handed_back() -> None:
    in_a_fresh_process(logged_cache_and_state_are_handed_back)


def unlogged_and_written_buffers_stay() -> None:
    huge_pages_only_on_request()
    with host_pages.host_buffers_made() as found:
        unlogged = ggml_buffer(40)
        with_data = ggml_buffer(36, fill=1)
        llama_logs("llama_kv_cache:        CPU KV buffer size =    36.00 MiB\n")
        llama_logs("llama_kv_cache:      CUDA0 KV buffer size =    40.00 MiB\n")  # in GPU memory: not ours to find
    assert [span.start for span in found.spans] == [with_data]
    assert resident_mib(unlogged, 40 * MIB) == pytest.approx(40, abs=0.01)
    assert resident_mib(with_data, 36 * MIB) == pytest.approx(36, abs=0.01)
    assert ctypes.string_at(with_data, 36 * MIB) == b"\x01" * (36 * MIB)
    assert found.release() == 0


def test_a_buffer_nobody_logged_or_that_holds_data_is_left_alone() -> None:
    in_a_fresh_process(unlogged_and_written_buffers_stay)


def two_caches_of_one_size_are_found() -> None:
    huge_pages_only_on_request()
    with host_pages.host_buffers_made() as found:
        first, second = ggml_buffer(34), ggml_buffer(34)
        llama_logs("llama_kv_cache:        CPU KV buffer size =    34.00 MiB\n")
        llama_logs("llama_kv_cache:        CPU KV buffer size =    34.00 MiB\n")
    assert sorted(span.start for span in found.spans) == sorted([first, second])
    found.release()
    assert resident_mib(first, 34 * MIB) + resident_mib(second, 34 * MIB) < 0.1


def test_two_caches_of_one_size_are_both_found() -> None:
    """Models with sliding-window layers have two caches, which can be of one size."""
    in_a_fresh_process(two_caches_of_one_size_are_found)


def logged_cache_stays_resident(mib: int) -> None:
    with host_pages.host_buffers_made() as found:
        cache = ggml_buffer(mib)
        llama_logs(f"llama_kv_cache:        CPU KV buffer size =    {mib}.00 MiB\n")
    assert found.spans == [] and found.release() == 0
    assert resident_mib(cache, mib * MIB) == pytest.approx(mib, abs=0.01)


def heap_served_cache_stays() -> None:
    huge_pages_only_on_request()
    libc.mallopt(-4, 0)  # M_MMAP_MAX 0: glibc serves every allocation from its heap
    logged_cache_stays_resident(36)


def test_a_cache_glibc_served_from_its_heap_is_left_resident() -> None:
    """A process whose heap had the room (one that loaded a model before) keeps the cache resident,
    as before, and nothing breaks."""
    in_a_fresh_process(heap_served_cache_stays)


def huge_pages_always_keep_the_cache() -> None:
    setting = Path(tempfile.mkdtemp()) / "enabled"
    setting.write_text("[always] madvise never\n")
    host_pages.THP_SETTING = setting
    logged_cache_stays_resident(40)


def test_a_host_whose_huge_pages_are_always_on_keeps_the_cache_resident() -> None:
    """There a page handed back comes back with its whole 2 MiB block at the first write near it,
    and khugepaged merges partly used blocks again: the saving would not hold."""
    in_a_fresh_process(huge_pages_always_keep_the_cache)


def serve_three_prompts(release: bool) -> tuple[float, float, list[list[int]]]:
    """Load the tiny model with a 40 MiB cache (the RSS it took) and answer three prompts greedily
    (the RSS after them, and their tokens)."""
    if not release:
        host_pages.HostBuffers.release = lambda self, memory=None: 0  # type: ignore[method-assign]
    before = rss_mib()
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=BIG_CONTEXT, parallel=32, threads=1, cache_ram=0)) as engine:
        loaded = rss_mib() - before
        tokens = asyncio.run(greedy(engine))
        return loaded, rss_mib() - before, tokens


def serve_three_prompts_releasing() -> tuple[float, float, list[list[int]]]:
    return serve_three_prompts(release=True)


def serve_three_prompts_keeping() -> tuple[float, float, list[list[int]]]:
    return serve_three_prompts(release=False)


async def greedy(engine: Engine) -> list[list[int]]:
    texts = []
    for prompt in PROMPTS:
        generation = engine.submit(GenerationRequest(engine.tokenize(prompt), max_tokens=48, sampling=SamplingParams(temperature=0)))
        await generation.collect()
        texts.append(generation.token_ids)
    return texts


@pytest.mark.skipif("[always]" in (host_pages.THP_SETTING.read_text() if host_pages.THP_SETTING.exists() else ""),
                    reason="transparent huge pages are always on here: the cache stays resident by design")
def test_an_agent_with_a_large_context_holds_no_memory_for_cells_it_never_used() -> None:
    loaded, after_requests, released = in_a_fresh_process(serve_three_prompts_releasing)  # type: ignore[misc]
    kept_loaded, _, resident = in_a_fresh_process(serve_three_prompts_keeping)  # type: ignore[misc]
    assert loaded < KV_MIB / 2, f"loading a {KV_MIB:.0f} MiB cache took {loaded:.0f} MiB of RSS"
    assert kept_loaded > KV_MIB  # without handing its pages back, the cache is resident from the start
    assert after_requests < KV_MIB / 2  # three short requests used a few hundred cells
    assert released == resident  # zero pages handed back read as the zeros they held


def test_an_agent_that_may_not_read_its_own_memory_still_loads(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A locked-down container may refuse /proc/self/mem: the cache then stays resident, and the
    agent serves as before."""

    def refused(*_args: object) -> int:
        raise PermissionError(13, "Permission denied", "/proc/self/mem")

    monkeypatch.setattr(host_pages.os, "open", refused)
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=BIG_CONTEXT, parallel=32, threads=1, cache_ram=0)) as engine:
        assert asyncio.run(greedy(engine))[0]
    assert "could not find the KV cache in host memory (PermissionError" in caplog.text
