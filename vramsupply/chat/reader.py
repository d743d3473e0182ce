"""What every reader of generated text shares, whole or streamed: a buffer of the text not read yet,
how much was pushed, where the thought lies, and the loop that reads until nothing moves.

``OutputParser`` (one thought, then content or a call section) and ``HarmonyParser`` (gpt-oss's
messages on channels) differ only in their states; each ``_step`` reads what its state can, and
``push`` steps until neither the state nor the buffer changes. Every piece is stamped with how far
the reader had read when it gave it (``Piece.upto``): the logprobs of a streamed delta are those of
the tokens that brought its text.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod

from .types import Piece


class TextReader(ABC):
    def __init__(self, state: str) -> None:
        self._state = state
        self._buffer = ""  # always the unread end of the text pushed so far
        self._pushed = 0
        self._reasoning_span: tuple[int, int | None] | None = None
        """Where the thought lies in the text, in characters (markers included): its tokens are the
        reasoning tokens of the usage; its end None while it goes on."""
        self._forced = False  # the whole answer is a call (tool_choice required or named)
        self._forced_name: str | None = None

    def expect_call(self, name: str | None) -> None:
        """The answer is a forced call; of ``name`` when only one function may be called."""
        self._forced, self._forced_name = True, name

    @property
    def reasoning_span(self) -> tuple[int, int] | None:
        """Start and end, in characters of the text pushed, of the thought (to the end of the
        text while it has not ended); None without one."""
        if self._reasoning_span is None:
            return None
        start, end = self._reasoning_span
        return start, self._pushed if end is None else end

    def push(self, text: str) -> list[Piece]:
        self._buffer += text
        self._pushed += len(text)
        pieces: list[Piece] = []
        while True:
            before = (self._state, len(self._buffer))
            given = len(pieces)
            self._step(pieces)
            self._stamp(pieces, given)
            if (self._state, len(self._buffer)) == before:
                return pieces

    @abstractmethod
    def _step(self, pieces: list[Piece]) -> None:
        """Read what the current state can of the buffer, giving pieces; may change the state."""

    def _stamp(self, pieces: list[Piece], given: int) -> None:
        """Pieces ``given`` onwards, with how far the reader has read (``Piece.upto``)."""
        read = self._pushed - len(self._buffer)
        pieces[given:] = [dataclasses.replace(piece, upto=read) for piece in pieces[given:]]
