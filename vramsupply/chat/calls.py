"""Reading a tool-call section as it is generated, so calls stream the way OpenAI streams them.

OpenAI sends a call's ``id``, ``type`` and ``function.name`` first, then ``function.arguments`` in
fragments as the model writes them. For the JSON families (Hermes/Qwen ``<tool_call>{…}``,
Llama 3 ``{"name": …, "parameters": {…}}``, Mistral ``[TOOL_CALLS][{…}]`` and
``[TOOL_CALLS]NAME[ARGS]{…}``, Granite ``<|tool_call|>[…]``, Firefunction ``functools[…]``) each
family's layout is a generator over a ``CallReader`` (``call_reader.py``) that waits (``yield``)
for more text whenever it cannot decide yet; so the code reads like a parser of the whole section
and still runs one token at a time. Qwen3's XML calls (``<function=NAME><parameter=K>…``) stream
one parameter at a time, as the JSON members ``json.dumps`` would write.

When a call commits, and what its arguments are:

- A call is announced (``tool_call`` piece) once its name has been read and its arguments' ``{``
  follows; from then on each character the JSON scanner accepts is sent as an ``arguments``
  fragment. The arguments are the model's own text, so the fragments add up to exactly the
  non-streamed ``function.arguments``: a whole response is this same reader run to the end.
- Anything that breaks before that point is no call: the section is read at the end by the
  family's whole-text parser (``call_parsers.py``), which turns a malformed call into content.
  The same happens for call shapes this reader does not stream (arguments before the name,
  arguments as a string, Llama's ``<|python_tag|>`` code): those calls come whole, at the end.
- A stream cannot take back what it sent. A call that breaks after it was announced (the model
  leaves JSON, or ``max_tokens`` cuts it) keeps the arguments written up to the break, which are
  then not valid JSON, as OpenAI's own API may return; what follows the break is content. A call
  held to its schema by a grammar (forced, or ``auto`` once its marker started it) cannot break;
  only ``max_tokens`` can cut it, and ``finish_reason`` then says ``length``.
- A cut (``finish(cut=True)``) is no break of the model's: whatever the layout was still reading
  when the text ran out (a call's head, ``</tool_c``, ``<tool_call>`` of a next call, a section the
  whole-text parser cannot read) is markup cut short and is dropped, not returned as content. A
  call whose name was read when the cut came is announced with the arguments written so far.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .call_reader import Broken, CallReader, NotStreamable, Wait
from .syntaxes import ToolSyntax
from .types import Piece


def held(text: str, markers: Iterable[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a marker."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


# ---- each family's layout -------------------------------------------------------------------------


def _tool_call_blocks(r: CallReader) -> Wait:
    """Hermes/Qwen ``<tool_call>`` blocks, each a JSON call object or Qwen3's XML call."""
    while True:
        r.begin_unit()
        if not (yield from r.literal("<tool_call>", optional=True)):
            return
        if (yield from r.skip_space()) and r.text[r.pos] == "{":
            yield from r.call_object()
        else:
            yield from r.xml_call()
        yield from r.literal("</tool_call>", optional=True)


def _llama3(r: CallReader) -> Wait:
    yield from r.literal("<|python_tag|>", optional=True)
    while True:
        yield from r.call_object()
        if not (yield from r.literal(";", ",", optional=True)):
            return
        r.begin_unit()


def _mistral(r: CallReader) -> Wait:
    while (yield from r.literal("[TOOL_CALLS]", optional=True)):
        if (yield from r.literal("[", optional=True)):
            yield from r.call_object()
            while (yield from r.literal(",", optional=True)):
                yield from r.call_object()
            yield from r.literal("]")
        elif (yield from r.skip_space()) and r.text[r.pos] == "{":
            yield from r.call_object()
        elif not (yield from r.named_call()):
            raise NotStreamable
        else:
            while (yield from r.named_call()):
                pass
        r.begin_unit()


def _json_list(opening: str, closing: str | None) -> Callable[[CallReader], Wait]:
    """``OPENING [call, …] CLOSING`` (or one call object without the list)."""

    def layout(r: CallReader) -> Wait:
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
    "hermes": _tool_call_blocks,
    "qwen3-xml": _tool_call_blocks,
    "llama3": _llama3,
    "mistral": _mistral,
    "mistral-args": _mistral,
    "granite": _json_list("<|tool_call|>", "<|/tool_call|>"),
    "firefunction": _json_list("functools", None),
}


class CallStream:
    """Pieces of one answer's tool-call section, from the text as it comes (``push``) to its end."""

    def __init__(self, syntax: ToolSyntax, schemas: Mapping[str, Any], parallel: bool) -> None:
        self._reader = CallReader(syntax, schemas)
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

    @property
    def announced(self) -> int:
        """Calls announced so far (those dropped without parallel calls included)."""
        return self._announced

    def finish(self, cut: bool = False) -> list[Piece]:
        """The pieces left at the end of the answer; ``cut``: ``max_tokens`` ended it."""
        reading = self._layout is not None  # the layout still waited for text when it ended
        self._reader.ended = True
        self._reader.cut = cut
        self._run()
        pieces = self._take()
        text = self._reader.text
        if self._whole_from is not None:
            pieces.extend(self._whole(text[self._whole_from :], cut))
        elif self._rest_from is not None and not (cut and reading):
            pieces.extend(self._after_calls(text[self._rest_from :], cut))
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
        except NotStreamable:
            if reader.calls > reader.unit_calls:  # its calls went out already: the rest is content
                self._rest_from = reader.pos
            else:
                self._whole_from = reader.unit_start
        except Broken as broken:
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

    def _whole(self, section: str, cut: bool) -> list[Piece]:
        """The family's whole-text parser on what was not streamed; a malformed call is content,
        one cut by ``max_tokens`` is markup cut short (dropped)."""
        reader = self._reader
        try:
            parsed = reader.syntax.parse(section, reader.schemas)
        except (RecursionError, MemoryError, ValueError, TypeError):  # e.g. JSON nested 10k deep
            parsed = None
        if parsed is None and cut:
            return []
        if parsed is None:
            text = section.strip() if reader.calls else section
            return [Piece("content", text)] if text else []
        reader.pieces = []
        for call in parsed[0]:
            reader.announce(call.name, call.id)
            reader.pieces.append(Piece("arguments", call.arguments))
        return self._take() + self._after_calls(parsed[1], cut)

    def _after_calls(self, text: str, cut: bool) -> list[Piece]:
        """The text after the calls, as content; a cut leaves out a tail that only a marker starts."""
        syntax = self._reader.syntax
        rest = text.strip()
        if cut:
            rest = rest[: len(rest) - held(rest, (*syntax.starts, *syntax.preserved))].rstrip()
        return [Piece("content", rest)] if rest else []
