"""How a streamed or whole response is written (``ResponseShape``), what both routes' shapes
share (``ShapeBase``), and the text completion's shape.

The generation plumbing in ``completions.py`` is shared by ``/v1/completions`` and
``/v1/chat/completions``; each route only says how its results look. Stream chunks come back as
ready SSE events; a plain text chunk is filled into a template serialized once (``chunks.py``).

Every response and every chunk carries a ``system_fingerprint``, as OpenAI's do: it names the
configuration that writes the answers (``system_fingerprint``), so a client comparing seeded
answers learns when a difference comes from the server's setup rather than from sampling.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import json
import re
import weakref
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Protocol

import vramsupply

from vramsupply.engine import Engine, Generation
from vramsupply.engine.logprobs import TokenLogprob
from vramsupply.server.chunks import ChunkTemplate, sse_event
from vramsupply.server.logprobs_out import TokenBytes, text_logprobs
from vramsupply.server.prompt_logprobs import EchoTextChoice, EchoTextCompletion, EchoTextLogprobs, joined, prompt_logprobs
from vramsupply.server.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    FinishReason,
    UsageOut,
)

Logprobs = list[TokenLogprob] | None  # one choice's logprobs, or None when not asked for
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FINGERPRINTS: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()


def system_fingerprint(engine: Engine) -> str:
    """``fp_`` and ten hex digits of a hash of what decides the engine's outputs: vramsupply's and
    llama.cpp's versions, the model file (its sha256 where a Hub cache names its blob by it, else
    its path, size and modification time) and the settings that change the numbers (context,
    batch sizes, offload, attention, KV cache types, the GPU split, sampling on the device).
    Threads, slots and queue do not. The same setup gives the same fingerprint after a restart."""
    found = _FINGERPRINTS.get(engine)
    if found is None:
        options = engine.options
        gpu = options.gpu
        settings = {
            "vramsupply": vramsupply.__version__, "llama_cpp": _version("llama_cpp_python"), "model": _file_identity(options.model_path),
            "n_ctx": engine.n_ctx, "n_batch": engine.n_batch, "n_ubatch": options.n_ubatch, "n_gpu_layers": options.n_gpu_layers,
            "flash_attention": options.flash_attention, "backend_sampling": options.backend_sampling,
            "gpu": [gpu.split_mode, gpu.main_gpu, list(gpu.tensor_split), list(gpu.devices), gpu.cache_type_k, gpu.cache_type_v],
        }
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        found = _FINGERPRINTS[engine] = "fp_" + digest[:10]
    return found


def _file_identity(path: Path) -> str:
    resolved = Path(path).resolve()
    if resolved.parent.name == "blobs" and _SHA256.fullmatch(resolved.name):  # a Hub cache's blob: named by its sha256
        return resolved.name
    try:
        stat = resolved.stat()
    except OSError:
        return str(resolved)
    return f"{resolved}:{stat.st_size}:{stat.st_mtime_ns}"


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


class FingerprintedChatCompletion(ChatCompletion):
    system_fingerprint: str | None = None


class FingerprintedChatChunk(ChatCompletionChunk):
    system_fingerprint: str | None = None


class FingerprintedTextCompletion(EchoTextCompletion):
    """Both the whole response and each stream chunk of ``/v1/completions`` (an echoed prompt's
    first token has ``null`` logprobs: ``prompt_logprobs.py``)."""

    system_fingerprint: str | None = None


class ResponseShape(Protocol):
    """How one route writes its results; the generation plumbing is shared."""

    id: str
    prompt_param: str
    include_usage: bool

    def response(self, texts: Sequence[str], finishes: Sequence[FinishReason], usage: UsageOut, logprobs: Sequence[Logprobs]) -> str: ...
    # The stream's chunks, each already an SSE event.
    def opening_chunk(self, index: int) -> bytes | None: ...
    def text_chunks(self, index: int, text: str, logprobs: Logprobs) -> list[bytes]: ...
    def finish_chunks(self, index: int, finish: FinishReason, logprobs: Logprobs) -> list[bytes]: ...
    def usage_chunk(self, usage: UsageOut) -> bytes: ...
    def track(self, generations: Sequence[Generation]) -> None: ...


@dataclasses.dataclass
class ShapeBase(abc.ABC):
    """What both routes' shapes share: the response's identity, and chunks as SSE events."""

    id: str
    created: int
    model: str
    include_usage: bool
    token_bytes: TokenBytes
    system_fingerprint: str | None = dataclasses.field(default=None, kw_only=True)

    _templates: dict[tuple[Any, ...], ChunkTemplate] = dataclasses.field(default_factory=dict, kw_only=True, repr=False)

    chunk_type: ClassVar[type[Any]]
    chunk_object: ClassVar[str]

    def _chunk(self, choices: list[Any], usage: UsageOut | None = None) -> bytes:
        return sse_event(self._document(choices, usage).encode())

    def _document(self, choices: list[Any], usage: UsageOut | None = None) -> str:
        chunk = self._identified(self.chunk_type, object=self.chunk_object, choices=choices)
        if self.include_usage:
            chunk.usage = usage
        return chunk.to_json()

    def _identified(self, model: type[Any], **fields: Any) -> Any:
        """A response or chunk with this response's id, creation time, model and fingerprint."""
        document = model(id=self.id, created=self.created, model=self.model, **fields)
        if self.system_fingerprint is not None:
            document.system_fingerprint = self.system_fingerprint
        return document

    def _template(self, *key: Any) -> ChunkTemplate:
        """The text chunk ``_text_document(*key, text)`` writes, serialized once per ``key`` and
        filled in per text (``chunks.py``)."""
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = ChunkTemplate(functools.partial(self._text_document, *key))
        return template

    @abc.abstractmethod
    def _text_document(self, *key_and_text: Any) -> str:
        """The chunk document of one text, for the template keyed by the arguments before it."""


