"""Request bodies of the OpenAI API, validated with pydantic.

Unknown fields are ignored, as OpenAI-compatible servers do, but OpenAI fields that would change
the answer in a way we cannot honour (audio, suffix, the legacy functions API…) are rejected
with a 400 instead of being silently dropped; vLLM's and llama-server's are read in
``vllm_fields.py``. ``store: true`` is accepted and nothing is stored, as vLLM does: clients that
always send it would otherwise fail on every call. Sampling fields left out keep llama.cpp's
defaults (``SamplingParams``); ``top_k: -1`` is vLLM's "off", as 0 is llama.cpp's.

Types are strict, as OpenAI's are: ``"max_tokens": "5"``, ``true`` for a number, ``5.0`` for an
integer or ``"yes"`` for ``stream`` are a 400 naming the field, where they were quietly coerced
(``true`` asked for one token), hiding a client's bug that OpenAI would have shown it. An integer
stands for a number, and ``logit_bias``'s keys are token ids written as JSON's string keys.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationInfo, field_validator, model_validator

from vramsupply.engine import MAX_TOP_K, ChatRequest
from vramsupply.server.vllm_fields import VllmFields

MAX_CHOICES = 16
MAX_PROMPTS = 16  # prompts of one /v1/completions request; prompts × n stays within MAX_CHOICES
# Stop strings are matched on the one scheduler thread that decodes all slots (one automaton each,
# a few steps per generated character), and each one's table is built when the request arrives in
# Python, which holds the GIL the scheduler also needs: both are bounded.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 4096
# OpenAI allows 20 alternatives per token on chat and 5 on completions; both get 20 here.
MAX_TOP_LOGPROBS = 20
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
"""OpenAI's values, as its SDK types them; any other is a 400 there, and here it reached the chat
template as sent (gpt-oss's writes it into the system message: "Reasoning: extreme")."""


def _unsupported(value: Any, what: str) -> Any:
    """Reject a feature the client asked for (a truthy value) rather than silently ignoring it."""
    if value:
        raise ValueError(f"{what} not supported by this server")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


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


class ChatTemplateKwargs(BaseModel):
    """vLLM's ``chat_template_kwargs``: variables for the chat template, any name and JSON value.
    ``reasoning_effort`` among them is the variable the top-level field sets, so it is held to the
    same values (a 400 naming ``chat_template_kwargs.reasoning_effort``): "banana" or a number
    there reached the template as sent. A null one is not given, as at the top level."""

    model_config = ConfigDict(extra="allow", strict=True)

    reasoning_effort: ReasoningEffort | None = None

    def variables(self) -> dict[str, Any]:
        given = dict(self.__pydantic_extra__ or {})
        if self.reasoning_effort is not None:
            given["reasoning_effort"] = self.reasoning_effort
        return given


class GenerationBody(VllmFields):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    stop: list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)  # 0 keeps the likeliest token alone, as OpenAI and llama.cpp take it
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[Annotated[int, Strict(False)], float] = Field(default_factory=dict)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # llama.cpp extensions
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    # accepted and unused, but typed as OpenAI types them: a client's bug is a 400, as there
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        """``stop`` may be one string or a list; empty strings would stop immediately, so they are dropped."""
        if value is None:
            return []
        if isinstance(value, str):
            if len(value) > MAX_STOP_CHARS:  # said of ``stop``, which is what the buyer sent (not ``stop[0]``)
                raise ValueError(f"a stop string may be at most {MAX_STOP_CHARS} characters, got {len(value)}")
            value = [value]
        return [s for s in value if s != ""] if isinstance(value, list) else value

    @field_validator("top_k")
    @classmethod
    def _top_k_off(cls, value: int | None) -> int | None:
        """vLLM spells "no top-k" -1, llama.cpp 0."""
        return 0 if value == -1 else value

    @field_validator("n", "stream", "logit_bias", "ignore_eos", mode="before")
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


