"""How a streamed or whole response is written (``ResponseShape``), what both routes' shapes
share (``ShapeBase``), and the text completion's shape.

The generation plumbing in ``completions.py`` is shared by ``/v1/completions`` and
``/v1/chat/completions``; each route only says how its results look. Stream chunks come back as
ready SSE events; a plain text chunk is filled into a template serialized once (``chunks.py``).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

from vramsupply.engine import Generation
from vramsupply.engine.logprobs import TokenLogprob
from vramsupply.server.chunks import ChunkTemplate, sse_event
from vramsupply.server.logprobs_out import TokenBytes, text_logprobs
from vramsupply.server.responses import FinishReason, TextChoice, TextCompletion, TextLogprobs, UsageOut

Logprobs = list[TokenLogprob] | None  # one choice's logprobs, or None when not asked for


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

    _templates: dict[tuple[Any, ...], ChunkTemplate] = dataclasses.field(default_factory=dict, kw_only=True, repr=False)

    chunk_type: ClassVar[type[Any]]
    chunk_object: ClassVar[str]

    def _chunk(self, choices: list[Any], usage: UsageOut | None = None) -> bytes:
        return sse_event(self._document(choices, usage).encode())

    def _document(self, choices: list[Any], usage: UsageOut | None = None) -> str:
        chunk = self.chunk_type(id=self.id, object=self.chunk_object, created=self.created, model=self.model, choices=choices)
        if self.include_usage:
            chunk.usage = usage
        return chunk.to_json()

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
    _taken: dict[int, int] = dataclasses.field(default_factory=dict)  # per choice: tokens whose logprobs were written
    _generations: Sequence[Generation] = ()

    chunk_type = TextCompletion
    chunk_object = "text_completion"

    def response(self, texts: Sequence[str], finishes: Sequence[FinishReason], usage: UsageOut, logprobs: Sequence[Logprobs]) -> str:
        choices = [
            TextChoice(index=i, text=text, logprobs=self._logprobs(i, entries), finish_reason=finish)
            for i, (text, finish, entries) in enumerate(zip(texts, finishes, logprobs))
        ]
        return TextCompletion(
            id=self.id, object="text_completion", created=self.created, model=self.model, choices=choices, usage=usage
        ).to_json()

    def opening_chunk(self, index: int) -> None:
        return None

    def track(self, generations: Sequence[Generation]) -> None:
        """The generations say where each token's text starts (``text_offset``)."""
        self._generations = generations

    def text_chunks(self, index: int, text: str, logprobs: Logprobs) -> list[bytes]:
        if logprobs is None:
            return [self._template(index).event(text)]
        return [self._chunk([TextChoice(index=index, text=text, logprobs=self._logprobs(index, logprobs), finish_reason=None)])]

    def _text_document(self, index: int, text: str) -> str:
        return self._document([TextChoice(index=index, text=text, logprobs=None, finish_reason=None)])

    def finish_chunks(self, index: int, finish: FinishReason, logprobs: Logprobs) -> list[bytes]:
        return [self._chunk([TextChoice(index=index, text="", logprobs=self._logprobs(index, logprobs), finish_reason=finish)])]

    def _logprobs(self, index: int, entries: Logprobs) -> TextLogprobs | None:
        if entries is None:
            return None
        first = self._taken.get(index, 0)
        self._taken[index] = first + len(entries)
        starts = self._generations[index].token_text_starts(first, len(entries)) if index < len(self._generations) else [0] * len(entries)
        return text_logprobs(entries, self.token_bytes, starts)

    def usage_chunk(self, usage: UsageOut) -> bytes:
        return self._chunk([], usage)
