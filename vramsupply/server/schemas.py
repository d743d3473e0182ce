"""Request bodies of the OpenAI API, validated with pydantic.

Unknown fields are ignored, as OpenAI-compatible servers do, but fields that would change the
answer in a way we cannot honour (logprobs, tools, echo) are rejected with a 400 instead of being
silently dropped. Sampling fields left out keep llama.cpp's defaults (``SamplingParams``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_CHOICES = 16
# Every stop string is searched for after every token on the one scheduler thread that decodes all
# slots, so an unbounded list would let one request slow every other (200k cost 0.2 s a token).
MAX_STOP_STRINGS = 16


def _unsupported(value: Any, what: str) -> Any:
    """Reject a feature the client asked for (a truthy value) rather than silently ignoring it."""
    if value:
        raise ValueError(f"{what} not supported by this server")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """``text``, ``json_object`` (any JSON object) or ``json_schema`` (output constrained by a grammar)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self


class GenerationBody(_Body):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[int, float] = Field(default_factory=dict)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # llama.cpp extensions
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        """``stop`` may be one string or a list; empty strings would stop immediately, so they are dropped."""
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        return [s for s in value if s != ""] if isinstance(value, list) else value

    @field_validator("n", "stream", "logit_bias", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """Clients often send explicit nulls for fields they did not set."""
        if value is None:
            return cls.model_fields[info.field_name].get_default(call_default_factory=True)
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[int, float]) -> dict[int, float]:
        for token, bias in value.items():
            if token < 0:
                raise ValueError(f"token id {token} is negative")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias for token {token} must be between -100 and 100, got {bias}")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        """Content parts are joined into one string; only text parts exist for a text model."""
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValueError("each content part must be an object with a 'type'")
            if part["type"] != "text":
                raise ValueError(f"content parts of type {part['type']!r} are not supported: this model reads text only")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs a string 'text'")
            texts.append(part["text"])
        return "\n".join(texts)

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def for_template(self) -> dict[str, str]:
        """The plain ``{"role", "content"}`` dict the engine's ``tokenize_chat`` takes (it maps ``developer`` to ``system``)."""
        return {"role": self.role, "content": self.content or ""}


class ChatCompletionBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        return _unsupported(value, "logprobs are")

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        return _unsupported(value, "tools (function calling) are")

    @property
    def token_limit(self) -> int | None:
        """``max_completion_tokens`` is OpenAI's newer name; when both are given it wins."""
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(GenerationBody):
    """A legacy text completion; like OpenAI, ``max_tokens`` defaults to 16 here."""

    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)
    response_format: ResponseFormat | None = None
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _single_prompt(cls, value: Any) -> Any:
        """One prompt per request: a string, a list holding one string, or a list of token ids."""
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]
        if isinstance(value, str):
            if value == "":
                raise ValueError("the prompt must not be empty")
            return value
        if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        raise ValueError("the prompt must be a non-empty string or a non-empty list of token ids (one prompt per request)")

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _default_max_tokens(cls, value: Any) -> Any:
        return 16 if value is None else value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        return _unsupported(value, "logprobs are")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        return _unsupported(value, "echo is")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        return _unsupported(value, "suffix (insertion) is")

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        _unsupported(value is not None and value > 1, "best_of above 1 is")
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens
