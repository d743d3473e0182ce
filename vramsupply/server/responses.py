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

FinishReason = Literal["stop", "length", "tool_calls"]


class _Out(BaseModel):
    def to_json(self) -> str:
        return self.model_dump_json(exclude_unset=True)


class PromptTokensDetails(_Out):
    cached_tokens: int


class CompletionTokensDetails(_Out):
    reasoning_tokens: int


class UsageOut(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails | None = None

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


class FunctionOut(_Out):
    name: str | None = None
    arguments: str | None = None


class ToolCallOut(_Out):
    """A whole call in ``message.tool_calls``, or one fragment of it in a stream's ``delta.tool_calls``
    (``index`` on every fragment; ``id``, ``type`` and ``function.name`` on the first only)."""

    index: int | None = None
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionOut


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(_Out):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Out):
    content: list[TokenLogprobOut] | None
    refusal: None


class ChatMessageOut(_Out):
    role: Literal["assistant"]
    content: str | None
    refusal: None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Out):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None
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
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageOut | None = None


class TextLogprobs(_Out):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(_Out):
    index: int
    text: str
    logprobs: TextLogprobs | None
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
