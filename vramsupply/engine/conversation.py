"""The chat contract between the server and the engine.

The server hands over a ``ChatRequest`` (the client's messages, tools and template options, as
JSON values) and gets back a ``ChatPrompt``: the prompt tokens, the stop strings the template
needs, the special tokens the output must show, the forced-call grammar if any, and how to read
the generated text back (``output_parser``). Every rule about chat lives on this side, once;
anything the template or the engine cannot honour is a ``ChatRequestError`` naming its field.

Templates get the tools normalised (a function without ``parameters``, which OpenAI allows, has
the empty object schema templates print or walk) and a history whose tool results OpenAI would take
(``check_tool_results``), so a template never fails on what the buyer may leave out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vramsupply.chat import ChatFormat, OutputParser, ReasoningMarkers, ToolSyntax
from vramsupply.chat.forced import forced_call_grammar, trigger_patterns
from vramsupply.chat.limits import CheckBudget, InvalidSchema, SchemaTooComplex, check_grammar_size, check_schema, check_strict, check_valid_at_any_size
from vramsupply.chat.formats import opens_reasoning
from vramsupply.chat.harmony import HarmonyParser

from .chat import ChatTemplate
from .messages import MessageError, check_tool_results, normalize_messages

_TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
"""OpenAI's rule for function names (letters, digits, '_' and '-', at most 64), and '.', which
some clients use; every family's call syntax can spell these."""
# Names the template environment defines itself; template kwargs may not replace them.
_RESERVED_VARIABLES = frozenset(
    {"messages", "tools", "tool_choice", "add_generation_prompt", "bos_token", "eos_token", "raise_exception", "functions", "function_call", "strftime_now"}
)
TOOL_CHOICES = ("none", "auto", "required")


