"""Reading gpt-oss's "harmony" output: messages on channels, not thoughts and calls in one text.

After the generation prompt ``<|start|>assistant`` a gpt-oss model writes one message or more,
each a header, ``<|message|>``, a body and an end::

    <|channel|>analysis<|message|>THOUGHT<|end|>
    <|start|>assistant<|channel|>final<|message|>ANSWER<|return|>
    <|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{…}<|call|>

The channel says what a body is: ``analysis`` is the thought (``reasoning_content``), ``final``
the answer, ``commentary`` without a recipient a preamble to the user (both ``content``), and a
header naming a recipient (``to=functions.NAME``, before or after the channel, with or without
``<|constrain|>json``) makes the body a call's JSON arguments. So the family fits neither
``OutputParser``'s one thought at the start nor a call marker found in the text; ``HarmonyParser``
is its own state machine with the same interface, run the same way whole and streamed.

It streams as the other families do: a body's text as soon as it cannot be the start of the
marker that ends it, a call announced once its header is read and its arguments as written
(so a call that breaks after that keeps what it wrote, as ``calls.py`` explains). Output that does
not open with a header (a model that ignores the format) is plain content, as written. In this
llama.cpp build ``<|return|>`` and ``<|call|>`` end the generation and are never seen here;
``<|end|>`` is no end of generation (llama.cpp drops it from the set when both exist), so a
thought is followed by the answer or the call in the same generation. A copy of the model whose
vocabulary does not end the generation at ``<|call|>`` may write a second call after the first:
with ``parallel_tool_calls`` false it is dropped, as ``calls.py`` drops the calls after the first
for the other families.

A thought and a preamble end at ``<|end|>``; the answer (``final``) and a call end only at their
own ends, ``<|return|>`` and ``<|call|>``, which here end the generation: so their text runs to it,
and an ``<|end|>`` the model writes inside a call's JSON string (a grammar holding the JSON allows
any text there) stays text of the arguments rather than cutting the call.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from . import jsontext
from .reader import TextReader
from .types import Piece, ToolCall, new_call_id

MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|constrain|>", "<|call|>", "<|return|>")
"""The format's marker texts: each one special token in gpt-oss's vocabulary."""
ENDS = ("<|end|>", "<|call|>", "<|return|>")
"""What ends a thought's or a preamble's body."""
LAST_ENDS = ("<|call|>", "<|return|>")
"""What ends the answer's or a call's body."""
_OPENINGS = ("<|start|>", "<|channel|>", "to=")
_HEADER_LIMIT = 200
"""The longest header read as one; longer, the output is no harmony message but text."""
_CHANNEL = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")
_RECIPIENT = re.compile(r"(?:^|\s)to=([^\s<]+)")
Kind = Literal["reasoning", "content", "call", "hidden"]


def held(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that begins a marker (``calls.held``, which this
    module cannot import: the registry it depends on imports this one)."""
    return max((size for m in markers for size in range(1, min(len(m), len(text) + 1)) if text.endswith(m[:size])), default=0)


def header_kind(header: str, calls: bool, held_answer: bool = False) -> tuple[Kind, str, tuple[str, ...]] | None:
    """What a message's body is, from its header (the text before ``<|message|>``), the called
    function's name for a call, and the markers that end the body; None for a header that is none.

    The last channel and recipient named count: gpt-oss sometimes writes a stray
    ``<|channel|>commentary to=assistant`` before its real header, and ``to=assistant`` addresses
    no tool. A message to a function is a call where tools may be called; else, and for a tool
    nobody offered (gpt-oss's built-in ``browser`` and ``python``), it is dropped, as llama.cpp
    drops it: neither its arguments nor its code are an answer. Every message ends at ``<|end|>``
    but a call, and an answer a grammar holds (``held_answer``), whose JSON may hold that text."""
    if any(end in header for end in ENDS) or ("<|channel|>" not in header and "to=" not in header):
        return None
    recipients = [r for r in _RECIPIENT.findall(header) if r != "assistant"]
    channels = _CHANNEL.findall(header)
    channel = channels[-1] if channels else None
    if recipients:
        function = recipients[-1].removeprefix("functions.") if recipients[-1].startswith("functions.") else None
        name = jsontext.usable_name(function) if function else None
        if name is None or not calls:
            return "hidden", "", ENDS
        return "call", name, LAST_ENDS
    if channel == "analysis":
        return "reasoning", "", ENDS
    return "content", "", LAST_ENDS if held_answer and channel != "commentary" else ENDS


