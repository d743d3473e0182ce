"""Splitting generated text into reasoning, content and tool calls, incrementally.

The same ``OutputParser`` serves whole responses and streams (a whole response is one stream
read to its end), so both always agree. Text is emitted as soon as it cannot be part of a marker
anymore: only a tail that could still grow into ``</think>`` or ``<tool_call>`` is held back,
the way stop strings are. A tool-call section is read by ``calls.CallStream``: JSON calls stream
their arguments as they are written, other shapes are parsed whole at the end; a call that does
not parse is emitted as content, never lost and never a server error.

Template markup never reaches ``content``: a thought's end marker where no thought is open (a
second ``</think>``, or one after a thought the template closed) is left out, the text around it
kept, unless a grammar holds the answer (``held_answer``: there it is text the grammar let through,
such as a JSON string's). When ``max_tokens`` cuts the answer (``finish(cut=True)``),
a held-back tail that could only grow into a marker (``<tool_``) is dropped rather than emitted, and
so is whatever a cut call section leaves unread (``calls.py``): a model that ends of its own
accord after such text wrote it as prose, and gets it back; a model cut there was writing markup.
A forced call (``expect_call``: tool_choice ``required`` or a named function) is the whole answer:
cut, it leaves no content, and the named function's call is returned with the arguments written
so far (possibly none), as OpenAI returns a call cut by ``max_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .call_shapes import json_call_opening
from .calls import CallStream, held
from .formats import ReasoningMarkers
from .reader import TextReader
from .syntaxes import ToolSyntax
from .types import Piece, ToolCall, new_call_id


@dataclass
class ParsedOutput:
    """A whole answer: what ``message`` holds."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def add(self, pieces: Iterable[Piece]) -> ParsedOutput:
        for piece in pieces:
            if piece.kind == "reasoning":
                self.reasoning += piece.text
            elif piece.kind == "content":
                self.content += piece.text
            elif piece.kind == "arguments":
                last = self.tool_calls[-1]
                self.tool_calls[-1] = dataclasses.replace(last, arguments=last.arguments + piece.text)
            elif piece.call is not None:
                self.tool_calls.append(piece.call)
        return self