class ChatRequestError(MessageError):
    """A chat request the engine cannot honour; ``param`` is the request field to blame, ``code``
    OpenAI's code for the error where it has its own."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(param, message)
        self.code = code


@dataclass(frozen=True)
class ChatRequest:
    """What a chat client sends, as JSON values (OpenAI's shapes)."""

    messages: Any
    tools: Sequence[Mapping[str, Any]] | None = None
    tool_choice: str | Mapping[str, Any] | None = None
    parallel_tool_calls: bool = True
    # chat_template_kwargs, plus reasoning_effort when given: variables for the template.
    template_variables: Mapping[str, Any] = field(default_factory=dict)
    # vLLM's: open an assistant turn after the messages (the default), or not; or continue the
    # last message, an assistant's, from its last character (``continued``).
    add_generation_prompt: bool = True
    continue_final_message: bool = False


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered chat request, ready to submit, and the way to read its output."""

    tokens: list[int]
    stop: tuple[str, ...]
    preserve: frozenset[int]
    grammar: str | None
    # When set, ``grammar`` is lazy: it applies from the first match of one of these patterns on
    # (``tool_choice`` auto: the model may answer in text, but a call it starts must be valid).
    grammar_triggers: tuple[str, ...]
    reasoning: ReasoningMarkers | None
    in_reasoning: bool
    syntax: ToolSyntax | None
    schemas: Mapping[str, Any]
    parallel_tool_calls: bool
    continues: bool = False
    """The answer goes on with the last message's text (``continue_final_message``)."""
    channels: bool = False
    """The model writes gpt-oss's harmony messages (``chat/harmony.py``): thought, answer and calls
    on channels; an answer constraint then holds its final message (``server/grammar.py``)."""

    def output_parser(self, held_answer: bool = False) -> OutputParser | HarmonyParser:
        """A fresh parser for one choice's output. A continuation's text is already under way: its
        leading space (" time" after "Once upon a") is no whitespace before an answer to trim.
        ``held_answer``: a grammar holds the answer's text (harmony's then ends only at its end)."""
        if self.channels:
            return HarmonyParser(calls=self.syntax is not None, held_answer=held_answer, parallel=self.parallel_tool_calls)
        return OutputParser(
            self.reasoning, self.in_reasoning, self.syntax, self.schemas, self.parallel_tool_calls, continuing=self.continues, held_answer=held_answer
        )


def prepare_chat(
    template: ChatTemplate,
    request: ChatRequest,
    tokenize: Callable[[str], list[int]],
    preserved: Callable[[Sequence[str]], frozenset[int]],
) -> ChatPrompt:
    """Render and tokenize ``request``; ``preserved`` maps marker texts to special token ids."""
    fmt = template.format
    functions = _functions(request.tools)
    choice, named = _tool_choice(request.tool_choice, functions)
    if functions and choice != "none" and not fmt.supports_tools:
        raise ChatRequestError("tools", "this model's chat template has no tool support, so 'tools' cannot be used")
    use_tools = bool(functions) and choice != "none"
    variables = _variables(request.template_variables)
    messages = normalize_messages(request.messages)
    check_tool_results(messages)
    # With "none" the model still sees the tools (as at OpenAI, llama-server and vLLM): it only may
    # not call them, and an agent switching between auto and none keeps its cached prefix.
    shown = use_tools or (bool(functions) and fmt.supports_tools)
    prompt = _render(template, request, messages, _template_tools(request.tools or (), functions) if shown else None, variables)
    in_reasoning = opens_reasoning(prompt, fmt.reasoning) or (
        request.continue_final_message and thought_left_open(str(messages[-1].get("content") or ""), fmt.reasoning)
    )  # a prefilled "<think>\nLet me see" continued: its words went to content, </think> with them
    grammar, triggers = _tool_grammar(fmt, functions, choice, named, request.parallel_tool_calls, in_reasoning) if use_tools else (None, ())
    return ChatPrompt(
        tokens=tokenize(prompt),
        stop=template.stop,
        preserve=preserved(_markers(fmt, use_tools)),
        grammar=grammar,
        grammar_triggers=triggers,
        reasoning=fmt.reasoning,
        in_reasoning=in_reasoning,
        syntax=fmt.syntax if use_tools else None,
        schemas={f["name"]: f.get("parameters") or {} for f in functions},
        parallel_tool_calls=request.parallel_tool_calls,
        continues=request.continue_final_message,
        channels=fmt.syntax.name == "harmony",
    )


def _tool_grammar(
    fmt: ChatFormat, functions: list[dict[str, Any]], choice: str, named: str | None, parallel_tool_calls: bool, in_reasoning: bool
) -> tuple[str | None, tuple[str, ...]]:
    """The grammar (and, for ``auto``, the patterns that wake it) that holds the answer's calls."""
    if choice == "auto":
        triggers = trigger_patterns(fmt.syntax, fmt.reasoning, in_reasoning)
        # A schema the grammar cannot express only loses the lazy check: calls are still parsed.
        grammar = _call_grammar(fmt, functions, parallel_tool_calls, None, required=False) if triggers else None
        return grammar, triggers if grammar is not None else ()
    forced = functions if choice == "required" else [f for f in functions if f["name"] == named]
    parallel = parallel_tool_calls and choice == "required"
    return _call_grammar(fmt, forced, parallel, fmt.reasoning if in_reasoning else None, required=True), ()


def _render(
    template: ChatTemplate, request: ChatRequest, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, variables: dict[str, Any]
) -> str:
    if request.continue_final_message:
        if request.add_generation_prompt:
            raise ChatRequestError(
                "continue_final_message",
                "continue_final_message and add_generation_prompt cannot both be true: send add_generation_prompt false to continue the last message",
            )
        return continued(lambda shown: template.render_turn(shown, tools, variables, open_turn=False), messages)
    return template.render_turn(messages, tools, variables, open_turn=request.add_generation_prompt)


CONTINUED_MARK = "VRAMSUPPLY-CONTINUED-MESSAGE-7F3A"
"""Rendered in place of the final message's text, to find where the template puts that text."""


def continued(render: Callable[[list[dict[str, Any]]], str], messages: list[dict[str, Any]]) -> str:
    """The prompt cut right after the final message's text, so the model goes on writing it (as
    vLLM and HuggingFace transformers do: the template's end of that turn is dropped). The text is
    found where the template renders it (``CONTINUED_MARK`` in its place shows where), as written,
    then stripped (templates that trim it); a template that shows it otherwise cannot be
    continued. Looking for the text's last occurrence instead cut a "d" inside the turn's closing
    ``<|im_end|>``."""
    final = messages[-1]
    text = final.get("content") or ""
    if final.get("role") != "assistant" or final.get("tool_calls") or not isinstance(text, str) or not text.strip():
        raise ChatRequestError(
            "continue_final_message", "continue_final_message needs the last message to be an assistant's, with text and no tool_calls, to continue"
        )
    prompt = render(messages)
    at = render([*messages[:-1], {**final, "content": CONTINUED_MARK}]).find(CONTINUED_MARK)
    for written in (text, text.strip()):
        if at >= 0 and prompt.startswith(written, at):
            return prompt[: at + len(written)]
    raise ChatRequestError("continue_final_message", "the model's chat template does not show the last message's text as written, so it cannot be continued")


def thought_left_open(text: str, markers: ReasoningMarkers | None) -> bool:
    """Whether ``text`` (a continued message) opens a thought it does not close: the model's first
    words then go on thinking, as after a template's own ``<think>`` (``opens_reasoning``)."""
    if markers is None:
        return False
    start = text.rfind(markers.start)
    return start >= 0 and text.find(markers.end, start) < 0


def _call_grammar(
    fmt: ChatFormat, functions: list[dict[str, Any]], parallel: bool, thought: ReasoningMarkers | None, *, required: bool
) -> str | None:
    """The call grammar, or for a forced call a ``tools`` error when a schema cannot become one.

    The tools' schemas are held to the limits ``response_format`` is held to (``chat/limits.py``);
    past one, a forced call is a 400 naming ``tools``, and ``auto`` goes without the lazy check."""
    try:
        for function in functions:
            check_schema(function.get("parameters") or {})
        return check_grammar_size(forced_call_grammar(fmt.syntax, functions, parallel, thought, lazy=not required))
    except SchemaTooComplex as exc:
        if required:
            raise ChatRequestError("tools", f"a tool's parameters are too complex for this server: {exc}") from None
        return None
    except Exception as exc:  # the converter raises bare Exceptions, KeyErrors and AssertionErrors
        if required:
            raise ChatRequestError("tools", f"a tool's parameters cannot be turned into a grammar to force the call ({exc})") from None
        return None


def _markers(fmt: ChatFormat, use_tools: bool) -> tuple[str, ...]:
    """The marker texts the output must show: the call syntax's with tools; harmony's always, as
    its thought and answer are told apart by them too."""
    markers = fmt.syntax.preserved if use_tools or fmt.syntax.name == "harmony" else ()
    return markers + ((fmt.reasoning.start, fmt.reasoning.end) if fmt.reasoning else ())


def _functions(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """The function objects of OpenAI ``tools``, checked: names unique, parameters an object schema."""
    functions: list[dict[str, Any]] = []
    budget = CheckBudget()  # for the schemas past the limits that are checked all the same
    for i, tool in enumerate(tools or ()):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(tool.get("function"), Mapping):
            raise ChatRequestError(where, f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        function = dict(tool["function"])
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise ChatRequestError(f"{where}.function.name", f"{where}.function.name must be 1-64 ASCII letters, digits, '_', '-' or '.'")
        function["parameters"] = _parameters(function.get("parameters"), f"{where}.function.parameters", name, budget)
        _check_types(function, f"{where}.function")
        if function.get("strict") is True:  # refused whatever tool_choice is: auto too promises the schema
            try:
                check_strict(function["parameters"], f"{where}.function.parameters")
            except ValueError as exc:
                raise ChatRequestError("tools", str(exc)) from None
            except Exception as exc:  # the converter's bare AssertionErrors, TypeErrors, ...: a schema it cannot read
                raise ChatRequestError(f"{where}.function.parameters", f"{where}.function.parameters is not a JSON schema this server can read: {exc}") from None
        if any(f["name"] == name for f in functions):
            raise ChatRequestError(f"{where}.function.name", f"two tools are named {name!r}")
        functions.append(function)
    return functions


def _check_types(function: Mapping[str, Any], where: str) -> None:
    """``strict`` a boolean and ``description`` a string, where given (null: not given), as OpenAI
    holds them: a string ``strict`` was read as not strict, and a number as the description
    failed inside some chat templates, blamed on ``messages``."""
    for key, kind, name in (("strict", bool, "a boolean"), ("description", str, "a string")):
        if function.get(key) is not None and not isinstance(function[key], kind):
            raise ChatRequestError(f"{where}.{key}", f"{where}.{key} must be {name}")


def _template_tools(tools: Sequence[Mapping[str, Any]], functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The buyer's tools as the template sees them: as sent, but each function's ``parameters``
    checked, the empty object schema where none was given, and a description left out (or null)
    as "" (as llama-server gives it: gpt-oss's template adds it to text, and failed on none)."""
    return [
        {**tool, "function": {**function, "description": function.get("description") or "", "parameters": _or_no_parameters(function["parameters"])}}
        for tool, function in zip(tools, functions)
    ]


def _or_no_parameters(parameters: Any) -> Any:
    return {"type": "object", "properties": {}} if parameters is None else parameters


def _parameters(parameters: Any, where: str, name: str, budget: CheckBudget) -> Any:
    """A tool's parameters, checked: absent, or a valid JSON schema (``_check_valid``) of an
    object whose ``properties`` is an object (``null``, which some clients send for none, is taken
    as absent)."""
    if parameters is None:
        return None
    if not isinstance(parameters, Mapping):
        raise ChatRequestError(where, f"{where} must be a JSON schema of an object")
    if "properties" in parameters and parameters["properties"] is None:
        parameters = {key: value for key, value in parameters.items() if key != "properties"}
    _check_valid(parameters, where, name, budget)
    if parameters.get("type", "object") != "object":
        raise ChatRequestError(where, f"{where} must be a JSON schema of an object")
    if not isinstance(parameters.get("properties", {}), Mapping):  # nested too deep for _check_valid to read
        raise ChatRequestError(f"{where}.properties", f"{where}.properties must be an object (parameter name: schema)")
    _check_list_keywords(parameters, where)
    return parameters


def _check_valid(parameters: Mapping[str, Any], where: str, name: str, budget: CheckBudget) -> None:
    """A 400 for parameters that break JSON Schema's own rules, whatever ``tool_choice`` says (as
    at OpenAI: ``auto`` only converts a schema for its lazy grammar, and a failure there was
    silent) and whatever their size (a schema past a size limit is a 400 for a forced call,
    ``_call_grammar``, and goes without the lazy grammar with ``auto``: an invalid one there got no
    400 while a smaller one did). ``param`` names the faulty keyword, as the other checks here do
    (OpenAI names the parameters). One nested past the depth limit is not read, so not checked,
    nor one past what is left of the request's ``budget`` (``limits.MAX_CHECKED_BYTES``)."""
    try:
        check_valid_at_any_size(parameters, budget)
    except SchemaTooComplex:
        return
    except InvalidSchema as exc:
        raise ChatRequestError(f"{where}{exc.path}", f"Invalid schema for function {name!r}: {exc}", code="invalid_function_parameters") from None


def _check_list_keywords(schema: Any, where: str) -> None:
    """``enum`` a list and ``required`` a list of names, anywhere in a schema: a string there was
    read as its characters (``"enum": "celsius"`` forced the value "e")."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            _check_list_keywords(item, f"{where}[{i}]")
        return
    if not isinstance(schema, Mapping):
        return
    if "enum" in schema and not isinstance(schema["enum"], list):
        raise ChatRequestError(f"{where}.enum", f"{where}.enum must be a list of values")
    required = schema.get("required")
    if "required" in schema and not (isinstance(required, list) and all(isinstance(name, str) for name in required)):
        raise ChatRequestError(f"{where}.required", f"{where}.required must be a list of property names")
    for key, value in schema.items():
        if key in _VALUE_KEYWORDS:
            continue
        if key in _NAMED_SCHEMAS and isinstance(value, Mapping):  # names are the buyer's, so "required" may be one
            for name, sub in value.items():
                _check_list_keywords(sub, f"{where}.{key}.{name}")
        else:
            _check_list_keywords(value, f"{where}.{key}")


_VALUE_KEYWORDS = frozenset({"enum", "const", "default", "examples"})
"""Keywords whose value is data, not a schema."""
_NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
"""Keywords whose value maps names to schemas."""


def _tool_choice(choice: Any, functions: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(``none``, ``auto``, ``required`` or ``named``; the function a named choice must call)."""
    if choice is None:
        return ("auto" if functions else "none"), None
    if isinstance(choice, str) or not isinstance(choice, Mapping):
        if choice not in TOOL_CHOICES:
            raise ChatRequestError("tool_choice", f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a named function")
        if choice == "required" and not functions:
            raise ChatRequestError("tool_choice", "tool_choice 'required' needs 'tools'")
        return (choice if functions else "none"), None  # "auto" among no tools calls none (``tools: []``)
    kind = choice.get("type")
    if isinstance(kind, str) and kind in ("allowed_tools", "custom"):  # OpenAI's newer kinds
        raise ChatRequestError("tool_choice", f"tool_choice of type {kind!r} is not supported by this server: send auto, none, required or a named function")
    function = choice.get("function") if isinstance(choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or kind != "function":
        raise ChatRequestError("tool_choice", "a named tool_choice is {'type': 'function', 'function': {'name': ...}}")
    if not any(f["name"] == name for f in functions):
        raise ChatRequestError("tool_choice", f"tool_choice names {name!r}, which is not one of the tools")
    return "named", name


def _variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    reserved = sorted(_RESERVED_VARIABLES & set(variables))
    if reserved:
        raise ChatRequestError("chat_template_kwargs", f"chat_template_kwargs may not set {', '.join(reserved)}")
    return dict(variables)