@dataclasses.dataclass
class TextShape(ShapeBase):
    prompt_param: str = "prompt"
    per_prompt: int = 1  # choices to a prompt: choice i answers prompt i // per_prompt
    echo: Sequence[str | list[int]] = ()  # with ``echo``, the prompts, whose text begins their choices'
    detokenize: Callable[[list[int]], str] | None = None
    scored: Sequence[list[int]] = ()  # with ``echo`` and ``logprobs``, the prompts' tokens, scored first
    text_bytes: TokenBytes | None = None  # a token's bytes as its text shows them (``prompt_logprobs.prompt_offsets``)
    _prompt_shown: set[int] = dataclasses.field(default_factory=set)  # choices whose prompt logprobs were written
    _echo_texts: list[str] = dataclasses.field(default_factory=list)
    _taken: dict[int, int] = dataclasses.field(default_factory=dict)  # per choice: tokens whose logprobs were written
    _generations: Sequence[Generation] = ()

    chunk_type = FingerprintedTextCompletion
    chunk_object = "text_completion"

    def response(self, texts: Sequence[str], finishes: Sequence[FinishReason], usage: UsageOut, logprobs: Sequence[Logprobs]) -> str:
        choices = [
            EchoTextChoice(index=i, text=self._echoed(i) + text, logprobs=self._logprobs(i, entries), finish_reason=finish)
            for i, (text, finish, entries) in enumerate(zip(texts, finishes, logprobs))
        ]
        return self._identified(FingerprintedTextCompletion, object="text_completion", choices=choices, usage=usage).to_json()

    def opening_chunk(self, index: int) -> bytes | None:
        """With ``echo``, the choice's prompt as its first chunk, with its logprobs when asked
        (once they are in: ``Generation.prompt_scored``)."""
        echoed = self._echoed(index)
        if echoed and self.scored:
            return self._chunk([EchoTextChoice(index=index, text=echoed, logprobs=self._prompt_part(index), finish_reason=None)])
        return self._template(index).event(echoed) if echoed else None

    def track(self, generations: Sequence[Generation]) -> None:
        """The generations say where each token's text starts (``text_offset``). They were admitted,
        so token-id prompts are known to be in the vocabulary: their echo can be written."""
        self._generations = generations
        detokenize = self.detokenize
        self._echo_texts = [p if isinstance(p, str) or detokenize is None else detokenize(p) for p in self.echo]

    def _echoed(self, index: int) -> str:
        """The prompt text ``echo`` puts before choice ``index``'s text ("" without echo)."""
        return self._echo_texts[index // self.per_prompt] if self._echo_texts else ""

    def text_chunks(self, index: int, text: str, logprobs: Logprobs) -> list[bytes]:
        if logprobs is None:
            return [self._template(index).event(text)]
        return [self._chunk([EchoTextChoice(index=index, text=text, logprobs=self._logprobs(index, logprobs), finish_reason=None)])]

    def _text_document(self, index: int, text: str) -> str:
        return self._document([EchoTextChoice(index=index, text=text, logprobs=None, finish_reason=None)])

    def finish_chunks(self, index: int, finish: FinishReason, logprobs: Logprobs) -> list[bytes]:
        return [self._chunk([EchoTextChoice(index=index, text="", logprobs=self._logprobs(index, logprobs), finish_reason=finish)])]

    def _logprobs(self, index: int, entries: Logprobs) -> EchoTextLogprobs | None:
        """The completion tokens' logprobs since the last call, after the prompt's when they were
        not written yet; with ``echo``, offsets count from the start of the echoed prompt."""
        if entries is None:
            return None
        first = self._taken.get(index, 0)
        self._taken[index] = first + len(entries)
        starts = self._generations[index].token_text_starts(first, len(entries)) if index < len(self._generations) else [0] * len(entries)
        echoed = len(self._echoed(index))
        completion = text_logprobs(entries, self.token_bytes, [echoed + start for start in starts] if echoed else starts)
        return joined(self._prompt_part(index), completion)

    def _prompt_part(self, index: int) -> EchoTextLogprobs | None:
        """Choice ``index``'s prompt logprobs, the first time they are asked for (None after, and
        when not asked for or never computed: the request failed before its prompt was in)."""
        if not self.scored or index in self._prompt_shown or index >= len(self._generations) or self.text_bytes is None:
            return None
        self._prompt_shown.add(index)
        scores = self._generations[index].prompt_logprobs
        if scores is None:
            return None
        tokens = self.scored[index // self.per_prompt]
        return prompt_logprobs(tokens, scores, self._echoed(index), self.token_bytes, self.text_bytes)

    def usage_chunk(self, usage: UsageOut) -> bytes:
        return self._chunk([], usage)
