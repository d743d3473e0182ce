"""Reading a tool-call section as it is generated, so calls stream the way OpenAI streams them.

OpenAI sends a call's ``id``, ``type`` and ``function.name`` first, then ``function.arguments`` in
fragments as the model writes them. For the JSON families (Hermes/Qwen ``<tool_call>{…}``,
Llama 3 ``{"name": …, "parameters": {…}}``, Mistral ``[TOOL_CALLS][{…}]`` and
``[TOOL_CALLS]NAME[ARGS]{…}``, Granite ``<|tool_call|>[…]``, Firefunction ``functools[…]``) each
family's layout is a generator over a ``_Reader`` that waits (``yield``) for more text whenever it
cannot decide yet; so the code reads like a parser of the whole section and still runs one token
at a time.

When a call commits, and what its arguments are:

- A call is announced (``tool_call`` piece) once its name has been read and its arguments' ``{``
  follows; from then on each character the JSON scanner accepts is sent as an ``arguments``
  fragment. The arguments are the model's own text, so the fragments add up to exactly the
  non-streamed ``function.arguments``: a whole response is this same reader run to the end.
- Anything that breaks before that point is no call: the section is read at the end by the
  family's whole-text parser (``syntaxes.py``), which turns a malformed call into content. The same
  happens for call shapes this reader does not stream (arguments before the name, arguments as a
  string, Llama's ``<|python_tag|>`` code, Qwen3's XML form): those calls come whole, at the end.
- A stream cannot take back what it sent. A call that breaks after it was announced (the model
  leaves JSON, or ``max_tokens`` cuts it) keeps the arguments written up to the break, which are
  then not valid JSON, as OpenAI's own API may return; what follows the break is content. A call
  held to its schema by a grammar (forced, or ``auto`` once its marker started it) cannot break;
  only ``max_tokens`` can cut it, and ``finish_reason`` then says ``length``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Generator, Mapping
from typing import Any

from .jsonscan import JsonScanner
from .syntaxes import ToolSyntax, call_from_object
from .types import Piece, ToolCall, new_call_id

Wait = Generator[None, None, Any]
_STRING = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*"')
_STRING_START = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*\\?')
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_CALL_ID = re.compile(r"[A-Za-z0-9]+")
_ARGUMENT_KEYS = ('"arguments"', '"parameters"')


class _NotStreamable(Exception):
    """This call is not in a shape read here: the family's whole-text parser reads it at the end."""


class _Broken(Exception):
    """An announced call stopped being a call; the text from ``at`` on is content."""

    def __init__(self, at: int) -> None:
        self.at = at


