"""``Engine``: the facade the server talks to. Loads the model, validates requests, owns the scheduler."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaContext

from . import backend_sampling
from .chat import ChatTemplate
from .conversation import ChatPrompt, ChatRequest, prepare_chat
from .generation import Channel, Generation
from .host_pages import host_buffers_made
from .model import Model, create_context, tiled_cpu_attention
from .prompt_cache import MIB, budget_mib
from .sampling import build_sampler
from .text import stop_strings_for
from .scheduler import Reservation, Scheduler
from .speculative import default_draft_max
from .slots import Tally, Task
from .thread_tuner import thread_tuner
from .trained_context import served_context
from .prompt_checks import refuse_far_past_context, validated_prompt
from .types import ContextOverflow, EngineClosed, EngineFailed, EngineOptions, EngineStats, GenerationRequest

log = logging.getLogger(__name__)

CLOSE_WAIT_SECONDS = 30.0
"""How long ``close`` waits for the scheduler's current step and for in-flight tokenize calls."""

ANSWER_WITHIN_SECONDS = 1.0
"""How long ``close`` lets the scheduler end its requests itself; a step still running then (hung,
or a long prompt chunk) must not hold back the buyers' errors, so ``close`` ends them from outside."""

POLL_SECONDS = 0.05
"""How often ``close``'s wait for a step that runs on looks at ``hurry``."""


