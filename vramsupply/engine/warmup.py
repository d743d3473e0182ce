"""One throw-away decode before the engine says it is ready, as llama-server does at load.

The first ``llama_decode`` of a fresh context pays costs no later one does: the weights of a
memory-mapped GGUF are read from disk as the graph first touches them (seconds for a model of
several GiB after a reboot, which is when a systemd service starts), the backends set up their
kernels and buffers, and a GPU build loads its kernels. Without this the first buyer after
``serve`` started paid all of that inside their time to first token, while the marketplace
already listed the provider as up. The decode runs with llama.cpp's warm-up flag, which makes a
mixture-of-experts model route through every expert, so that every expert's weights are read
now and not in the middle of someone's request. The cache is cleared afterwards: no request
sees a trace of it.

A model that cannot decode two tokens on this machine fails here, at load, with a clear error,
rather than failing its first paying request.

The scheduler thread runs it before it serves (``Scheduler.start``), because every decode of the
context must run on that one thread. On a CPU build ggml computes each graph in an OpenMP
parallel region, and libgomp gives every thread that opens one a team of worker threads of its
own, kept until that thread ends. Once a process holds more OpenMP threads than it has CPUs,
libgomp shortens its busy-wait from about 300,000 spins to 100 (its ``GOMP_SPINCOUNT``
documentation), so the workers sleep in the kernel at each of the graph's barriers, hundreds a
step. A warm-up decoded on the loading thread left such a second team wherever that thread lived
on: measured on the 2-core bench VM with the engine loaded on the main thread, four streams'
steps took 17-20 ms, against 12-13 ms with every decode on the scheduler thread (a bare decode
loop: 11-12 ms). ``serve`` loads on a thread that ends, which frees its team, so it was not
slowed (side by side at 4 streams: 1.01x).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import llama_cpp
from llama_cpp._internals import LlamaContext

from .host_pages import HostBuffers
from .types import EngineError

log = logging.getLogger(__name__)


def warm_up(context: LlamaContext, vocab: object) -> float:
    """Decode BOS and EOS once (token 0 for a vocabulary without them), then clear the cache;
    returns the seconds it took. Raises EngineError when llama.cpp cannot decode them."""
    tokens = [t for t in (llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab)) if t >= 0] or [0]
    tokens = tokens[: llama_cpp.llama_n_batch(context.ctx)]  # a decode of more than n_batch aborts the process
    array = (llama_cpp.llama_token * len(tokens))(*tokens)
    started = time.perf_counter()
    llama_cpp.llama_set_warmup(context.ctx, True)
    try:
        status = llama_cpp.llama_decode(context.ctx, llama_cpp.llama_batch_get_one(array, len(tokens)))
        llama_cpp.llama_synchronize(context.ctx)
    finally:
        llama_cpp.llama_set_warmup(context.ctx, False)
        llama_cpp.llama_memory_clear(context.memory, True)
    if status != 0:
        raise EngineError(f"llama.cpp could not run the model on this machine (a first decode returned status {status})")
    seconds = time.perf_counter() - started
    log.info("warmed up in %.0f ms", seconds * 1000)
    return seconds


class WarmUpOnThread:
    """The hand-over between the thread that loads the engine and the scheduler thread: ``run``
    on the scheduler thread before it serves, ``wait`` on the loading thread."""

    def __init__(self, context: LlamaContext, vocab: object, host_buffers: HostBuffers | None = None) -> None:
        self._context = context
        self._host_buffers = host_buffers
        self._vocab = vocab
        self._done = threading.Event()
        self._error: Exception | None = None

    def run(self) -> bool:
        """Warm up; False (the error kept for ``wait``) when it failed."""
        try:
            warm_up(self._context, self._vocab)
            if self._host_buffers is not None:  # the cache was just cleared with its data: all zero
                self._host_buffers.release()
        except Exception as exc:
            self._error = exc
        finally:
            self._done.set()
        return self._error is None

    def wait(self, join: Callable[[], None]) -> None:
        """Until ``run`` ended; raises its error after ``join`` (the thread then ends)."""
        self._done.wait()
        if self._error is not None:
            join()
            raise self._error
