"""What a chat template supports, read from its own text: tool-call syntax and thinking markers."""

from __future__ import annotations

from dataclasses import dataclass

from .syntaxes import ToolSyntax, syntax_for


@dataclass(frozen=True)
class ReasoningMarkers:
    """The texts that open and close a model's thoughts, e.g. ``<think>`` and ``</think>``."""

    start: str
    end: str


# (start, end) pairs as templates write them; the end marker is what gives a family away, because
# templates that strip old thoughts from the history mention only the closing one.
_REASONING = (
    ReasoningMarkers("<think>", "</think>"),
    ReasoningMarkers("<seed:think>", "</seed:think>"),
    ReasoningMarkers("<|START_THINKING|>", "<|END_THINKING|>"),
    ReasoningMarkers("◁think▷", "◁/think▷"),
)


@dataclass(frozen=True)
class ChatFormat:
    """One template's conventions.

    ``supports_tools`` is decided by rendering the template with a probe tool (see the engine's
    ``ChatTemplate``): a template that never shows the model its tools cannot do tool calling.
    """

    syntax: ToolSyntax
    reasoning: ReasoningMarkers | None
    supports_tools: bool


def detect_format(template_source: str, supports_tools: bool) -> ChatFormat:
    reasoning = next((m for m in _REASONING if m.end in template_source), None)
    return ChatFormat(syntax_for(template_source), reasoning, supports_tools)


def opens_reasoning(prompt: str, markers: ReasoningMarkers | None) -> bool:
    """Whether the rendered prompt leaves a thought open, so the model's first words are reasoning.

    Templates such as DeepSeek-R1's and Qwen3.5's end the generation prompt with ``<think>\\n``.
    """
    if markers is None:
        return False
    start = prompt.rfind(markers.start)
    return start >= 0 and prompt.find(markers.end, start) < 0 and not prompt[start + len(markers.start) :].strip()
