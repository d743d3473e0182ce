"""Turning a stream of token pieces (bytes) into safe text deltas.

Two problems make this more than ``piece.decode()``: a multi-byte UTF-8 character can be split over
several byte-fallback tokens, and a stop string can span token boundaries. ``TextStream`` solves
both by buffering only what is still undecided: incomplete UTF-8 sequences, and a tail of text
that could still grow into a stop string. Nothing here touches llama.cpp, so it is tested directly.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Thought:
    """A thought a grammar lets come before the answer it holds: text no grammar holds, where the
    stop strings apply as in any such text (``stop_strings_for``), up to the marker that ends it.

    ``end``: that marker (``</think>``, harmony's ``<|end|>``). ``opening``: the text that opens the
    thought where the model may write one or none (harmony's ``<|channel|>analysis<|message|>``);
    empty where the prompt opened it, so that the output is in the thought from its first character.
    """

    end: str
    opening: str = ""

    def holds(self, before: str, stop: str) -> bool:
        """Whether the grammar holds the output where ``stop`` begins, after ``before``: past the
        thought's end, or where the output opens no thought. A stop string that begins while the
        output may still be opening one (inside harmony's first header) stops, as without a grammar."""
        through = before + stop
        if not (through.startswith(self.opening) or self.opening.startswith(through)):
            return True  # the answer came at once (harmony's final or commentary header)
        return self.end in before[len(self.opening) :]


class StopStrings:
    """Stop strings with their KMP failure tables, compiled once per request.

    Matching then costs each stop string a few steps per new character, however long it is and
    however much text is held back; re-searching the held tail after every token would cost its
    length (up to the longest stop string) per token, and finding the longest partial match by
    trying every prefix length costs its square. The tables are built when the request is
    submitted, off the scheduler thread.

    ``held``: given all the text before a stop string and that stop string, whether a grammar
    holds the output there (a lazy tool-call grammar once triggered, an answer after its
    ``Thought``): the stop string is then no stop, since cutting would leave a call the answer
    reports whole as broken JSON. A stop string is never looked for again once a grammar holds:
    it holds to the end.

    ``kept``: the stop strings whose text stays at the end of the output (vLLM's
    ``include_stop_str_in_output``: the buyer's own, never the chat template's).
    """

    def __init__(self, stops: Sequence[str], held: Callable[[str, str], bool] | None = None, kept: frozenset[str] = frozenset()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.tables = tuple(_failure_table(s) for s in self.stops)
        self.held = held
        self.kept = tuple(s in kept for s in self.stops)

    def __bool__(self) -> bool:
        return bool(self.stops)


def stop_strings_for(
    stops: Sequence[str], grammar: str | None, triggers: Sequence[str], kept: frozenset[str] = frozenset(), thought: Thought | None = None
) -> StopStrings:
    """A request's stop strings, knowing its grammar: a grammar without triggers (a forced tool call,
    a JSON ``response_format``) holds the whole answer, so none apply; a lazy one (``triggers``,
    regular expressions over the whole output) holds it once one matches the text before a stop
    string. A stop string inside such output cut JSON the answer then reported as a whole call.
    ``kept``: those whose text stays in the output (``StopStrings``).

    ``thought``: the grammar lets a thought come first (``Thought``); the stop strings apply there
    as they do in a thought no grammar holds, and the answer is held from the thought's end on, or
    from its first character where it opens no thought. Before, none applied in such a thought,
    which a stop string without the grammar ended."""
    if grammar is None:
        return StopStrings(stops, kept=kept)
    if not triggers and thought is not None:
        return StopStrings(stops, held=thought.holds, kept=kept)
    if not triggers:
        return StopStrings(())
    patterns = tuple(re.compile(trigger) for trigger in triggers)
    return StopStrings(stops, held=lambda text, _stop: any(pattern.fullmatch(text) for pattern in patterns), kept=kept)


def _failure_table(pattern: str) -> list[int]:
    """``table[i]``: the length of the longest proper prefix of ``pattern[:i + 1]`` that is also its suffix."""
    table = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = table[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        table[i] = k
    return table


class StopMatcher:
    """Finds the earliest stop string in streamed text, holding back partial matches.

    One KMP automaton per stop string: its state is the length of the longest suffix of the text
    so far that is a prefix of that stop string, which is exactly what must be held back.
    """

    def __init__(self, stops: StopStrings | Sequence[str]) -> None:
        self._set = stops if isinstance(stops, StopStrings) else StopStrings(stops)
        self._states = [0] * len(self._set.stops)
        self._held = ""
        self._said: list[str] | None = [] if self._set.held is not None else None  # for ``held``
        self._gripped = False  # a grammar holds the output: no stop string applies any more
        self._hit = 0  # which stop string the last hit of ``_advance`` completed

    def push(self, text: str, heed: bool = True) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit).

        On a hit the returned text ends right before the stop string (right after it, for a kept
        one) and the stream is over. Without ``heed`` (vLLM's ``min_tokens`` not reached yet) a
        completed stop string does not stop; one completed later still does, wherever it began.
        """
        if not self._set or self._gripped:
            return self._held_back_none(text), False
        window = self._held + text
        offset = len(self._held)
        for position, char in enumerate(text, start=offset + 1):
            start = self._advance(char, position)
            if start is not None and heed and not self._grammar_holds(window[:start], self._set.stops[self._hit]):
                self._held = ""
                return window[: position if self._set.kept[self._hit] else start], True
            if self._gripped:
                return self._held_back_none(text), False
        keep = max(self._states)
        self._held = window[len(window) - keep :]
        return self._said_now(window[: len(window) - keep]), False

    def _grammar_holds(self, before: str, stop: str) -> bool:
        if self._said is None:
            return False
        self._gripped = self._set.held("".join(self._said) + before, stop)  # type: ignore[misc]
        return self._gripped

    def _held_back_none(self, text: str) -> str:
        """Everything held and ``text``: nothing is held back once no stop string can apply."""
        window, self._held = self._held + text, ""
        return window

    def _said_now(self, text: str) -> str:
        if self._said is not None:
            self._said.append(text)
        return text

    def _advance(self, char: str, end: int) -> int | None:
        """Feed one character (the window's ``end``-th); where the earliest completed stop starts."""
        hit = None
        states = self._states
        for n, (stop, table) in enumerate(zip(self._set.stops, self._set.tables)):
            k = states[n]
            while k and stop[k] != char:
                k = table[k - 1]
            if stop[k] == char:
                k += 1
            if k == len(stop):
                start = end - k
                if hit is None or start < hit:
                    hit, self._hit = start, n
                k = table[k - 1]
            states[n] = k
        return hit

    def flush(self) -> str:
        """The held tail, once the stream ended without completing a stop string."""
        held, self._held = self._held, ""
        return held


@dataclass
class Delta:
    text: str
    stopped: bool


class TextStream:
    """Incremental UTF-8 decoding followed by stop-string matching, for one generation."""

    def __init__(self, stops: StopStrings | Sequence[str]) -> None:
        # "replace" only matters for bytes that can never form valid UTF-8; incomplete
        # sequences stay buffered inside the decoder until the next piece completes them.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(stops)

    def push(self, piece: bytes, heed: bool = True) -> Delta:
        text, stopped = self._stops.push(self._decoder.decode(piece), heed)
        return Delta(text, stopped)

    def finish(self) -> str:
        """Everything still buffered, for a generation that ended without a stop string."""
        text, stopped = self._stops.push(self._decoder.decode(b"", final=True))
        return text if stopped else text + self._stops.flush()