class ChatCompletionBody(GenerationBody):
    """A chat request. Its messages, tools and template options are only checked for their JSON
    shape here; the engine's chat contract (``Engine.prepare_chat``) judges their content."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None  # a string or a named function: checked where it is read (engine/conversation.py)
    parallel_tool_calls: bool | None = None
    reasoning_effort: ReasoningEffort | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    # OpenAI fields we cannot honour: refused rather than dropped.
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    modalities: list[str] | None = None
    store: bool | None = None  # accepted, nothing is stored (as at vLLM)
    metadata: dict[str, str] | None = None  # accepted with store; nothing is stored
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # the prompt cache needs no key: shared prefixes are found
    service_tier: str | None = None
    # vLLM's chat template switches (``vllm_fields.py``)
    add_generation_prompt: bool | None = None
    continue_final_message: bool = False

    @field_validator("continue_final_message", mode="before")
    @classmethod
    def _continue_null_is_false(cls, value: Any) -> Any:
        return False if value is None else value

    @field_validator("chat_template_kwargs", mode="before")
    @classmethod
    def _kwargs_object(cls, value: Any) -> Any:
        """Said as it was before ``ChatTemplateKwargs``, without that class's name in it."""
        if value is not None and not isinstance(value, dict):
            raise ValueError("Input should be a valid dictionary")
        return value

    @field_validator("functions", "function_call")
    @classmethod
    def _legacy_functions(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("the legacy functions API is not supported by this server; send tools and tool_choice instead")
        return value

    @field_validator("audio", "prediction", "web_search_options", "verbosity")
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        _unsupported(value is not None, f"{info.field_name} is")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        _unsupported(value is not None and set(value) - {"text"}, "output other than text is")
        return value

    @field_validator("service_tier")
    @classmethod
    def _one_tier(cls, value: str | None) -> str | None:
        _unsupported(value not in (None, "auto", "default"), f"service_tier {value!r} is")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @property
    def token_limit(self) -> int | None:
        """``max_completion_tokens`` is OpenAI's newer name; when both are given it wins."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def token_limit_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    @property
    def wants_logprobs(self) -> int | None:
        """How many alternatives per token to report, or None when logprobs were not asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def wants_prompt_logprobs(self) -> int | None:
        """A chat's prompt is never scored (no ``echo``)."""
        return None

    def chat_request(self) -> ChatRequest:
        """The engine's side of the chat contract (vLLM's ``to_sampling_params`` idea)."""
        variables = self.chat_template_kwargs.variables() if self.chat_template_kwargs is not None else {}
        if self.reasoning_effort is not None:  # the same as any in chat_template_kwargs (``check_fields``)
            variables["reasoning_effort"] = self.reasoning_effort
        return ChatRequest(
            messages=self.messages,
            tools=self.tools,
            tool_choice=self.tool_choice,
            parallel_tool_calls=self.parallel_tool_calls is not False,
            template_variables=variables,
            # vLLM refuses both only when both are sent true: continuing implies no new turn
            add_generation_prompt=not self.continue_final_message if self.add_generation_prompt is None else self.add_generation_prompt,
            continue_final_message=self.continue_final_message,
        )


class CompletionBody(GenerationBody):
    """A legacy text completion; like OpenAI, ``max_tokens`` defaults to 16 here. ``echo`` with
    ``logprobs`` scores the prompt too (``prompt_logprobs.py``); ``max_tokens`` 0 generates nothing
    and takes ``echo`` (OpenAI's and vLLM's way to score a prompt: ``batch.check_echo``)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    response_format: ResponseFormat | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("echo", mode="before")
    @classmethod
    def _echo_null_is_false(cls, value: Any) -> Any:
        return False if value is None else value  # the SDK types it Optional[bool]

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        """A string or a list of token ids (one prompt; a list holding one is unwrapped), or a list
        of up to ``MAX_PROMPTS`` strings or of token-id lists (a batch, as OpenAI's and vLLM's)."""
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]
        if _one_prompt(value):
            return value
        if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"a request takes up to {MAX_PROMPTS} prompts, got {len(value)}")
            if len({type(p) for p in value}) > 1:
                raise ValueError("the prompts must be all strings or all lists of token ids, not both")
            for index, prompt in enumerate(value):
                if not _one_prompt(prompt):
                    raise ValueError(f"prompt {index} must be a string or a non-empty list of token ids")
            return value
        raise ValueError("the prompt must be a string, a non-empty list of token ids, or a list of such prompts")

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _default_max_tokens(cls, value: Any) -> Any:
        return 16 if value is None else value

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

    @property
    def token_limit_param(self) -> str:
        return "max_tokens"

    @property
    def wants_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def wants_prompt_logprobs(self) -> int | None:
        """With ``echo``, the prompt's tokens get logprobs as the completion's do."""
        return self.logprobs if self.echo else None

    @property
    def prompts(self) -> list[str | list[int]]:
        """Every prompt of the request, in order: choice ``i * n + j`` is prompt ``i``'s ``j``-th."""
        prompt = self.prompt  # validated (``_prompts``): one prompt is a string or starts with a token id
        one = isinstance(prompt, str) or not isinstance(prompt[0], (str, list))  # type: ignore[index]
        return [prompt] if one else list(prompt)  # type: ignore[arg-type, list-item]


def _one_prompt(value: Any) -> bool:
    """A string (an empty one is the BOS token alone, as at OpenAI: ``check_tokens``), or a
    non-empty list of token ids (ints, not booleans)."""
    if isinstance(value, str):
        return True
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)  # JSON's ints; bool is not int here
