"""How each model family writes tool calls, and how to read them back.

Every family is a ``ToolSyntax``: how to recognise it in the chat template's text, where a call
starts in the output, how to parse the call section, and which marker texts are single special
tokens the engine must render (llama.cpp calls these "preserved tokens"; normally a control token
renders as nothing). The families are those common in current GGUFs, as llama.cpp's
``common/chat`` recognises them:

=============  ==================================================================================
hermes         ``<tool_call>{"name": …, "arguments": {…}}</tool_call>`` (Hermes 2/3, Qwen 2.5/3)
qwen3-xml      ``<tool_call><function=NAME><parameter=K>V</parameter></function></tool_call>``
               (Qwen3-Coder, Qwen3.5)
llama3         ``{"name": …, "parameters": {…}}`` and ``<|python_tag|>tool.call(k=v)`` (Llama 3.x)
mistral        ``[TOOL_CALLS][{"name": …, "arguments": {…}}]`` (Mistral Nemo, Small 3)
mistral-args   ``[TOOL_CALLS]NAME[ARGS]{…}`` (Magistral, Devstral; either form is read)
deepseek       ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`` + JSON
command-r7b    ``<|START_ACTION|>[{"tool_name": …, "parameters": {…}}]<|END_ACTION|>``
granite        ``<|tool_call|>[{"name": …, "arguments": {…}}]`` (Granite, Phi-4-mini)
firefunction   `` functools[{"name": …, "arguments": {…}}]``
functionary    ``<function=NAME>{…}</function>`` (Functionary v3.1 on Llama 3.1)
harmony        ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{…}<|call|>``
               (gpt-oss: channels for the thought and the answer too, read by ``harmony.py``)
generic        a bare JSON call object, for a template that describes tools in no known syntax
=============  ==================================================================================

A family's parser (``call_parsers.py``) returns the calls plus any text after them, or ``None``
when the section is not a well-formed call: the caller then keeps it as plain content (a malformed
call is text, not a 500). This module is the registry: each family's markers, and the order they
are tried in, since the first family whose markers the template writes wins (qwen3-xml before
hermes, mistral-args before mistral: the first of each pair writes the second's markers and more).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .call_parsers import (
    json_list_syntax,
    parse_deepseek,
    parse_functionary,
    parse_generic,
    parse_llama3,
    parse_mistral,
    parse_tool_call_blocks,
)
from .call_shapes import Parsed, Schemas
from .harmony import MARKERS as HARMONY_MARKERS, parse_harmony


@dataclass(frozen=True)
class ToolSyntax:
    """One family's tool-call syntax."""

    name: str
    detect: Callable[[str], bool]
    parse: Callable[[str, Schemas], Parsed | None]
    # Text that opens a call section anywhere in the output ...
    starts: tuple[str, ...] = ()
    # ... or only at the very start of the answer (after whitespace), like Llama 3's bare JSON.
    leading: tuple[str, ...] = ()
    # Marker texts that may be single special tokens the engine must render as text.
    preserved: tuple[str, ...] = ()
    id_style: str = "openai"
    parallel: bool = True


def _has(*needles: str) -> Callable[[str], bool]:
    return lambda source: all(n in source for n in needles)


SYNTAXES: tuple[ToolSyntax, ...] = (
    # gpt-oss: its template writes the channel markers; its whole output is read by
    # ``harmony.HarmonyParser`` (thought and answer included), never by the call reader.
    ToolSyntax(
        "harmony",
        _has("<|channel|>", "<|message|>"),
        parse_harmony,
        preserved=HARMONY_MARKERS,
        parallel=False,
    ),
    ToolSyntax(
        "deepseek",
        _has("<｜tool▁calls▁begin｜>"),
        parse_deepseek,
        starts=("<｜tool▁calls▁begin｜>",),
        preserved=("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>"),
    ),
    ToolSyntax(
        "command-r7b",
        _has("<|START_ACTION|>"),
        json_list_syntax("<|START_ACTION|>", "<|END_ACTION|>"),
        starts=("<|START_ACTION|>",),
        preserved=("<|START_ACTION|>", "<|END_ACTION|>"),
    ),
    ToolSyntax(
        "qwen3-xml",
        _has("<tool_call>", "<function=", "<parameter="),
        parse_tool_call_blocks,
        starts=("<tool_call>",),
        preserved=("<tool_call>", "</tool_call>"),
    ),
    ToolSyntax(
        "hermes",
        _has("<tool_call>"),
        parse_tool_call_blocks,
        starts=("<tool_call>",),
        preserved=("<tool_call>", "</tool_call>"),
    ),
    ToolSyntax(
        "functionary",
        lambda s: "<|start_header_id|>" in s and "<function=" in s,
        parse_functionary,
        starts=("<function=",),
    ),
    ToolSyntax(
        "llama3",
        lambda s: "<|start_header_id|>" in s and ("ipython" in s or "<|python_tag|>" in s),
        parse_llama3,
        starts=("<|python_tag|>",),
        leading=("{", "["),
        preserved=("<|python_tag|>",),
        parallel=False,
    ),
    ToolSyntax(
        "mistral-args",
        _has("[TOOL_CALLS]", "[ARGS]"),
        parse_mistral,
        starts=("[TOOL_CALLS]",),
        preserved=("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
        id_style="mistral",
    ),
    ToolSyntax(
        "mistral",
        _has("[TOOL_CALLS]"),
        parse_mistral,
        starts=("[TOOL_CALLS]",),
        preserved=("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
        id_style="mistral",
    ),
    ToolSyntax(
        "granite",
        _has("<|tool_call|>"),
        json_list_syntax("<|tool_call|>", "<|/tool_call|>"),
        starts=("<|tool_call|>",),
        preserved=("<|tool_call|>", "<|/tool_call|>"),
    ),
    ToolSyntax(
        "firefunction",
        _has(" functools["),
        json_list_syntax("functools", None),
        starts=(" functools[", "functools["),
    ),
)

GENERIC = ToolSyntax("generic", lambda s: True, parse_generic, leading=("{", "["))


def syntax_for(template_source: str) -> ToolSyntax:
    """The first family whose markers the template writes; ``generic`` when none does."""
    return next((s for s in SYNTAXES if s.detect(template_source)), GENERIC)
