"""Loading a GGUF into llama.cpp and everything that needs only the vocabulary.

Tokenizing, token pieces and model metadata are read-only uses of the model, safe to call from the
asyncio thread while the scheduler thread decodes (llama-server tokenizes in its HTTP threads too).

A load that fails says why in llama.cpp's own words: its first error line while loading, caught
by the log callback that already routes its lines to Python logging.

A load can be abandoned (``abandoned_when``): a stop requested while llama.cpp reads the weights
(minutes for a large model from disk to a GPU) need not wait for the rest. llama.cpp checks its
progress callback before each tensor and, when it returns false, stops the load and frees what it
had allocated (its documented cancel, tested upstream by ``test-model-load-cancel``); the load then
ends in ``LoadAbandoned`` on its own thread, so nothing is left running inside llama.cpp while the
process exits. Setting up the context (allocating and clearing the KV cache) has no such check, so a
stop requested then waits for it; ``create_context`` is not started once a stop was requested.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import llama_cpp
from llama_cpp._internals import LlamaContext, LlamaModel

from vramsupply.gpu.options import GpuOptionError, GpuOptions

from .threads import resolve_threads
from .types import EngineError, EngineOptions

log = logging.getLogger(__name__)
llama_log = logging.getLogger("vramsupply.llama")

ALL_LAYERS = 0x7FFFFFFF
_FLASH_ATTENTION = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
# ggml_log_level (NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5) -> logging level.
# llama.cpp's INFO lines are load-time chatter, so they go to DEBUG.
_LOG_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_GGML_LOG_LEVEL_ERROR, _GGML_LOG_LEVEL_CONT = 4, 5
_last_log_level = logging.DEBUG
_KV_FULL = b"decode: failed to find a memory slot"
# A shared cache larger than the training context (trained_context.py): the engine caps each
# request at the training context and says so itself, so llama.cpp's overflow warning is noise.
_CTX_OVER_TRAIN = b"llama_context: n_ctx_seq ("
# llama.cpp's error lines while a model loads (`Model.load`), for its error message; None otherwise.
_load_errors: list[str] | None = None
_MAX_LOAD_ERRORS = 8
# "llama_model_load: error loading model: <why>", "gguf_init_from_reader: <why>": the why.
_ERROR_PREFIX = re.compile(r"^\w+: (?:error loading model: )?")
# Who else reads llama.cpp's lines for a while (``listening_to_llama``).
_listeners: list[Callable[[bytes], object]] = []
# The event that abandons the load running on this thread (``abandoned_when``).
_abandon = threading.local()


class LoadAbandoned(EngineError):
    """A stop was requested while the model loaded: llama.cpp stopped and freed what it had."""


@contextmanager
def abandoned_when(event: threading.Event) -> Iterator[None]:
    """Loads on this thread end in ``LoadAbandoned`` once ``event`` is set (see the module docstring)."""
    _abandon.event = event
    try:
        yield
    finally:
        _abandon.event = None


def _abandon_requested() -> threading.Event | None:
    """The event for this thread's load; raises ``LoadAbandoned`` when it is already set."""
    event: threading.Event | None = getattr(_abandon, "event", None)
    if event is not None and event.is_set():
        raise LoadAbandoned("the model load was abandoned: a stop was requested")
    return event


def _check_between_tensors(params: llama_cpp.llama_model_params, event: threading.Event | None) -> object:
    """Have llama.cpp stop the load before its next tensor once ``event`` is set. The returned
    callback must outlive the load; it only reads an event, so it cannot raise (an exception in a
    ctypes callback would be printed and count as false)."""
    if event is None:
        return None
    callback = llama_cpp.llama_progress_callback(lambda _progress, _user_data: not event.is_set())
    params.progress_callback = callback
    return callback


@llama_cpp.llama_log_callback
def _forward_llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    """Send llama.cpp's log lines to Python logging instead of letting them spray stderr."""
    global _last_log_level
    for listener in _listeners:
        listener(text)
    python_level = _last_log_level if level == _GGML_LOG_LEVEL_CONT else _LOG_LEVELS.get(level, logging.DEBUG)
    if text.startswith(_KV_FULL):  # the scheduler makes room and runs the step again (preempt.py)
        python_level = logging.DEBUG
    if text.startswith(_CTX_OVER_TRAIN) and b"n_ctx_train" in text:
        python_level = logging.DEBUG
    if _load_errors is not None:  # a model loading: its lines were never shown (a failure's are in its error)
        python_level = logging.DEBUG
    _last_log_level = python_level
    errors = _load_errors if level == _GGML_LOG_LEVEL_ERROR else None
    shown = llama_log.isEnabledFor(python_level)
    message = text.decode("utf-8", errors="replace").rstrip() if shown or errors is not None else ""
    if message and errors is not None and len(errors) < _MAX_LOAD_ERRORS:
        errors.append(message)
    if message and shown:
        llama_log.log(python_level, "%s", message)


