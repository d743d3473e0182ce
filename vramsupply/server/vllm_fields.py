"""vLLM's and llama-server's request fields, honoured or refused, never silently dropped.

A buyer whose code was written for vLLM sends ``guided_json``, ``structured_outputs``,
``stop_token_ids``, ``min_tokens``…; unknown fields are ignored (as OpenAI-compatible servers do),
so before these were read here every one of them was a 200 whose answer ignored it. Each is now
mapped onto what the engine does, or a 400 naming it and saying what to send instead:

- output constraints (``guided_json``/``_regex``/``_choice``, ``structured_outputs``, and
  llama-server's ``json_schema``) become the one grammar the answer is held to
  (``grammar.answer_grammar``); at most one may be given, and none beside a JSON
  ``response_format`` or tools the model may call;
- a grammar's text is refused, whatever its dialect: vLLM's ``guided_grammar`` (and
  ``structured_outputs.grammar``) is EBNF for one of its backends and Lark for others, and
  llama-server's ``grammar`` is GBNF, which llama.cpp parses and expands in the agent's own
  process: ``root ::= "a"{2,1}`` alone had it killed for memory. Grammars are only built here,
  from schemas, regexes and choices whose size is bounded (``chat/limits.py``);
- ``repetition_penalty`` is llama.cpp's ``repeat_penalty`` (both, different: 400);
- ``stop_token_ids``, ``include_stop_str_in_output`` and ``min_tokens`` reach the engine
  (``GenerationRequest``);
- ``add_generation_prompt`` and ``continue_final_message`` reach the chat template
  (``engine/conversation.py``);
- the sampling and serving options this server does not have (``prompt_logprobs``, beam search
  and its ``length_penalty``, ``allowed_token_ids``, ``bad_words``, ``logits_processors``,
  ``truncate_prompt_tokens``, ``return_tokens_as_token_ids``, ``priority``,
  ``skip_special_tokens: false``) are a 400 when given a value other than vLLM's default
  (``_NOT_SUPPORTED``); their default, or null, is accepted, because vLLM's clients send the
  defaults of every field. Each takes any JSON type, so a wrong one gets the same 400, not a type
  error about a field that would be refused anyway. ``spaces_between_special_tokens`` is
  deliberately accepted and ignored: it only changes how special tokens' text is joined, and that
  text is not shown here.

Checks that tie two fields together are here too (``check_fields``), after pydantic's, so the 400
names the field a buyer has to change with OpenAI's own words where OpenAI has them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from vramsupply.server.errors import ApiError

MAX_STOP_TOKEN_IDS = 64
"""``stop_token_ids`` are looked up in a set per token, but a request holds them all: bounded."""
MAX_CHOICES = 128
"""Strings of ``guided_choice``: each an alternative of the grammar, as ``enum`` values are."""
MAX_TEXT_CONSTRAINT = 32 * 1024
"""A regex or GBNF grammar's text, as a JSON schema's (``chat/limits.py``)."""
_NO_GRAMMAR = (
    "a grammar's text is not accepted by this server (llama.cpp would parse it in the serving process);"
    " send guided_json, guided_regex, guided_choice or response_format instead"
)


def _is_null(value: Any) -> bool:
    return value is None


def _is_number(default: float) -> Callable[[Any], bool]:
    """``1`` and ``1.0`` alike, as JSON writers differ; ``true`` is no number."""
    return lambda value: value is None or (isinstance(value, int | float) and not isinstance(value, bool) and value == default)


def _is_bool(default: bool) -> Callable[[Any], bool]:
    return lambda value: value is None or value is default


def _is_empty_list(value: Any) -> bool:
    return value is None or value == []


_NOT_SUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "prompt_logprobs": (_is_null, "on /v1/completions send echo: true with logprobs N to get the prompt's logprobs"),
    "use_beam_search": (_is_bool(False), "there is no beam search here"),
    "length_penalty": (_is_number(1.0), "it applies to beam search, which there is none of here"),
    "allowed_token_ids": (_is_empty_list, "send logit_bias instead (a token id's bias -100 bans it, 100 favours it)"),
    "bad_words": (_is_empty_list, "send logit_bias instead, with -100 for the words' token ids"),
    "logits_processors": (_is_empty_list, "no buyer's code runs in this server"),
    "truncate_prompt_tokens": (_is_null, "a prompt is never cut here: send it shorter"),
    "return_tokens_as_token_ids": (_is_bool(False), "logprobs name each token by its text"),
    "priority": (_is_number(0), "requests are served in the order they come"),
    "skip_special_tokens": (_is_bool(True), "special tokens' text is never shown, except the markers a chat format gives"),
}
"""vLLM's field, whether a value is its default (or null), and what to do instead (``_not_supported``)."""


