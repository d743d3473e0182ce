"""A cursor over a tool-call section that is still being generated.

``CallReader`` methods are generators: where the text so far cannot decide (``<tool_ca`` may
still become ``<tool_call>``), they ``yield`` until more arrives, so a family's layout
(``calls.py``) reads like a parser of the whole text and still runs one token at a time. They
append what they read to ``pieces``: a call announced (``tool_call``) and its arguments' fragments.
Two exceptions end a layout early: ``NotStreamable`` (nothing of this call was announced: the
family's whole-text parser reads it at the end) and ``Broken`` (an announced call broke).

When ``max_tokens`` cuts the answer (``cut``), a call whose name was read is announced all the
same, with the arguments written so far, as OpenAI returns a call cut short. An XML call cut
inside a parameter's value keeps that parameter too, its value so far as a JSON string left open
(``{"city": "Par``): what a JSON call cut at the same place returns, whatever the parameter's type,
so the buyer sees every character generated (before, the parameter was lost).
"""

from __future__ import annotations

import re
from collections.abc import Generator, Mapping
from typing import Any

from . import jsontext
from .call_shapes import call_from_object, parameter_schemas, xml_value
from .jsonscan import JsonScanner
from .syntaxes import ToolSyntax
from .types import Piece, ToolCall, new_call_id

Wait = Generator[None, None, Any]
_STRING = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*"')
_STRING_START = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*\\?')
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_CALL_ID = re.compile(r"[A-Za-z0-9]+")
_ARGUMENT_KEYS = ('"arguments"', '"parameters"')
_XML_NAME = re.compile(r"[^>\n]+")


class NotStreamable(Exception):
    """This call is not in a shape read here: the family's whole-text parser reads it at the end."""


class Broken(Exception):
    """An announced call stopped being a call; the text from ``at`` on is content."""

    def __init__(self, at: int) -> None:
        self.at = at