@contextmanager
def listening_to_llama(listener: Callable[[bytes], object]) -> Iterator[None]:
    """``listener`` gets each line llama.cpp logs meanwhile, as bytes (whatever its level). It must
    not raise: it runs inside a ctypes callback."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def route_llama_logs() -> None:
    llama_cpp.llama_log_set(_forward_llama_log, ctypes.c_void_p(0))


def _utf8_name(path: Path) -> bool:
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _load_failure() -> str:
    """llama.cpp's reason for the failed load: its first error line, without the function names."""
    if not _load_errors:
        return "not a GGUF model it supports?"
    return _ERROR_PREFIX.sub("", _load_errors[0])[:300]


class Model:
    """A loaded GGUF: vocabulary helpers plus the llama_model handle the context is built on."""

    def __init__(self, llama_model: LlamaModel, path: Path) -> None:
        self.llama_model = llama_model
        self.vocab = llama_model.vocab
        self.n_vocab = llama_model.n_vocab()
        self.n_ctx_train = llama_model.n_ctx_train()
        self.name = self.metadata_value("general.name") or path.stem
        self.chat_template = self.metadata_value("tokenizer.chat_template")
        self.bos_text = self._special_text(llama_model.token_bos())
        self.eos_text = self._special_text(llama_model.token_eos())
        self.eog_tokens = frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))
        handle = llama_model.model
        self.copies_prefixes = not (llama_cpp.llama_model_is_recurrent(handle) or llama_cpp.llama_model_is_hybrid(handle))
        """Whether part of a sequence can be copied to another: attention KV, cell by cell. A
        recurrent state (Mamba, RWKV, and the linear layers of hybrid models such as Qwen3.5) is
        one state per sequence, which llama.cpp copies whole; such models reuse only whole
        sequences (a slot's own, or a host prompt cache entry) and never borrow prefixes, store
        them once, or share an ``n`` > 1 request's prompt between its choices."""
        self._pieces: dict[int, bytes] = {}
        self._special_pieces: dict[int, bytes] = {}

    @classmethod
    def load(cls, path: Path, n_gpu_layers: int, gpu: GpuOptions | None = None) -> Model:
        if not path.is_file():
            raise EngineError(f"model file not found: {path}")
        if not _utf8_name(path):  # llama-cpp-python passes the path to llama.cpp as UTF-8
            raise EngineError(f"llama.cpp cannot open {path}: its name is not UTF-8 text; rename the file")
        abandon = _abandon_requested()
        route_llama_logs()
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = resolve_gpu_layers(n_gpu_layers)
        try:
            placement_arrays = (gpu or GpuOptions()).apply_to_model(params)  # must outlive the load
        except GpuOptionError as exc:
            raise EngineError(str(exc)) from None
        check = _check_between_tensors(params, abandon)  # must outlive the load too
        global _load_errors
        _load_errors = []
        try:
            # verbose=False would point fds 1 and 2 at /dev/null (and replace sys.stdout/stderr) for
            # the whole load, in every thread: a stop signal's log line, the lines printed meanwhile,
            # and the error line of an agent stopped at once vanished. llama.cpp's own lines come
            # through the log callback instead (at DEBUG while loading).
            llama_model = LlamaModel(path_model=str(path), params=params, verbose=True)
        except ValueError:
            _abandon_requested()  # a stop requested meanwhile: that is why it ended (llama.cpp logs no error for it)
            raise EngineError(f"llama.cpp could not load {path}: {_load_failure()}") from None
        finally:
            _load_errors = None
        del placement_arrays, check
        return cls(llama_model, path)

    def close(self) -> None:
        self.llama_model.close()

    def metadata_value(self, key: str) -> str | None:
        size = llama_cpp.llama_model_meta_val_str(self.llama_model.model, key.encode(), None, 0)
        if size < 0:
            return None
        buffer = ctypes.create_string_buffer(size + 1)
        llama_cpp.llama_model_meta_val_str(self.llama_model.model, key.encode(), buffer, size + 1)
        return buffer.value.decode("utf-8", errors="replace")

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """Tokenize with special-token parsing on, as llama-server does for prompts."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        for _ in range(2):
            tokens = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, True)
            if count >= 0:
                return tokens[:count]
            capacity = -count
        raise EngineError(f"llama.cpp could not tokenize a text of {len(data)} bytes")

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes a generated token stands for; control tokens render as nothing unless ``special``."""
        pieces = self._special_pieces if special else self._pieces
        cached = pieces.get(token)
        if cached is None:
            cached = pieces[token] = self._render_piece(token, special)
        return cached

    @functools.cached_property
    def hidden_tokens(self) -> frozenset[int]:
        """The tokens an answer shows as nothing (``piece``: control tokens and ``<unk>``) but
        end-of-generation, though a grammar matches them by their text (``sampling.py``)."""
        hidden = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        return frozenset(
            token
            for token in range(self.n_vocab)
            if llama_cpp.llama_vocab_get_attr(self.vocab, token) & hidden and token not in self.eog_tokens and not self.piece(token)
        )

    def special_tokens(self, texts: Sequence[str]) -> frozenset[int]:
        """The ids of those ``texts`` that are one token which renders as nothing by default
        (a control token such as ``<|python_tag|>``): output must show them for parsing."""
        found = set()
        for text in texts:
            tokens = self.tokenize(text, add_special=False)
            if len(tokens) == 1 and not self.piece(tokens[0]):
                found.add(tokens[0])
        return frozenset(found)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(int(t)) for t in tokens).decode("utf-8", errors="replace")

    def _render_piece(self, token: int, special: bool = False) -> bytes:
        capacity = 64
        for _ in range(2):
            buffer = ctypes.create_string_buffer(capacity)
            length = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, capacity, 0, special)
            if length >= 0:
                return buffer.raw[:length]
            capacity = -length
        raise EngineError(f"llama.cpp could not render token {token}")

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")


