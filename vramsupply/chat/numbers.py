"""A JSON schema's numeric bounds as a pattern over digits, so that a grammar can enforce them.

A grammar matches characters and cannot compare numbers, yet ``minimum``/``maximum`` (and their
exclusive forms) must hold for every number a forced tool call or a ``response_format`` writes.
So a range is decomposed into digit patterns, the classic way: 17 ≤ n ≤ 243 is
``1[7-9] | [2-9][0-9] | 1[0-9][0-9] | 2[0-3][0-9] | 24[0-3]``. Negative numbers are a ``-`` and a
range of magnitudes; a ``number`` is an integer part and a fraction, where the fraction is only
constrained when the integer part sits on a bound (0 ≤ x ≤ 1 allows ``1`` and ``1.0`` but not
``1.5``). Numbers are written without an exponent, ``-0`` is never written, and an open end has at
most ``MAX_DIGITS`` integer digits (and a fraction at most ``MAX_DIGITS`` free digits), like the
unbounded JSON number rule.

The patterns are a small tree (``Node``) that renders as GBNF for llama.cpp and as a Python regular
expression, so tests can check exactly which texts a bound admits.

A ``number`` is read back as a double, and a decimal text that differs from a bound can still
round to the bound's own double: ``0.50000000000000005`` is read as ``0.5``, which breaks
``exclusiveMinimum: 0.5``. Limiting the digits written would not do (a bound may itself need 17
significant digits), so ``double_bound`` moves such a bound to the next double past it, which is
inclusive: every text at or beyond that double's shortest decimal is read as a double at or beyond
it, since rounding keeps order. The few texts given up (those that round to the next double but
lie below its shortest decimal) are valid ones the grammar no longer writes; none it writes is
invalid. An exclusive bound of zero stays as it is: no text with the digits written here rounds to
zero. Integers are read exactly, so ``integer`` bounds need none of this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Union

MAX_DIGITS = 16


@dataclass(frozen=True)
class Lit:
    text: str


@dataclass(frozen=True)
class Digit:
    """A digit in ``lo..hi``, repeated ``least`` to ``most`` times."""

    lo: int = 0
    hi: int = 9
    least: int = 1
    most: int = 1


@dataclass(frozen=True)
class Seq:
    parts: tuple[Node, ...]


@dataclass(frozen=True)
class Alt:
    options: tuple[Node, ...]
    optional: bool = False


Node = Union[Lit, Digit, Seq, Alt]
EMPTY = Seq(())


def seq(*parts: Node | None) -> Node | None:
    """The concatenation; ``None`` (no text at all) swallows the whole sequence."""
    if any(p is None for p in parts):
        return None
    flat: list[Node] = []
    for part in parts:
        flat.extend(part.parts if isinstance(part, Seq) else (part,))  # type: ignore[union-attr]
    return flat[0] if len(flat) == 1 else Seq(tuple(flat))


def alt(*options: Node | None, optional: bool = False) -> Node | None:
    kept = tuple(o for o in options if o is not None and o != EMPTY)
    optional = optional or EMPTY in options
    if not kept:
        return EMPTY if optional else None
    return kept[0] if len(kept) == 1 and not optional else Alt(kept, optional)


# ---- rendering ------------------------------------------------------------------------------------


def _repeat(least: int, most: int) -> str:
    if (least, most) == (1, 1):
        return ""
    return f"{{{least}}}" if least == most else f"{{{least},{most}}}"


def to_gbnf(node: Node) -> str:
    if isinstance(node, Lit):
        return f'"{node.text}"'
    if isinstance(node, Digit):
        digits = f"[{node.lo}]" if node.lo == node.hi else f"[{node.lo}-{node.hi}]"
        return digits + _repeat(node.least, node.most)
    if isinstance(node, Seq):
        return " ".join(f"({to_gbnf(p)})" if isinstance(p, Alt) and not p.optional else to_gbnf(p) for p in node.parts) or '""'
    body = " | ".join(to_gbnf(o) for o in node.options)
    return f"({body})?" if node.optional else body


def to_regex(node: Node) -> str:
    if isinstance(node, Lit):
        return node.text.replace(".", r"\.")
    if isinstance(node, Digit):
        return f"[{node.lo}-{node.hi}]" + _repeat(node.least, node.most)
    if isinstance(node, Seq):
        return "".join(to_regex(p) for p in node.parts)
    return "(?:" + "|".join(to_regex(o) for o in node.options) + (")?" if node.optional else ")")


# ---- integers -------------------------------------------------------------------------------------


def _same_length(lo: str, hi: str) -> Node | None:
    """Digit strings of one length from ``lo`` to ``hi``."""
    if lo == hi:
        return Lit(lo)
    if len(lo) == 1:
        return Digit(int(lo), int(hi))
    if lo[0] == hi[0]:
        return seq(Lit(lo[0]), _same_length(lo[1:], hi[1:]))
    rest = len(lo) - 1
    first, last = int(lo[0]), int(hi[0])
    options = []
    if lo[1:] != "0" * rest:
        options.append(seq(Lit(lo[0]), _same_length(lo[1:], "9" * rest)))
        first += 1
    if hi[1:] != "9" * rest:
        options.append(seq(Lit(hi[0]), _same_length("0" * rest, hi[1:])))
        last -= 1
    if first <= last:
        options.insert(1 if lo[1:] != "0" * rest else 0, Seq((Digit(first, last), Digit(0, 9, rest, rest))))
    return alt(*options)


def naturals(lo: int, hi: int | None) -> Node | None:
    """Non-negative integers from ``lo`` to ``hi`` (``None``: no upper bound), written canonically."""
    if hi is not None and lo > hi:
        return None
    longest = len(str(hi)) if hi is not None else max(MAX_DIGITS, len(str(lo)))
    options: list[Node | None] = []
    for length in range(len(str(lo)), longest + 1):
        smallest = 10 ** (length - 1) if length > 1 else 0
        start = max(lo, smallest)
        if hi is None and start == smallest and length > 1:  # every longer number as well
            options.append(Seq((Digit(1, 9), Digit(0, 9, length - 1, longest - 1))))
            break
        end = hi if hi is not None and length == longest else 10**length - 1
        options.append(_same_length(str(start), str(end)))
    return alt(*options)


def integers(low: int | None, high: int | None) -> Node | None:
    """Integers ``low ≤ n ≤ high``; ``None`` leaves a side open. ``None`` back: no integer fits."""
    negative = None
    if low is None or low < 0:
        magnitudes = naturals(1 if high is None or high >= 0 else -high, None if low is None else -low)
        negative = seq(Lit("-"), magnitudes)
    positive = naturals(max(low or 0, 0), high) if high is None or high >= 0 else None
    return alt(positive, negative)


# ---- decimals -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    value: Decimal
    inclusive: bool = True


def double_bound(value: int | float, inclusive: bool, lower: bool) -> Bound:
    """The bound on decimal texts that keeps ``value`` (a JSON number, compared as a validator
    compares: an int exactly, a float as its double) once each text is read as a double."""
    double = float(value)
    exact, target = Decimal(double), Decimal(value) if isinstance(value, int) else Decimal(double)
    beyond = exact > target if lower else exact < target
    if beyond or (exact == target and inclusive) or target == 0:
        return Bound(Decimal(str(value)), inclusive)
    return Bound(Decimal(repr(math.nextafter(double, math.inf if lower else -math.inf))), True)


@dataclass(frozen=True)
class _Digits:
    """A bound on a fraction's digits, compared as if padded with zeros (trailing zeros stripped)."""

    digits: str
    inclusive: bool

    def rest(self) -> _Digits:
        return _Digits(self.digits[1:], self.inclusive)