class CallReader:
    """The section's text so far, a position in it, and the pieces read."""

    def __init__(self, syntax: ToolSyntax, schemas: Mapping[str, Any]) -> None:
        self.syntax = syntax
        self.schemas = schemas
        self.text = ""
        self.pos = 0
        self.ended = False
        self.cut = False  # set with ``ended`` when max_tokens cut the answer
        self.heard: str | None = None  # the name ``_head`` read last, before its shape was known
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
            raise NotStreamable

    def pattern(self, regex: re.Pattern[str], complete: re.Pattern[str] | None = None) -> Wait:
        """Text matching ``regex`` right here that the next character cannot extend (or None)."""
        while True:
            match = (complete or regex).match(self.text, self.pos)
            if match is not None and (complete is not None or match.end() < len(self.text) or self.ended):
                self.pos = match.end()
                return match.group()
            partial = regex.match(self.text, self.pos)
            at_end = self.pos == len(self.text) or (partial is not None and partial.end() == len(self.text))
            if self.ended or not at_end:
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
                raise Broken(self.pos)
            yield

    def json_object(self, primed: str = "") -> Wait:
        """Read the rest of a JSON object (``primed``: what was read before); its text, or
        ``NotStreamable`` when it is not one."""
        scanner = JsonScanner()
        for char in primed:
            scanner.feed(char)
        start = self.pos
        while not scanner.done:
            if self.pos == len(self.text):
                if self.ended:
                    raise NotStreamable
                yield
                continue
            if not scanner.feed(self.text[self.pos]):
                raise NotStreamable
            self.pos += 1
        return self.text[start : self.pos]

    def call_object(self) -> Wait:
        """``{"name": …, "arguments": {…}}`` streamed; any other call object read whole."""
        if not (yield from self.skip_space()) or self.text[self.pos] != "{":
            raise NotStreamable
        start = self.pos
        name = yield from self._head()
        if name is not None and not self._offered(name):
            raise NotStreamable
        if name is None:
            heard, self.pos = self.heard, start
            try:
                text = yield from self.json_object()
            except NotStreamable:
                if self.cut and heard is not None and self._offered(heard):  # cut after the call's name
                    self.announce(heard)
                    raise Broken(len(self.text)) from None
                raise
            try:
                call = call_from_object(jsontext.loads(text), self.schemas, self.syntax.id_style)
            except (RecursionError, ValueError):  # nested deeper than json can recurse
                raise NotStreamable from None
            if call is None or not self._offered(call.name):
                raise NotStreamable
            self.announce(call.name, call.id)
            self.pieces.append(Piece("arguments", call.arguments))
            return
        if not (yield from self.opens_object()):
            if self.cut:  # cut at the arguments' start: what was written of them is returned
                self.announce(name)
                self.pieces.append(Piece("arguments", self.text[self.pos :]))
                raise Broken(len(self.text))
            raise NotStreamable
        self.announce(name)
        yield from self.arguments()
        try:
            yield from self.json_object(primed='{"a":0')  # the call object's other members, to its "}"
        except NotStreamable:
            raise Broken(self.pos) from None

    def _offered(self, name: str) -> bool:
        """A bare JSON call (``leading``: Llama 3, generic) names an offered function; another such
        object is an answer of its own (``call_shapes.offered``), read whole and kept as content."""
        return not self.syntax.leading or not self.schemas or name in self.schemas

    def _head(self) -> Wait:
        """The call's name, with the position at its arguments' ``{``; None for another shape."""
        steps: tuple[Any, ...] = ("{", '"name"', ":", _STRING, ",", _ARGUMENT_KEYS, ":")
        self.heard = None
        for step in steps:
            if isinstance(step, re.Pattern):
                if not (yield from self.skip_space()):
                    return None
                found = yield from self.pattern(_STRING_START, complete=_STRING)
                if found is None:
                    return None
                try:
                    name = jsontext.loads(found)
                except ValueError:  # an escape JSON does not have
                    return None
                self.heard = jsontext.usable_name(name)
            elif (yield from self.literal(*((step,) if isinstance(step, str) else step), optional=True)) is None:
                return None
        if not (yield from self.skip_space()) or self.text[self.pos] != "{":
            return None
        return jsontext.usable_name(name)

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
            raise NotStreamable
        self.announce(name, call_id)
        yield from self.arguments()
        return True

    def until(self, marker: str) -> Wait:
        """The text up to ``marker``, which is read too; None when the answer ends without one."""
        while (found := self.text.find(marker, self.pos)) < 0:
            if self.ended:
                return None
            yield
        text, self.pos = self.text[self.pos : found], found + len(marker)
        return text

    def xml_parameter(self) -> Wait:
        """(key, raw value) of a ``<parameter=KEY>\\nvalue\\n</parameter>``; None when none follows
        (nothing read), False when one started and is malformed."""
        if not (yield from self.literal("<parameter=", optional=True)):
            return None
        key = yield from self.pattern(_XML_NAME)
        if key is None or not key.strip() or not (yield from self.literal(">", optional=True)):
            return False
        raw = yield from self.until("</parameter>")
        if raw is None and self.cut:
            return key.strip(), _value_so_far(self.text[self.pos :]), False
        if raw is None:
            return False
        raw = raw[1:] if raw.startswith("\n") else raw
        return key.strip(), raw[:-1] if raw.endswith("\n") else raw, True

    def xml_call(self) -> Wait:
        """Qwen3's ``<function=NAME><parameter=KEY>value</parameter>…</function>``, announced with
        its first parameter (or its end). A value, typed by the tool's schema, goes out as one JSON
        member once it is closed: the arguments are what ``json.dumps`` makes of the whole call."""
        yield from self.literal("<function=")
        name = yield from self.pattern(_XML_NAME)
        if name is None or not name.strip() or not (yield from self.literal(">", optional=True)):
            raise NotStreamable
        properties = parameter_schemas(self.schemas.get(name.strip()))
        keys: list[str] = []
        while (parameter := (yield from self.xml_parameter())) is not None:
            if parameter is False or parameter[0] in keys:  # a repeated key: a dict keeps only the last
                raise self._xml_break(name.strip(), keys)
            key, raw, whole = parameter
            if not keys:
                self.announce(name.strip())
            value = jsontext.dumps(xml_value(raw, properties.get(key)) if whole else raw)
            member = f"{jsontext.dumps(key)}: {value if whole else value[:-1]}"  # cut: the string goes on
            self.pieces.append(Piece("arguments", ("{" if not keys else ", ") + member))
            keys.append(key)
            if not whole:
                raise Broken(len(self.text))
        if not (yield from self.literal("</function>", optional=True)):
            raise self._xml_break(name.strip(), keys)
        if not keys:
            self.announce(name.strip())
        self.pieces.append(Piece("arguments", "}" if keys else "{}"))

    def _xml_break(self, name: str, keys: list[str]) -> Exception:
        """What ends an XML call that stopped being one: cut by max_tokens, it is announced all
        the same (its parameters so far already went out), and what the cut left unread is markup."""
        if self.cut:
            if not keys:
                self.announce(name)
            return Broken(len(self.text))
        return Broken(self.pos) if keys else NotStreamable()


_CLOSING = "</parameter>"


def _value_so_far(text: str) -> str:
    """A parameter's value as a cut left it, read as a whole value is: without the newline after
    its tag, nor the start of a closing tag and the newline before it (so it is a prefix of the
    value the whole call would have had, whichever way the text went on)."""
    text = text[1:] if text.startswith("\n") else text
    started = next((n for n in range(min(len(text), len(_CLOSING) - 1), 0, -1) if text.endswith(_CLOSING[:n])), 0)
    text = text[: len(text) - started]
    return text[:-1] if text.endswith("\n") else text
