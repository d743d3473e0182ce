"""Chat formats: what a model's chat template expects, and how to read what the model wrote back.

Agent clients send OpenAI chat requests with ``tools`` and read ``tool_calls`` and
``reasoning_content`` back, but every model family writes tool calls and thoughts in its own
syntax (``<tool_call>{…}</tool_call>``, ``[TOOL_CALLS][…]``, ``<|python_tag|>``, ``<think>``…).
This package holds that knowledge, with no HTTP in it and no llama.cpp runtime (only
llama-cpp-python's JSON-schema-to-grammar converter, in ``forced.py``):

    template text ──detect──▶ ChatFormat ──▶ engine: render prompt, preserve marker tokens,
                                   │                 forced-call grammar (forced.py)
                                   └───────▶ server: OutputParser splits the generated text
                                                     into reasoning, content and tool calls

The family is recognised from the template's own text (the markers it writes), never from the
model's name, the way llama.cpp's ``common/chat`` does it.
"""

from .formats import ChatFormat, ReasoningMarkers, detect_format
from .output import OutputParser, ParsedOutput
from .types import Piece
from .syntaxes import SYNTAXES, ToolSyntax
from .types import ToolCall, new_call_id

__all__ = [
    "SYNTAXES",
    "ChatFormat",
    "OutputParser",
    "ParsedOutput",
    "Piece",
    "ReasoningMarkers",
    "ToolCall",
    "ToolSyntax",
    "detect_format",
    "new_call_id",
]
