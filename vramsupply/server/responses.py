"""Response bodies and stream chunks, field for field in OpenAI's shape.

Models are serialized with ``exclude_unset``: every field a builder sets appears (``null``
included, as OpenAI writes ``"logprobs": null``), and fields OpenAI leaves out stay out (a chunk's
``usage`` unless ``stream_options.include_usage``, a delta's ``role`` after the first chunk).
"""

from __future__ import annotations

import secrets
import time
from typing import Literal

from pydantic import BaseModel

from vramsupply.engine import Usage

FinishReason = Literal["stop", "length"]


class _Out(BaseModel):
    def to_json(self) -> str:
        return self.model_dump_json(exclude_unset=True)


class PromptTokensDetails(_Out):
    cached_tokens: int


class UsageOut(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def combine(cls, usages: list[Usage]) -> UsageOut:
        """Usage of one request with n choices: the prompt counts once (as OpenAI bills it), completions add up."""
        first = usages[0]
        completion = sum(u.completion_tokens for u in usages)
        return cls(
            prompt_tokens=first.prompt_tokens,
            completion_tokens=completion,
            total_tokens=first.prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=first.cached_tokens),
        )


class ChatMessageOut(_Out):
    role: Literal["assistant"]
    content: str
    refusal: None


class ChatChoice(_Out):
    index: int
    message: ChatMessageOut
    logprobs: None
    finish_reason: FinishReason


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut


class ChatDelta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageOut | None = None


class TextChoice(_Out):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason | None


class TextCompletion(_Out):
    """Both the whole response and each stream chunk of ``/v1/completions`` (OpenAI uses one shape)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: UsageOut | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    """``chatcmpl-…`` / ``cmpl-…``: unguessable, so ids never collide across restarts."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())
