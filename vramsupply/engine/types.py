"""Public value types and errors of the engine: what the HTTP server and serve lifecycle code against.

Every dataclass validates itself on construction so that bad input becomes a ``ValueError`` with a
readable message long before anything reaches llama.cpp, where it could abort the whole process.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vramsupply.config.settings import MAX_NICE
from vramsupply.errors import VramsupplyError
from vramsupply.gpu.options import GpuOptions

from .liveness import DEFAULT_STALL_TIMEOUT
from .text import Thought

FLASH_ATTENTION_MODES = ("auto", "on", "off")
MAX_TOP_K = 1 << 20
"""More than any vocabulary, and far below llama.cpp's 32-bit int, which a larger value would wrap."""


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class EngineError(VramsupplyError):
    """Base of every error the engine raises; the message is one readable line."""


class Overloaded(EngineError):
    """All slots are busy and the waiting queue is full (the HTTP layer answers 429)."""


class EngineClosed(EngineError):
    """The engine was closed: new requests are refused and pending ones fail with this."""


class EngineFailed(EngineError):
    """The engine can no longer serve: its scheduler thread died or a decode step stalled."""


class ContextOverflow(EngineError):
    """The prompt, or the prompt plus ``max_tokens``, does not fit in one slot's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int | None, n_ctx: int, *, at_least: bool = False) -> None:
        """``at_least``: ``prompt_tokens`` are the tokens of the prompt's start alone (``Engine``
        counts no further once they are past the context)."""
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.n_ctx = n_ctx
        if max_tokens is None:
            message = (
                f"the prompt has {'more than ' if at_least else ''}{prompt_tokens} tokens but the context holds {n_ctx} "
                f"(at most {n_ctx - 1} prompt tokens, leaving room for one generated token)"
            )
        else:
            message = (
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
                f"{prompt_tokens + max_tokens} tokens, more than the context of {n_ctx}"
            )
        super().__init__(message)


@dataclass(frozen=True)
class EngineOptions:
    """How to load the model and size the scheduler; mirrors the engine rows of ``Settings``."""

    model_path: Path
    n_ctx: int = 8192  # Settings.context_length's default
    n_ctx_explicit: bool = True  # the user set it; a default capped by the training context is no warning
    parallel: int = 16
    kv_per_slot: bool = False  # one KV of n_ctx per slot instead of one n_ctx KV shared by all slots
    n_gpu_layers: int = -1
    n_batch: int = 2048
    n_ubatch: int = 512
    flash_attention: str = "auto"
    threads: int | None = None
    max_queue: int = 64
    cache_ram: int | None = None
    draft_max: int | None = None
    backend_sampling: bool = False
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    stream_interval_ms: float = 30.0  # mid-answer tokens reach the event loop at most this often (cadence.py)
    gpu: GpuOptions = field(default_factory=GpuOptions)
    decode_nice: int | None = None  # nice levels the decode goes below the agent (None: priority.COMPUTE_NICE_OFFSET; 0: none)

    def __post_init__(self) -> None:
        _require(self.n_ctx >= 2, f"n_ctx must be at least 2, got {self.n_ctx}")
        _require(self.parallel >= 1, f"parallel must be at least 1, got {self.parallel}")
        _require(self.n_gpu_layers >= -1, f"n_gpu_layers must be -1 (all) or more, got {self.n_gpu_layers}")
        _require(self.n_batch >= 1, f"n_batch must be at least 1, got {self.n_batch}")
        _require(self.n_ubatch >= 1, f"n_ubatch must be at least 1, got {self.n_ubatch}")
        # One decode step holds the next token of every generating slot, so it must fit them all.
        _require(
            self.n_batch >= self.parallel,
            f"n_batch ({self.n_batch}) must be at least parallel ({self.parallel})",
        )
        # The slots share one cache of n_ctx cells (and llama.cpp's batch is at most n_ctx rows).
        _require(
            self.kv_per_slot or self.n_ctx >= self.parallel,
            f"n_ctx ({self.n_ctx}) must be at least parallel ({self.parallel}): the slots share one KV cache of n_ctx cells",
        )
        _require(
            self.flash_attention_mode in FLASH_ATTENTION_MODES,
            f"flash_attention must be one of {', '.join(FLASH_ATTENTION_MODES)}, got {self.flash_attention!r}",
        )
        _require(self.threads is None or self.threads >= 1, f"threads must be at least 1, got {self.threads}")
        _require(self.decode_nice is None or 0 <= self.decode_nice <= MAX_NICE, f"decode_nice must be 0 to {MAX_NICE}, got {self.decode_nice}")
        _require(self.max_queue >= 0, f"max_queue must be 0 or more, got {self.max_queue}")
        _require(self.cache_ram is None or self.cache_ram >= 0, f"cache_ram must be 0 (off) or more MiB, got {self.cache_ram}")
        _require(self.draft_max is None or self.draft_max >= 0, f"draft_max must be 0 (off) or more, got {self.draft_max}")
        _require(_finite(self.stream_interval_ms) and 0 <= self.stream_interval_ms <= 1000,
                 f"stream_interval_ms must be 0 (every step) to 1000, got {self.stream_interval_ms}")
        _require(_finite(self.stall_timeout) and self.stall_timeout > 0, f"stall_timeout must be more than 0 seconds, got {self.stall_timeout}")
        self.gpu.flash_attention(self.flash_attention_mode)  # a quantized V cache refuses flash attention off

    @property
    def flash_attention_mode(self) -> str:
        """The mode as a plain string (auto, on or off), also when given ``Settings``' enum."""
        return str(getattr(self.flash_attention, "value", self.flash_attention))


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; each request gets its own llama.cpp sampler chain built from these."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    grammar: str | None = None
    # Regular expressions over the output: when given, the grammar applies only from the first
    # group of the first match on (a lazy grammar, as llama.cpp uses for tool calls).
    grammar_triggers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(_finite(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _require(_finite(self.top_p) and 0 <= self.top_p <= 1, f"top_p must be in [0, 1], got {self.top_p}")
        _require(0 <= self.top_k <= MAX_TOP_K, f"top_k must be between 0 (disabled) and {MAX_TOP_K}, got {self.top_k}")
        _require(_finite(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _require(
            _finite(self.repeat_penalty) and self.repeat_penalty > 0, f"repeat_penalty must be > 0, got {self.repeat_penalty}"
        )
        _require(_finite(self.presence_penalty), f"presence_penalty must be a finite number, got {self.presence_penalty}")
        _require(_finite(self.frequency_penalty), f"frequency_penalty must be a finite number, got {self.frequency_penalty}")
        for token, bias in self.logit_bias.items():
            _require(isinstance(token, int) and token >= 0, f"logit_bias keys must be token ids (ints >= 0), got {token!r}")
            _require(
                isinstance(bias, (int, float)) and not math.isnan(bias),
                f"logit_bias for token {token} must be a number, got {bias!r}",
            )
        _require(self.grammar is None or self.grammar.strip() != "", "grammar must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationRequest:
    """One completion: token ids in, text deltas out."""

    prompt: Sequence[int]
    sampling: SamplingParams = SamplingParams()
    max_tokens: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    # Control tokens to render as text (a chat format's tool-call and thinking markers).
    preserve: frozenset[int] = frozenset()
    # Report each generated token's log-probability and this many alternatives (0-20); None: don't.
    logprobs: int | None = None
    # Report each prompt token's log-probability (after the tokens before it; the first has none)
    # and this many alternatives (0-20), as an echo with logprobs shows them; None: don't. The
    # prompt is then decoded whole, never from a cached prefix (those positions have no logits).
    prompt_logprobs: int | None = None
    # vLLM's fields: sampling one of these token ids ends the request as a stop string does (its
    # text dropped); ``include_stop`` keeps a stop token's text, and the stop strings among
    # ``kept_stop`` (the buyer's own, never a chat template's) theirs, at the end of the output;
    # until ``min_tokens`` tokens are out, end-of-generation and stop tokens cannot be sampled and
    # stop strings do not stop.
    stop_token_ids: frozenset[int] = frozenset()
    include_stop: bool = False
    kept_stop: frozenset[str] = frozenset()
    min_tokens: int = 0
    # A grammar that lets a thought come before the answer it holds (a thought the chat prompt
    # left open, ending at ``</think>``; harmony's optional analysis message): stop strings apply
    # in the thought, as in any text no grammar holds, and not after it (``text.stop_strings_for``).
    thought: Thought | None = None

    def __post_init__(self) -> None:
        _require(len(self.prompt) > 0, "the prompt must contain at least one token")
        _require(self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be between 0 and 20, got {self.logprobs}")
        _require(
            self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, f"prompt_logprobs must be between 0 and 20, got {self.prompt_logprobs}"
        )
        # (alone it would leave the request's sampling free to run in llama.cpp's graph, whose
        # logits never reach the host: ``backend_sampling.supports`` looks at ``logprobs``)
        _require(self.prompt_logprobs is None or self.logprobs is not None, "prompt_logprobs needs logprobs (the completion's) too")
        # 0: the prompt is decoded (scored) and nothing generated, the request ends with "length".
        _require(self.max_tokens is None or self.max_tokens >= 0, f"max_tokens must be 0 or more, got {self.max_tokens}")
        _require(not isinstance(self.stop, str), "stop must be a sequence of strings, not a single string")
        _require(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        _require(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be token ids (ints >= 0)")
        _require(self.min_tokens >= 0, f"min_tokens must be 0 or more, got {self.min_tokens}")
        _require(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            f"min_tokens ({self.min_tokens}) must not be more than max_tokens ({self.max_tokens})",
        )


@dataclass(frozen=True)
class Usage:
    """Exact token accounting of one request; this is what buyers are billed for.

    ``prompt_tokens`` is the length of the request's prompt once it reached a slot (0 for one that
    ended while still queued: nothing of it was computed, and the engine's counters, which
    heartbeats report, never counted it). ``cached_tokens`` of those were not computed again because the slot's KV cache
    already held them (a reused prefix). The engine may still decode up to 63 of them again with the
    rest of the prompt, to fill a whole flash-attention tile (``sharing.rewind_for_tile``, faster on
    a CPU): that is its own choice, made by the step's measured timing, so they stay counted as
    cached and a buyer's count does not depend on how busy the machine was.

    ``completion_tokens`` counts every token sampled for the request except an end-of-generation
    token (EOS/EOT), which ends the request without being part of its output. Tokens whose text
    contains a stop string are counted: the model generated them.
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot of the scheduler, for /health, /metrics and heartbeats."""

    slots_total: int
    slots_busy: int
    queue_depth: int
    prompt_tokens_total: int
    completion_tokens_total: int
    cached_tokens_total: int
    requests_total: int
    prompt_cache_bytes: int = 0
    prompt_cache_entries: int = 0
    prompt_cache_bound_bytes: int = 0
    """What the prompt cache keeps to: what recent restores reach, within ``--cache-ram`` (``working_set``)."""
    draft_tokens_total: int = 0
    draft_accepted_total: int = 0
    preemptions_total: int = 0
    """Requests paused because the shared KV cache ran out, resumed later by recomputing (``preempt``)."""
    prefill_tokens_total: int = 0
    """Prompt tokens actually decoded: cached prefixes and prompts shared between choices are not."""
    prompt_cache_saves_total: int = 0
    """Slots' KV copied to the host prompt cache."""
    prompt_cache_skipped_saves_total: int = 0
    """Slots' KV dropped rather than saved, the copy not paying for its expected reuse (``save_policy``)."""
    checkpoints_total: int = 0
    """Recurrent states copied part way through a prompt (``checkpoints``)."""
    checkpoint_restores_total: int = 0
    """Prompts started from such a copy instead of from nothing."""
    checkpoint_bytes: int = 0
    """Host memory of the checkpoints the slots keep (those of parked conversations count in
    ``prompt_cache_bytes``, within ``--cache-ram``)."""
    cpu_threads: int = 0
    """The CPU threads the decode uses now: fewer than configured while other programs keep the
    CPUs busy (``thread_tuner.py``)."""
    thread_switches_total: int = 0
    """Times the decode changed its CPU threads, for a busy or a freed machine."""
    failure: str | None = None
    """Why the engine can no longer serve (its thread died, or a step stalled); None while healthy."""
    unavailable: str | None = None
    """Why the engine cannot serve right now but may recover (an upstream is down or restarting)."""

    @property
    def slots_idle(self) -> int:
        """Slots a new request could start on now. None while any request waits: a new one would
        wait behind it, also when slots are empty and the waiting wait for room in the shared KV
        cache (which /health used to show as idle slots beside a queue)."""
        return 0 if self.queue_depth else max(0, self.slots_total - self.slots_busy)