def _refuse(value: Any, message: str) -> Any:
    if value:
        raise ValueError(message)
    return value


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: one of ``choice``, ``json``, ``regex``, ``json_object``; the
    options that only pick a backend are accepted, those that would change the answer refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = Field(None, max_length=MAX_TEXT_CONSTRAINT)
    json_object: bool | None = None
    grammar: str | None = None
    structural_tag: Any = None
    disable_any_whitespace: bool | None = None
    whitespace_pattern: str | None = None
    disable_fallback: bool | None = None
    disable_additional_properties: bool | None = None

    @field_validator("grammar")
    @classmethod
    def _no_grammar(cls, value: str | None) -> str | None:
        return _refuse(value is not None, _NO_GRAMMAR)

    @field_validator("structural_tag", "whitespace_pattern", "disable_any_whitespace")
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse(value not in (None, False), f"{info.field_name} is not supported by this server")


class VllmFields(BaseModel):
    """The fields of both routes; ``GenerationBody`` (``schemas.py``) inherits them."""

    model_config = ConfigDict(extra="ignore", strict=True)

    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(None, max_length=MAX_TEXT_CONSTRAINT)
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: StructuredOutputs | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    repetition_penalty: float | None = Field(None, gt=0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool = False
    min_tokens: int = Field(0, ge=0)
    prompt_logprobs: Any = None
    use_beam_search: Any = None
    length_penalty: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    logits_processors: Any = None
    truncate_prompt_tokens: Any = None
    return_tokens_as_token_ids: Any = None
    priority: Any = None
    skip_special_tokens: Any = None

    @field_validator("guided_grammar", "grammar")
    @classmethod
    def _no_grammar(cls, value: str | None) -> str | None:
        return _refuse(value is not None, _NO_GRAMMAR)

    @field_validator("guided_whitespace_pattern")
    @classmethod
    def _no_whitespace_pattern(cls, value: str | None) -> str | None:
        return _refuse(value is not None, "guided_whitespace_pattern is not supported by this server")

    @field_validator(*_NOT_SUPPORTED)
    @classmethod
    def _not_supported(cls, value: Any, info: ValidationInfo) -> Any:
        is_default, instead = _NOT_SUPPORTED[info.field_name]  # type: ignore[index]
        _refuse(not is_default(value), f"{info.field_name} is not supported by this server; {instead}")
        return value

    @field_validator("stop_token_ids", "include_stop_str_in_output", "min_tokens", mode="before")
    @classmethod
    def _vllm_null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """Named apart from ``GenerationBody``'s validator, which would replace it."""
        if value is None:
            return cls.model_fields[info.field_name].get_default(call_default_factory=True)
        return value


@dataclass(frozen=True)
class Constraint:
    """The one grammar a request's answer is held to: ``kind`` is ``json`` (``value`` a schema),
    ``json_object``, ``regex`` or ``choice`` (a list of strings); ``param``
    names the field it came from, for the 400s about it."""

    kind: str
    value: Any
    param: str


def constraints(body: VllmFields) -> list[Constraint]:
    """Every output constraint the request gives (``check_fields`` allows one at most)."""
    found = [
        Constraint(kind, value, param)
        for kind, value, param in (
            ("json", body.guided_json, "guided_json"),
            ("regex", body.guided_regex, "guided_regex"),
            ("choice", body.guided_choice, "guided_choice"),
            ("json", body.json_schema, "json_schema"),
        )
        if value is not None
    ]
    outputs = body.structured_outputs
    if outputs is not None:
        for kind, value in (("json", outputs.json_), ("regex", outputs.regex), ("choice", outputs.choice), ("json_object", outputs.json_object or None)):
            if value is not None:
                found.append(Constraint(kind, value, f"structured_outputs.{'json' if kind == 'json' else kind}"))
    return [_parsed(c) for c in found]


def _parsed(constraint: Constraint) -> Constraint:
    """A JSON schema sent as text (vLLM takes both) as the object it holds."""
    if constraint.kind != "json" or not isinstance(constraint.value, str):
        return constraint
    try:
        schema = json.loads(constraint.value)
    except ValueError as exc:
        raise _invalid(constraint.param, f"not a JSON schema ({exc})") from None
    if not isinstance(schema, dict):
        raise _invalid(constraint.param, "a JSON schema must be an object")
    return Constraint("json", schema, constraint.param)


def output_constraint(body: VllmFields) -> Constraint | None:
    """The request's one output constraint besides ``response_format``, checked against the rest."""
    found = constraints(body)
    if not found:
        return None
    first = found[0]
    if len(found) > 1:
        raise ApiError(400, f"'{first.param}' and '{found[1].param}' cannot be combined: send one output constraint.", param=found[1].param, code="invalid_value")
    response_format = getattr(body, "response_format", None)
    if response_format is not None and response_format.type != "text":
        raise ApiError(400, f"'{first.param}' and 'response_format' cannot be combined: send one output constraint.", param=first.param, code="invalid_value")
    if getattr(body, "tools", None) and getattr(body, "tool_choice", None) != "none":
        raise ApiError(
            400,
            f"'{first.param}' cannot be combined with tools the model may call: send tool_choice 'none', or response_format to shape the text answer beside tools.",
            param=first.param,
            code="invalid_value",
        )
    return first


def check_fields(body: Any) -> None:
    """The checks that tie two fields of a parsed body together (400s naming the one to change)."""
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options", code="invalid_value")
    if body.repetition_penalty is not None and body.repeat_penalty is not None and body.repetition_penalty != body.repeat_penalty:
        raise ApiError(
            400,
            "'repetition_penalty' and 'repeat_penalty' are the same setting here and were given different values: send one.",
            param="repetition_penalty",
            code="invalid_value",
        )
    _check_reasoning_effort(body)
    limit = body.token_limit
    if limit is not None and body.min_tokens > limit:
        raise ApiError(400, f"'min_tokens' ({body.min_tokens}) must not be more than the token limit ({limit}).", param="min_tokens", code="invalid_value")
    output_constraint(body)


def _check_reasoning_effort(body: Any) -> None:
    """``reasoning_effort`` and ``chat_template_kwargs.reasoning_effort`` set the same template
    variable: two different values are a 400, as for ``repetition_penalty``, where the kwargs' one
    silently won (as it does at vLLM)."""
    kwargs = getattr(body, "chat_template_kwargs", None)
    given = getattr(body, "reasoning_effort", None)
    if given is not None and kwargs is not None and kwargs.reasoning_effort not in (None, given):
        raise ApiError(
            400,
            f"'reasoning_effort' ({given!r}) and 'chat_template_kwargs.reasoning_effort' ({kwargs.reasoning_effort!r}) are the same setting"
            " and were given different values: send one.",
            param="chat_template_kwargs.reasoning_effort",
            code="invalid_value",
        )


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"Invalid value for '{param}': {message}", param=param, code="invalid_value")