class OutputParser(TextReader):
    """States: ``start`` (a thought may open) → ``reasoning`` → ``content`` → ``tools`` (to the end)."""

    def __init__(
        self,
        reasoning: ReasoningMarkers | None = None,
        in_reasoning: bool = False,
        syntax: ToolSyntax | None = None,
        schemas: Mapping[str, Any] | None = None,
        parallel: bool = True,
        continuing: bool = False,
        held_answer: bool = False,
    ) -> None:
        """``continuing``: the answer goes on with text already under way (a continued assistant
        message), so its leading whitespace is text, not space before an answer to trim.
        ``held_answer``: a grammar holds the answer's text (a JSON ``response_format``), which may
        then hold a thought's end marker as data (a JSON string): it is kept there."""
        self._reasoning = reasoning
        self._stray_end = reasoning.end if reasoning is not None and not held_answer else None
        self._syntax = syntax
        self._schemas = schemas or {}
        self._parallel = parallel and (syntax is None or syntax.parallel)
        super().__init__("reasoning" if in_reasoning and reasoning else "start" if reasoning else "content")
        if self._state == "reasoning":
            self._reasoning_span = (0, None)
        self._content_started = continuing  # content seen beyond whitespace: "leading" markers no longer apply
        self._reasoning_started = False
        self._calls: CallStream | None = None

    def _step(self, pieces: list[Piece]) -> None:
        if self._state == "start":
            self._start()
        elif self._state == "reasoning":
            self._in_reasoning(pieces)
        elif self._state == "content":
            self._in_content(pieces)
        elif self._calls is not None:
            rest, self._buffer = self._buffer, ""
            pieces.extend(self._calls.push(rest))

    def finish(self, cut: bool = False) -> list[Piece]:
        """Everything held back, once the generation has ended; ``cut``: by ``max_tokens``."""
        pieces: list[Piece] = []
        rest, self._buffer = self._buffer, ""
        if self._state == "reasoning":
            self._emit(pieces, "reasoning", rest.rstrip() if self._reasoning_started else rest.strip())
        elif self._calls is not None:
            pieces.extend(self._calls.push(rest) + self._calls.finish(cut))
        elif not cut:
            self._emit(pieces, "content", rest if self._content_started else rest.lstrip())
        # else: what a cut leaves held back here could only have become a marker (``held``).
        if cut and self._forced:
            pieces = [p for p in pieces if p.kind != "content"]
            if self._state != "reasoning" and not self._called(pieces) and self._forced_name is not None:
                assert self._syntax is not None
                pieces.append(Piece("tool_call", call=ToolCall(self._forced_name, "", new_call_id(self._syntax.id_style))))
        self._stamp(pieces, 0)
        return pieces

    def _called(self, pieces: list[Piece]) -> bool:
        return (self._calls is not None and self._calls.announced > 0) or any(p.kind == "tool_call" for p in pieces)

    # ---- states -------------------------------------------------------------------------------

    def _start(self) -> None:
        assert self._reasoning is not None
        head = self._buffer.lstrip()
        if head.startswith(self._reasoning.start):
            self._reasoning_span = (self._pushed - len(head), None)
            self._buffer = head[len(self._reasoning.start) :]
            self._state = "reasoning"
        elif not self._reasoning.start.startswith(head):
            self._state = "content"
        # else: what came so far may still become the start marker; wait for more.

    def _in_reasoning(self, pieces: list[Piece]) -> None:
        assert self._reasoning is not None
        if not self._reasoning_started:
            self._buffer = self._buffer.lstrip()
            self._reasoning_started = bool(self._buffer)
        end = self._buffer.find(self._reasoning.end)
        if end >= 0:
            self._emit(pieces, "reasoning", self._buffer[:end].rstrip())
            self._buffer = self._buffer[end + len(self._reasoning.end) :]
            assert self._reasoning_span is not None
            self._reasoning_span = (self._reasoning_span[0], self._pushed - len(self._buffer))
            self._state = "content"
            return
        keep = held(self._buffer, (self._reasoning.end,))
        text = self._buffer[: len(self._buffer) - keep]
        ready = text.rstrip()  # trailing whitespace may precede the end marker
        self._emit(pieces, "reasoning", ready)
        self._buffer = self._buffer[len(ready) :]

    def _in_content(self, pieces: list[Piece]) -> None:
        if not self._content_started:
            self._buffer = self._buffer.lstrip()
            if not self._buffer:
                return
        opening = self._json_opening()
        if opening == "wait":  # "{" or '{"na': a call's opening, or an answer's
            return
        start = 0 if opening == "call" else self._call_start()
        if self._drop_stray_end(pieces, start):
            return
        if start is not None:
            self._emit(pieces, "content", self._buffer[:start])
            self._buffer = self._buffer[start:]
            self._state = "tools"
            assert self._syntax is not None
            self._calls = CallStream(self._syntax, self._schemas, self._parallel)
            return
        markers = (self._syntax.starts if self._syntax is not None else ()) + ((self._stray_end,) if self._stray_end else ())
        keep = held(self._buffer, markers)
        self._emit(pieces, "content", self._buffer[: len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep :]

    def _drop_stray_end(self, pieces: list[Piece], call_start: int | None) -> bool:
        """A thought's end marker where no thought is open (the template closed it, or none was
        opened; a second one after the thought) is markup, left out of ``content``; the text before
        it stays content, as a stream has already sent it."""
        at = self._buffer.find(self._stray_end) if self._stray_end else -1
        if at < 0 or (call_start is not None and call_start < at):
            return False
        assert self._stray_end is not None
        self._emit(pieces, "content", self._buffer[:at])
        self._buffer = self._buffer[at + len(self._stray_end) :]
        return True

    def _json_opening(self) -> str | None:
        """For a family whose calls may open the answer as bare JSON (``leading``: Llama 3's
        ``{``, generic), whether this answer's opening is one (``call_shapes.json_call_opening``).
        Any ``{`` or ``[`` was taken for a call: an answer opening with a citation ``[1]``, a link
        or a JSON of its own streamed nothing until its end, and was dropped whole when cut."""
        if self._content_started or self._syntax is None or not self._buffer.startswith(self._syntax.leading):
            return None
        return json_call_opening(self._buffer, self._schemas.keys())

    def _call_start(self) -> int | None:
        if self._syntax is None:
            return None
        found = [i for i in (self._buffer.find(m) for m in self._syntax.starts) if i >= 0]
        return min(found) if found else None

    def _emit(self, pieces: list[Piece], kind: Literal["reasoning", "content"], text: str) -> None:
        if text:
            pieces.append(Piece(kind, text))
            if kind == "content":
                self._content_started = True