def offloads(options: EngineOptions) -> bool:
    """Whether any layer runs on a GPU, as the memory plan decides it (``gpu/planning.py``): layers
    to offload, and a build that can."""
    return resolve_gpu_layers(options.n_gpu_layers) != 0 and llama_cpp.llama_supports_gpu_offload()


def tiled_cpu_attention(options: EngineOptions) -> bool:
    """Whether attention runs in ggml-cpu's flash attention, which takes 64 rows or more in tiles
    that skip KV cells only when no row of the tile sees them: every layer on the CPU, flash
    attention not off. There a step's streams' rows and prompt rows are decoded apart
    (``tiles.decode_parts``); on a GPU that would only read the weights twice."""
    return not offloads(options) and options.gpu.flash_attention(options.flash_attention_mode, on_gpu=False) != "off"


def resolve_gpu_layers(n_gpu_layers: int) -> int:
    """-1 means every layer on the GPU, but only when this llama.cpp build has a GPU backend."""
    if n_gpu_layers != -1:
        return n_gpu_layers
    return ALL_LAYERS if llama_cpp.llama_supports_gpu_offload() else 0


MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ


def spare_sequences(options: EngineOptions, model: Model) -> int:
    """One sequence id beyond the slots' in the shared KV cache, for the host prompt cache's copies
    of part of a sequence (``prompt_cache.py``); none with a stream per slot, which would cost a
    whole stream, for a model that cannot copy part of a sequence (a spare recurrent state would
    only cost memory), at llama.cpp's limit of sequences, or when a batch holds no more rows than
    the slots: llama.cpp reserves an output row per sequence within its batch of
    ``min(n_batch, n_ctx)`` rows and aborts the process
    (``GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max)``) when they do not fit."""
    rows = min(options.n_batch, options.n_ctx)
    usable = model.copies_prefixes and not options.kv_per_slot and options.parallel < MAX_SEQUENCES and rows > options.parallel
    return 1 if usable else 0


def create_context(model: Model, options: EngineOptions) -> LlamaContext:
    """One context whose KV cache the slots share, as llama-server's: ``n_ctx`` tokens in all.

    Any one request may still use the whole context, but the slots together can run out of
    cells; the scheduler then pauses the youngest request and resumes it later (``preempt.py``).
    With ``kv_per_slot`` every slot gets its own stream of ``n_ctx`` tokens instead
    (``kv_unified=False``, llama.cpp PR #14363): ``parallel`` times the memory, and no slot ever
    waits for KV space.

    Not started once the load running on this thread was abandoned (``abandoned_when``): setting
    up a context cannot be interrupted, and a large KV cache takes seconds to clear.
    """
    _abandon_requested()
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = options.n_ctx * options.parallel if options.kv_per_slot else options.n_ctx
    params.n_seq_max = options.parallel + spare_sequences(options, model)
    params.kv_unified = not options.kv_per_slot
    params.n_batch = options.n_batch
    params.n_ubatch = min(options.n_ubatch, options.n_batch)
    params.flash_attn_type = _FLASH_ATTENTION[options.gpu.flash_attention(options.flash_attention_mode, offloads(options))]
    options.gpu.apply_to_context(params)
    threads = resolve_threads(options.threads)
    params.n_threads = threads.decode
    params.n_threads_batch = threads.batch
    try:
        context = LlamaContext(model=model.llama_model, params=params, verbose=False)
    except ValueError:
        raise EngineError(
            f"llama.cpp could not create a context of {options.n_ctx} tokens for {options.parallel} slots "
            "(out of memory? try a smaller context_length or parallel)"
        ) from None
    log.debug(
        "context: n_ctx=%d n_ctx_seq=%d n_seq_max=%d n_batch=%d n_ubatch=%d threads=%d/%d (decode/batch)",
        llama_cpp.llama_n_ctx(context.ctx),
        llama_cpp.llama_n_ctx_seq(context.ctx),
        llama_cpp.llama_n_seq_max(context.ctx),
        llama_cpp.llama_n_batch(context.ctx),
        llama_cpp.llama_n_ubatch(context.ctx),
        llama_cpp.llama_n_threads(context.ctx),
        llama_cpp.llama_n_threads_batch(context.ctx),
    )
    return context