class Engine:
    """A loaded model serving many concurrent generations through continuous batching."""

    def __init__(
        self, options: EngineOptions, model: Model, context: LlamaContext, scheduler: Scheduler, n_ctx: int, n_batch: int
    ) -> None:
        self.options = options
        self.model_name = model.name
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self._model = model
        self._context = context
        self._scheduler = scheduler
        self._chat = ChatTemplate(model.chat_template, model.bos_text, model.eos_text)
        # Calls from other threads (tokenizing a large body) that use the model; close() waits for them.
        self._users = 0
        self._closing = False
        self._hurried = False  # ``hurry``: close waits for nothing more
        self._idle = threading.Condition()

    @classmethod
    def load(cls, options: EngineOptions) -> Engine:
        """Load the GGUF and start the scheduler thread. Blocking: call via ``asyncio.to_thread``."""
        model = Model.load(options.model_path, options.n_gpu_layers, options.gpu)
        options, request_tokens = fit_to_training_context(options, model)
        context = None
        try:
            with host_buffers_made() as host_buffers:
                context = create_context(model, options)
            # llama.cpp rounds per-sequence context up to a multiple of 256 and never gives less
            # than asked; enforce exactly what was configured (and offered to the market).
            n_ctx = min(request_tokens, llama_cpp.llama_n_ctx_seq(context.ctx))
            n_batch = llama_cpp.llama_n_batch(context.ctx)
            cache_ram = budget_mib(options.cache_ram)
            max_draft = default_draft_max(options, model.copies_prefixes)
            scheduler = Scheduler(
                model, context, n_ctx, options.parallel, n_batch, options.max_queue, cache_ram * MIB, max_draft,
                options.stall_timeout, options.kv_per_slot, options.stream_interval_ms / 1000, thread_tuner(options, context),
                apart=tiled_cpu_attention(options), host_buffers=host_buffers, decode_nice=options.decode_nice,
            )
            scheduler.start()  # warms the model up on the thread that decodes every step
        except BaseException:
            if context is not None:
                context.close()
            model.close()
            raise
        engine = cls(options, model, context, scheduler, n_ctx, n_batch)
        log.info(
            "loaded %s: %d slots, %s, requests of up to %d tokens, n_batch %d, %d/%d threads (decode/prompt), prompt cache %d MiB, GPU offload %s",
            model.name,
            options.parallel,
            kv_layout(options.kv_per_slot, options.n_ctx),
            n_ctx,
            n_batch,
            llama_cpp.llama_n_threads(context.ctx),
            llama_cpp.llama_n_threads_batch(context.ctx),
            cache_ram,
            "available" if llama_cpp.llama_supports_gpu_offload() else "unavailable",
        )
        return engine

    @property
    def kv_tokens(self) -> int:
        """KV cache cells in all: ``n_ctx`` shared by the slots, or ``n_ctx`` per slot (``kv_per_slot``)."""
        return llama_cpp.llama_n_ctx(self._context.ctx)

    @property
    def parallel(self) -> int:
        return self.options.parallel

    @property
    def n_layer(self) -> int:
        return llama_cpp.llama_model_n_layer(self._model.llama_model.model)

    @property
    def threads(self) -> tuple[int, int]:
        """(decode, prompt) threads of the context."""
        return llama_cpp.llama_n_threads(self._context.ctx), llama_cpp.llama_n_threads_batch(self._context.ctx)

    @property
    def chat_template_is_fallback(self) -> bool:
        """True when the model has no usable chat template and ChatML is used instead."""
        return self._chat.is_fallback

    @property
    def chat_stop(self) -> tuple[str, ...]:
        """Stop strings chat requests should add: ("<|im_end|>",) with the fallback, else ()."""
        return self._chat.stop

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        with self._in_use() as model:
            return model.tokenize(text, add_special)

    def tokenize_prompt(self, text: str) -> list[int]:
        """A ``/v1/completions`` text prompt: its BOS added, unless the text begins with the BOS
        text already (lm-evaluation-harness's ``add_bos_token`` sends "<s>..."), as chat prompts
        (``_tokenize_rendered``): one BOS, never two."""
        with self._in_use():
            return self._tokenize_rendered(text)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of generated tokens, exactly as the stream emits it (control tokens render empty)."""
        with self._in_use() as model:
            return model.detokenize(tokens)

    def prepare_chat(self, request: ChatRequest) -> ChatPrompt:
        """Render a chat request with the model's template and tokenize it (see ``conversation``).

        Raises ``ChatRequestError`` (a ValueError naming the field) for anything it cannot honour.
        """
        with self._in_use() as model:
            return prepare_chat(self._chat, request, self._tokenize_rendered, model.special_tokens)

    def token_bytes(self, token: int) -> bytes:
        """A token's bytes as logprobs show it (control tokens by their text)."""
        if self._closing or self._model is None:
            raise EngineClosed("the engine is closed")
        return self._model.piece(token, special=True)

    def text_bytes(self, token: int) -> bytes:
        """A token's bytes as its text shows it (control tokens render as nothing): where an echoed
        prompt's tokens start in its text (``text_offset``)."""
        if self._closing or self._model is None:
            raise EngineClosed("the engine is closed")
        return self._model.piece(token)

    def tokenize_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """The prompt tokens of plain messages; ValueError on bad messages."""
        return self.prepare_chat(ChatRequest(messages)).tokens

    def _tokenize_rendered(self, prompt: str) -> list[int]:
        """Called inside ``_in_use``. Most templates write the BOS text themselves; only add it
        when the template did not."""
        has_bos = bool(self._model.bos_text) and prompt.startswith(self._model.bos_text)
        refuse_far_past_context(lambda start: self._model.tokenize(start, add_special=not has_bos), prompt, self.n_ctx)
        return self._model.tokenize(prompt, add_special=not has_bos)

    def submit(
        self, request: GenerationRequest, *, shares_prompt_with: Generation | None = None, loop: asyncio.AbstractEventLoop | None = None,
        choices: int = 1, reservation: Reservation | None = None, later_prompt: bool = False,
    ) -> Generation:
        """Start a generation, to be iterated on ``loop`` (default: the running loop).

        Called from another thread with ``loop`` given, the cost of building the sampler (parsing
        a grammar) stays off that loop.

        ``shares_prompt_with``: another choice of the same request (``n`` > 1), submitted just
        before, with the same prompt. Its prompt is then decoded once and billed once
        (``sharing.py``): this generation's usage repeats the prompt count, the engine's
        counters do not.

        ``choices``: how many choices the request has, this one first and the rest submitted next
        with ``shares_prompt_with``. The queue must have room for all of them now, or none is queued.

        ``reservation``: a place held by ``reserve``, taken without a check.

        ``later_prompt``: a prompt after the first of one request's batch: the request is counted once.

        Raises before any work: ValueError for an invalid request, ContextOverflow when it cannot
        fit in one slot, Overloaded when the waiting queue is full, EngineClosed after close(),
        EngineFailed once the engine has failed.
        """
        loop = loop or asyncio.get_running_loop()
        with self._in_use():
            return self._submit(request, loop, shares_prompt_with, choices, reservation, later_prompt)

    @contextmanager
    def reserve(self, places: int) -> Iterator[Reservation]:
        """Hold ``places`` places for one request's generations (a batch's prompts × ``n``), all
        or none: raises Overloaded or EngineClosed. Each ``submit(..., reservation=...)`` then takes
        one whatever other requests do meanwhile, so a request is never refused half-admitted;
        the places not taken are given back on exit."""
        reservation = self._scheduler.reserve(places)
        try:
            yield reservation
        finally:
            self._scheduler.release(reservation)

    @property
    def capacity(self) -> int:
        """Requests (choices) that may be running or waiting at once: ``parallel`` + ``max_queue``."""
        return self._scheduler.capacity

    def check(self, request: GenerationRequest) -> None:
        """What ``submit`` would refuse before any work, without submitting (a batch of prompts is
        checked whole before its first is admitted): ValueError, ContextOverflow."""
        self._checked(request)

    def _checked(self, request: GenerationRequest) -> tuple[np.ndarray, frozenset[int]]:
        """The prompt, in the vocabulary and fitting the context, and the stop token ids."""
        # The prompt alone first, before any work on its ids (a buyer's 2M ids took the loop for
        # seconds); its message must not add max_tokens (0 for an echo).
        if len(request.prompt) >= self.n_ctx:
            raise ContextOverflow(len(request.prompt), None, self.n_ctx)
        prompt = validated_prompt(request.prompt, self._model.n_vocab)
        if request.max_tokens is not None and len(prompt) + request.max_tokens > self.n_ctx:
            raise ContextOverflow(len(prompt), request.max_tokens, self.n_ctx)
        return prompt, self._stop_ids(request.stop_token_ids)

    def _submit(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, sibling: Generation | None, choices: int,
        reservation: Reservation | None, later_prompt: bool,
    ) -> Generation:
        prompt, stop_ids = self._checked(request)
        source = sibling.task if sibling is not None else None
        tally = source.tally if source is not None else Tally(open=choices)
        if source is not None and not np.array_equal(source.prompt, prompt):
            raise ValueError("choices that share a prompt must have the same prompt")
        room = self.n_ctx - len(prompt)
        max_completion = room if request.max_tokens is None else request.max_tokens
        sampler = build_sampler(request.sampling, self._model, prompt, request.ignore_eos, request.min_tokens, request.preserve)
        request_id = uuid.uuid4().hex
        channel = Channel(loop)
        backend = self.options.backend_sampling and backend_sampling.supports(request)
        stops = stop_strings_for(
            request.stop, request.sampling.grammar, request.sampling.grammar_triggers, request.kept_stop, thought=request.thought
        )
        task = Task(
            request_id, prompt, sampler, max_completion, stops, channel, request.preserve, request.logprobs, backend,
            source if self._model.copies_prefixes else None,  # else each choice decodes the prompt itself
            later_choice=source is not None, later_prompt=later_prompt, tally=tally,
            stop_ids=stop_ids, keep_stop_token=request.include_stop, min_tokens=request.min_tokens,
            ends=np.fromiter(self._model.eog_tokens | stop_ids, dtype=np.int64) if request.min_tokens else None,
            prompt_logprobs=request.prompt_logprobs,
        )
        try:
            self._scheduler.submit(task, room=choices, reservation=reservation)
        except BaseException:
            sampler.close()
            raise
        return Generation(request_id, channel, self._scheduler.cancel, task)

    def _stop_ids(self, ids: frozenset[int]) -> frozenset[int]:
        """``stop_token_ids``, checked against the vocabulary; the end-of-generation tokens among
        them already end a request (their text never shows)."""
        for token in ids:
            if token >= self._model.n_vocab:
                raise ValueError(f"stop_token_ids token {token} is not in the vocabulary (size {self._model.n_vocab})")
        return ids - self._model.eog_tokens

    def stats(self) -> EngineStats:
        return self._scheduler.stats()

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer serve (see ``liveness.py``); None while it can."""
        return self._scheduler.stats().failure

    def close(self) -> None:
        """Stop the scheduler, end pending generations with EngineClosed (EngineFailed once the
        engine has failed), free llama.cpp memory. Blocking: an event loop calls it in a thread.

        Every request is ended within ``ANSWER_WITHIN_SECONDS``, even under a step that runs on
        (``Scheduler.abandon``); the memory is freed only once that step and every tokenize call
        in other threads have ended, waited for up to ``CLOSE_WAIT_SECONDS`` (or until ``hurry``),
        else left alone: freeing it under them would crash the process.
        """
        with self._idle:
            if self._closing:
                return
            self._closing = True
        deadline = time.monotonic() + CLOSE_WAIT_SECONDS
        if not self._stop_scheduler(deadline):
            log.error("the scheduler is still inside a decode step; exiting without freeing the model")
            return
        with self._idle:
            if not self._idle.wait_for(lambda: self._users == 0 or self._hurried, max(0.0, deadline - time.monotonic())) or self._users:
                log.error("%d tokenize call(s) still running; not freeing the model under them", self._users)
                return
        self._context.close()
        self._model.close()
        self._model = None

    def hurry(self) -> None:
        """Stop now (a second Ctrl-C or SIGTERM): ``close``, running or to come, still ends every
        request, giving a step ``ANSWER_WITHIN_SECONDS`` to end as usual, but then waits no more
        for it or for tokenize calls, leaving the memory to the exit. Thread-safe."""
        with self._idle:
            self._hurried = True
            self._idle.notify_all()

    def _stop_scheduler(self, deadline: float) -> bool:
        """Stop the scheduler, its requests ended within ``ANSWER_WITHIN_SECONDS`` whatever its
        step does; True once its thread has ended, by ``deadline``."""
        failure = self.failure  # read first: a closed scheduler reports no stall
        if self._scheduler.stop(ANSWER_WITHIN_SECONDS):
            return True
        ended = EngineFailed(failure) if failure is not None else EngineClosed("the engine was closed before this request finished")
        self._scheduler.abandon(ended)
        if failure is not None:
            return False  # a failed engine's step is not going to end
        log.warning("a decode step still runs %gs after the stop: its requests were ended; waiting for it before freeing the model", ANSWER_WITHIN_SECONDS)
        return self._scheduler_ended_within(deadline)

    def _scheduler_ended_within(self, deadline: float) -> bool:
        """Wait for the stopped scheduler's thread to end, until ``deadline`` or ``hurry``."""
        while not self._scheduler.stop(max(0.0, min(POLL_SECONDS, deadline - time.monotonic()))):
            if self._hurried or time.monotonic() >= deadline:
                return False
        return True

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _in_use(self) -> Iterator[Model]:
        """The model, kept alive until the block ends; EngineFailed / EngineClosed when unusable."""
        with self._idle:
            failure = self._scheduler.stats().failure
            if failure is not None:
                raise EngineFailed(failure)
            if self._closing or self._scheduler.closed:
                raise EngineClosed("the engine is closed")
            self._users += 1
        try:
            yield self._model
        finally:
            with self._idle:
                self._users -= 1
                self._idle.notify_all()


def kv_layout(per_slot: bool, n_ctx: int) -> str:
    """How the KV cache is laid out, for the startup log."""
    if per_slot:
        return f"a KV cache of {n_ctx} tokens per slot"
    return f"one KV cache of {n_ctx} tokens shared by the slots"


def fit_to_training_context(options: EngineOptions, model: Model) -> tuple[EngineOptions, int]:
    """The options with the KV cache sized for what the model was trained on, and the longest
    request it may serve (``trained_context``: past the training context output degrades silently)."""
    served = served_context(options.n_ctx, options.parallel, options.kv_per_slot, model.n_ctx_train)
    if served.capped(options.n_ctx):
        # A context the user asked for is a warning; the default on a shorter-trained model is not.
        log.log(logging.WARNING if options.n_ctx_explicit else logging.INFO,
                "context_length %d is more than %s was trained on; serving requests of up to %d tokens, %s",
                options.n_ctx, model.name, served.request_tokens, kv_layout(options.kv_per_slot, served.cache_tokens))
    return replace(options, n_ctx=served.cache_tokens), served.request_tokens