_FREE_TAIL = Digit(0, 9, 0, MAX_DIGITS - 1)


def _fraction_digits(low: _Digits | None, high: _Digits | None) -> Node | None:
    """Non-empty digit strings ``d`` with ``low ≤ 0.d ≤ high`` (each side inclusive or not)."""
    if low is not None and low.digits == "" and low.inclusive:
        low = None  # ≥ 0 always holds
    if high is not None and high.digits == "":
        return Digit(0, 0, 1, MAX_DIGITS) if high.inclusive and low is None else None
    if low is None and high is None:
        return Digit(0, 9, 1, MAX_DIGITS)
    if low is not None and low.digits == "" and high is None:  # > 0: some digit is not zero
        return Seq((Digit(0, 0, 0, MAX_DIGITS - 1), Digit(1, 9), _FREE_TAIL))
    lo = int(low.digits[0]) if low is not None and low.digits else 0
    hi = int(high.digits[0]) if high is not None else 9
    if lo > hi:
        return None
    if low is not None and high is not None and lo == hi:
        return seq(Lit(str(lo)), _fraction_tail(low.rest(), high.rest()))
    options = []
    if low is not None:
        options.append(seq(Lit(str(lo)), _fraction_tail(low.rest(), None)))
    free_lo, free_hi = lo + (low is not None), hi - (high is not None)
    if free_lo <= free_hi:
        options.append(Seq((Digit(free_lo, free_hi), _FREE_TAIL)))
    if high is not None:
        options.append(seq(Lit(str(hi)), _fraction_tail(None, high.rest())))
    return alt(*options)