class _Reader:
    """The section's text so far, a position in it, and the pieces read."""

    def __init__(self, syntax: ToolSyntax, schemas: Mapping[str, Any]) -> None:
        self.syntax = syntax
        self.schemas = schemas
        self.text = ""
        self.pos = 0
        self.ended = False
        self.pieces: list[Piece] = []
        self.calls = 0
        # Where the family's whole-text parser would start reading the current call, and how many
        # calls had been announced there (a unit that announced some can no longer be re-read).
        self.unit_start = 0
        self.unit_calls = 0

    def begin_unit(self) -> None:
        self.unit_start, self.unit_calls = self.pos, self.calls

    # ---- waiting for text ---------------------------------------------------------------------

    def skip_space(self) -> Wait:
        """Skip whitespace; False at the end of the answer."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos].isspace():
                self.pos += 1
            if self.pos < len(self.text):
                return True
            if self.ended:
                return False
            yield

    def literal(self, *options: str, optional: bool = False) -> Wait:
        """One of ``options`` after whitespace: the one read, or None (only when ``optional``)."""
        start = self.pos
        while True:
            if (yield from self.skip_space()):
                rest = self.text[self.pos :]
                found = next((o for o in options if rest.startswith(o)), None)
                if found is not None:
                    self.pos += len(found)
                    return found
                if not self.ended and any(o.startswith(rest) for o in options):
                    self.pos = start
                    yield
                    continue
            self.pos = start
            if optional:
                return None
            raise _NotStreamable

    def pattern(self, regex: re.Pattern[str], complete: re.Pattern[str] | None = None) -> Wait:
        """Text matching ``regex`` right here that the next character cannot extend (or None)."""
        while True:
            match = (complete or regex).match(self.text, self.pos)
            if match is not None and (complete is not None or match.end() < len(self.text) or self.ended):
                self.pos = match.end()
                return match.group()
            partial = regex.match(self.text, self.pos)
            if self.ended or partial is None or partial.end() < len(self.text):
                return None
            yield

    # ---- a call ----------------------------------------------------------------------------------

    def announce(self, name: str, call_id: str | None = None) -> None:
        call_id = call_id or new_call_id(self.syntax.id_style)
        self.pieces.append(Piece("tool_call", call=ToolCall(name, "", call_id)))
        self.calls += 1

    def opens_object(self) -> Wait:
        """Whether a JSON object opens here: ``{``, whitespace, then a key or ``}``. A call is
        announced only then, so arguments such as ``{city: Paris}`` leave it content."""
        if self.text[self.pos] != "{":
            return False
        index = self.pos + 1
        while True:
            while index < len(self.text) and self.text[index] in " \t\n\r":
                index += 1
            if index < len(self.text):
                return self.text[index] in '"}'
            if self.ended:
                return False
            yield

    def arguments(self) -> Wait:
        """Stream a JSON object as the arguments of the call just announced."""
        scanner = JsonScanner()
        while True:
            start = self.pos
            while self.pos < len(self.text) and scanner.feed(self.text[self.pos]):
                self.pos += 1
                if scanner.done:
                    break
            if self.pos > start:
                self.pieces.append(Piece("arguments", self.text[start : self.pos]))
            if scanner.done:
                return
            if self.pos < len(self.text) or self.ended:
                raise _Broken(self.pos)
            yield

    def json_object(self, primed: str = "") -> Wait:
        """Read the rest of a JSON object (``primed``: what was read before); its text, or
        ``_NotStreamable`` when it is not one."""
        scanner = JsonScanner()
        for char in primed:
            scanner.feed(char)
        start = self.pos
        while not scanner.done:
            if self.pos == len(self.text):
                if self.ended:
                    raise _NotStreamable
                yield
                continue
            if not scanner.feed(self.text[self.pos]):
                raise _NotStreamable
            self.pos += 1
        return self.text[start : self.pos]

    def call_object(self) -> Wait:
        """``{"name": …, "arguments": {…}}`` streamed; any other call object read whole."""
        if not (yield from self.skip_space()) or self.text[self.pos] != "{":
            raise _NotStreamable
        start = self.pos
        name = yield from self._head()
        if name is None:
            self.pos = start
            text = yield from self.json_object()
            try:
                call = call_from_object(json.loads(text), self.schemas, self.syntax.id_style)
            except (RecursionError, ValueError):  # nested deeper than json can recurse
                raise _NotStreamable from None
            if call is None:
                raise _NotStreamable
            self.announce(call.name, call.id)
            self.pieces.append(Piece("arguments", call.arguments))
            return
        if not (yield from self.opens_object()):
            raise _NotStreamable
        self.announce(name)
        yield from self.arguments()
        try:
            yield from self.json_object(primed='{"a":0')  # the call object's other members, to its "}"
        except _NotStreamable:
            raise _Broken(self.pos) from None

    def _head(self) -> Wait:
        """The call's name, with the position at its arguments' ``{``; None for another shape."""
        steps: tuple[Any, ...] = ("{", '"name"', ":", _STRING, ",", _ARGUMENT_KEYS, ":")
        for step in steps:
            if isinstance(step, re.Pattern):
                if not (yield from self.skip_space()):
                    return None
                found = yield from self.pattern(_STRING_START, complete=_STRING)
                if found is None:
                    return None
                try:
                    name = json.loads(found)
                except ValueError:  # an escape JSON does not have
                    return None
            elif (yield from self.literal(*((step,) if isinstance(step, str) else step), optional=True)) is None:
                return None
        if not (yield from self.skip_space()) or self.text[self.pos] != "{":
            return None
        return name if isinstance(name, str) and name.strip() else None

    def named_call(self) -> Wait:
        """Mistral's ``NAME[CALL_ID]ID[ARGS]{…}``; False (nothing read) when none follows."""
        start = self.pos
        if not (yield from self.skip_space()):
            return False
        name = yield from self.pattern(_NAME)
        call_id = None
        if name is not None and (yield from self.literal("[CALL_ID]", optional=True)):
            call_id = yield from self.pattern(_CALL_ID)
        if name is None or (yield from self.literal("[ARGS]", optional=True)) is None:
            self.pos = start
            return False
        if not (yield from self.skip_space()) or not (yield from self.opens_object()):
            raise _NotStreamable
        self.announce(name, call_id)
        yield from self.arguments()
        return True


# ---- each family's layout -------------------------------------------------------------------------


def _hermes(r: _Reader) -> Wait:
    while True:
        r.begin_unit()
        if not (yield from r.literal("<tool_call>", optional=True)):
            return
        yield from r.call_object()
        yield from r.literal("</tool_call>", optional=True)


def _llama3(r: _Reader) -> Wait:
    yield from r.literal("<|python_tag|>", optional=True)
    while True:
        yield from r.call_object()
        if not (yield from r.literal(";", ",", optional=True)):
            return
        r.begin_unit()


def _mistral(r: _Reader) -> Wait:
    while (yield from r.literal("[TOOL_CALLS]", optional=True)):
        if (yield from r.literal("[", optional=True)):
            yield from r.call_object()
            while (yield from r.literal(",", optional=True)):
                yield from r.call_object()
            yield from r.literal("]")
        elif (yield from r.skip_space()) and r.text[r.pos] == "{":
            yield from r.call_object()
        elif not (yield from r.named_call()):
            raise _NotStreamable
        else:
            while (yield from r.named_call()):
                pass
        r.begin_unit()


def _json_list(opening: str, closing: str | None) -> Callable[[_Reader], Wait]:
    """``OPENING [call, …] CLOSING`` (or one call object without the list)."""

    def layout(r: _Reader) -> Wait:
        yield from r.literal(opening)
        if (yield from r.literal("[", optional=True)):
            yield from r.call_object()
            while (yield from r.literal(",", optional=True)):
                yield from r.call_object()
            yield from r.literal("]")
        else:
            yield from r.call_object()
        if closing is not None:
            yield from r.literal(closing, optional=True)

    return layout


_LAYOUTS = {
    "hermes": _hermes,
    "llama3": _llama3,
    "mistral": _mistral,
    "mistral-args": _mistral,
    "granite": _json_list("<|tool_call|>", "<|/tool_call|>"),
    "firefunction": _json_list("functools", None),
}


class CallStream:
    """Pieces of one answer's tool-call section, from the text as it comes (``push``) to its end."""

    def __init__(self, syntax: ToolSyntax, schemas: Mapping[str, Any], parallel: bool) -> None:
        self._reader = _Reader(syntax, schemas)
        self._parallel = parallel
        self._announced = 0  # calls announced so far (only the first is kept without parallel calls)
        layout = _LAYOUTS.get(syntax.name)
        self._layout: Wait | None = layout(self._reader) if layout is not None else None
        self._rest_from: int | None = None  # where the calls ended: the rest is content
        self._whole_from: int | None = None if layout is not None else 0  # left to the whole-text parser
        self._broken = False

    def push(self, text: str) -> list[Piece]:
        self._reader.text += text
        self._run()
        return self._take()

    def finish(self) -> list[Piece]:
        self._reader.ended = True
        self._run()
        pieces = self._take()
        text = self._reader.text
        if self._whole_from is not None:
            pieces.extend(self._whole(text[self._whole_from :]))
        elif self._rest_from is not None:
            rest = text[self._rest_from :].strip()
            pieces.extend([Piece("content", rest)] if rest else [])
        return pieces

    def _run(self) -> None:
        if self._layout is None:
            return
        reader = self._reader
        try:
            next(self._layout)
            return
        except StopIteration:
            self._rest_from = reader.pos
        except _NotStreamable:
            if reader.calls > reader.unit_calls:  # its calls went out already: the rest is content
                self._rest_from = reader.pos
            else:
                self._whole_from = reader.unit_start
        except _Broken as broken:
            self._rest_from = broken.at
        self._layout = None

    def _take(self) -> list[Piece]:
        """The pieces read since last time, less the calls after the first without parallel calls."""
        pieces, self._reader.pieces = self._reader.pieces, []
        kept = []
        for piece in pieces:
            if piece.kind == "tool_call":
                self._announced += 1
            if self._parallel or self._announced <= 1:
                kept.append(piece)
        return kept

    def _whole(self, section: str) -> list[Piece]:
        """The family's whole-text parser on what was not streamed; a malformed call is content."""
        reader = self._reader
        try:
            parsed = reader.syntax.parse(section, reader.schemas)
        except (RecursionError, MemoryError, ValueError, TypeError):  # e.g. JSON nested 10k deep
            parsed = None
        if parsed is None:
            text = section.strip() if reader.calls else section
            return [Piece("content", text)] if text else []
        reader.pieces = []
        for call in parsed[0]:
            reader.announce(call.name, call.id)
            reader.pieces.append(Piece("arguments", call.arguments))
        after = parsed[1].strip()
        return self._take() + ([Piece("content", after)] if after else [])
