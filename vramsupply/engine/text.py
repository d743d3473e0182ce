"""Turning a stream of token pieces (bytes) into safe text deltas.

Two problems make this more than ``piece.decode()``: a multi-byte UTF-8 character can be split over
several byte-fallback tokens, and a stop string can span token boundaries. ``TextStream`` solves
both by buffering only what is still undecided: incomplete UTF-8 sequences, and a tail of text
that could still grow into a stop string. Nothing here touches llama.cpp, so it is tested directly.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass


class StopMatcher:
    """Finds the earliest stop string in streamed text, holding back partial matches."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit).

        On a hit the returned text ends right before the stop string and the stream is over.
        Only the held tail plus the new text is searched: the held tail is always shorter than
        the longest stop string, so no match can start earlier.
        """
        if not self._stops:
            return text, False
        window = self._held + text
        hit = min((i for i in (window.find(s) for s in self._stops) if i >= 0), default=-1)
        if hit >= 0:
            self._held = ""
            return window[:hit], True
        keep = self._partial_match_length(window)
        self._held = window[len(window) - keep :]
        return window[: len(window) - keep], False

    def flush(self) -> str:
        """The held tail, once the stream ended without completing a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_match_length(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


@dataclass
class Delta:
    text: str
    stopped: bool


class TextStream:
    """Incremental UTF-8 decoding followed by stop-string matching, for one generation."""

    def __init__(self, stops: Sequence[str]) -> None:
        # "replace" only matters for bytes that can never form valid UTF-8; incomplete
        # sequences stay buffered inside the decoder until the next piece completes them.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(stops)

    def push(self, piece: bytes) -> Delta:
        text, stopped = self._stops.push(self._decoder.decode(piece))
        return Delta(text, stopped)

    def finish(self) -> str:
        """Everything still buffered, for a generation that ended without a stop string."""
        text, stopped = self._stops.push(self._decoder.decode(b"", final=True))
        return text if stopped else text + self._stops.flush()