class HarmonyParser(TextReader):
    """States: ``between`` (a message may open) → ``header`` → ``body`` → ``between``…; ``plain``
    (to the end) for output that is no harmony message."""

    def __init__(self, calls: bool = True, held_answer: bool = False, parallel: bool = True) -> None:
        """``calls``: tools were offered, so a message to a function is a call (else it is dropped);
        ``held_answer``: a grammar holds the answer (a JSON ``response_format``), whose text may hold ``<|end|>``;
        ``parallel``: ``parallel_tool_calls`` was not false, so every call message is kept, not the first only."""
        super().__init__("between")
        self._calls_allowed = calls
        self._parallel = parallel
        self._held_answer = held_answer
        self._kind: Kind = "content"
        self._ends = ENDS  # what ends the body being read
        self._said: set[str] = set()  # kinds some message already gave text to
        self._fresh = False  # the body has given no text yet
        self._header_at = 0  # where the message being read began, in characters pushed
        self._called = 0

    def _step(self, pieces: list[Piece]) -> None:
        """The thought's span runs from the first thought's header to the end of the last thought."""
        getattr(self, f"_in_{self._state}")(pieces)

    def finish(self, cut: bool = False) -> list[Piece]:
        """Everything held back, once the generation has ended; ``cut``: by ``max_tokens``, where
        what could only have grown into markup (a header, a marker's start) is dropped."""
        pieces: list[Piece] = []
        rest, self._buffer = self._buffer, ""
        if self._state == "body":
            self._body_text(pieces, rest[: len(rest) - held(rest, self._ends)] if cut else rest)
        elif self._state == "plain" or (self._state == "between" and not cut):  # a header left unfinished is markup
            self._emit(pieces, "content", rest if self._state != "between" else rest.strip())
        if cut and self._forced:
            pieces = [p for p in pieces if p.kind != "content"]
            in_thought = self._state in ("body", "header") and self._kind == "reasoning"
            if not self._called and not in_thought and self._forced_name is not None:
                pieces.append(Piece("tool_call", call=ToolCall(self._forced_name, "", new_call_id())))
        self._stamp(pieces, 0)
        return pieces

    # ---- states -------------------------------------------------------------------------------

    def _in_between(self, pieces: list[Piece]) -> None:
        head = self._buffer.lstrip()
        if not head:
            return
        if head.startswith(_OPENINGS):
            self._buffer = head.removeprefix("<|start|>")
            self._state, self._kind = "header", "content"
            self._header_at = self._pushed - len(head)
        elif not any(opening.startswith(head) for opening in _OPENINGS):
            self._state = "plain"

    def _in_header(self, pieces: list[Piece]) -> None:
        end = self._buffer.find("<|message|>")
        if end < 0:
            if len(self._buffer) > _HEADER_LIMIT or any(e in self._buffer for e in ENDS):
                self._state = "plain"
            return
        found = header_kind(self._buffer[:end], self._calls_allowed, self._held_answer)
        if found is None:
            self._state = "plain"
            return
        self._kind, name, self._ends = found
        if self._kind == "call" and self._called and not self._parallel:
            self._kind = "hidden"  # a second call message, where only one was asked for
        self._buffer = self._buffer[end + len("<|message|>") :]
        self._state, self._fresh = "body", True
        if self._kind == "reasoning" and self._reasoning_span is None:
            self._reasoning_span = (self._header_at, None)
        elif self._kind == "reasoning":
            self._reasoning_span = (self._reasoning_span[0], None)
        if self._kind == "call":
            self._called += 1
            pieces.append(Piece("tool_call", call=ToolCall(name, "", new_call_id())))

    def _in_body(self, pieces: list[Piece]) -> None:
        found = [(at, end) for end in self._ends if (at := self._buffer.find(end)) >= 0]
        if found:
            at, end = min(found)
            self._body_text(pieces, self._buffer[:at])
            self._buffer = self._buffer[at + len(end) :]
            if self._kind == "reasoning":
                assert self._reasoning_span is not None
                self._reasoning_span = (self._reasoning_span[0], self._pushed - len(self._buffer))
            self._state = "between"
            return
        keep = held(self._buffer, self._ends)
        self._body_text(pieces, self._buffer[: len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep :]

    def _in_plain(self, pieces: list[Piece]) -> None:
        rest, self._buffer = self._buffer, ""
        self._emit(pieces, "content", rest)

    # ---- helpers ------------------------------------------------------------------------------

    def _body_text(self, pieces: list[Piece], text: str) -> None:
        if self._kind == "hidden":
            return
        if self._kind == "call":
            if text:
                pieces.append(Piece("arguments", text))
            return
        if text and self._fresh and self._kind in self._said:
            text = "\n\n" + text  # a second thought, or an answer after a preamble
        self._emit(pieces, self._kind, text)

    def _emit(self, pieces: list[Piece], kind: Literal["reasoning", "content"], text: str) -> None:
        if text:
            pieces.append(Piece(kind, text))
            self._said.add(kind)
            self._fresh = False


def parse_harmony(section: str, schemas: object) -> tuple[list[ToolCall], str] | None:
    """The calls of a whole harmony text (``ToolSyntax.parse``'s contract); None without one."""
    parser = HarmonyParser()
    pieces = parser.push(section) + parser.finish()
    calls: list[ToolCall] = []
    for piece in pieces:
        if piece.kind == "tool_call" and piece.call is not None:
            calls.append(piece.call)
        elif piece.kind == "arguments":
            calls[-1] = dataclasses.replace(calls[-1], arguments=calls[-1].arguments + piece.text)
    return (calls, "") if calls else None