def _fraction_tail(low: _Digits | None, high: _Digits | None) -> Node | None:
    """Digit strings, empty included, in the bounds: the empty string counts as zero."""
    zero_fits = (low is None or (low.digits == "" and low.inclusive)) and (high is None or high.digits != "" or high.inclusive)
    return alt(_fraction_digits(low, high), optional=zero_fits)


def _fraction(low: _Digits | None, high: _Digits | None) -> Node | None:
    """``.digits`` in the bounds, or nothing at all when zero fits them."""
    digits = _fraction_digits(low, high)
    zero_fits = (low is None or (low.digits == "" and low.inclusive)) and (high is None or high.digits != "" or high.inclusive)
    return alt(seq(Lit("."), digits), optional=zero_fits)


def _split(bound: Bound) -> tuple[int, _Digits]:
    whole = math.floor(bound.value)
    fraction = f"{bound.value - whole:f}".partition(".")[2].rstrip("0")
    return whole, _Digits(fraction, bound.inclusive)


def magnitudes(low: Bound, high: Bound | None) -> Node | None:
    """Non-negative decimals from ``low`` to ``high``: an integer part, then maybe a fraction."""
    low_whole, low_fraction = _split(low)
    if high is None:
        between = naturals(low_whole + 1, None)
        return alt(seq(Lit(str(low_whole)), _fraction(low_fraction, None)), seq(between, _fraction(None, None)))
    high_whole, high_fraction = _split(high)
    if low_whole == high_whole:
        return seq(Lit(str(low_whole)), _fraction(low_fraction, high_fraction))
    if low_whole > high_whole:
        return None
    return alt(
        seq(Lit(str(low_whole)), _fraction(low_fraction, None)),
        seq(naturals(low_whole + 1, high_whole - 1), _fraction(None, None)),
        seq(Lit(str(high_whole)), _fraction(None, high_fraction)),
    )


def decimals(low: Bound | None, high: Bound | None) -> Node | None:
    """Numbers ``low ≤ x ≤ high`` (each side inclusive or not, or open). ``None``: none fits."""
    positive = negative = None
    if high is None or high.value > 0 or (high.value == 0 and high.inclusive):
        positive = magnitudes(low if low is not None and low.value >= 0 else Bound(Decimal(0)), high)
    if low is None or low.value < 0:
        # x < 0 is "-" and a magnitude y = -x > 0; x ≥ low is y ≤ -low, and x ≤ high is y ≥ -high.
        smallest = Bound(-high.value, high.inclusive) if high is not None and high.value < 0 else Bound(Decimal(0), False)
        negative = seq(Lit("-"), magnitudes(smallest, None if low is None else Bound(-low.value, low.inclusive)))
    return alt(positive, negative)
