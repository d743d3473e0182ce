"""Text from outside this program, as commands show it in a terminal.

Model names, provider ids, messages and URLs come from the platform, from the registration state
file (which an older or broken agent may have written), from the ledger and settings, and from
whatever answers at the agent's address. Two things go wrong when such text is printed as it is:

- rich reads a ``str`` as markup: a message with ``[/docs]`` in it stops the command with a
  ``MarkupError``, and ``[bold]`` restyles the output. So outside text is a ``rich.text.Text``
  (``shown``), never a markup string.
- a terminal obeys the control characters in it: ESC ] 0;… BEL retitles the window, ESC [2J
  clears the screen. So every control character (C0, DEL, C1, and the Unicode line separators and
  bidirectional overrides that make a line read as something else) is written as a visible
  escape, ``\\x1b``, ``\\u202e``: the provider sees that a name held one, rather than a name that
  looks like another.

Outside text is also cut to ``MAX_CHARS`` (a 1 MB message must not fill the scrollback). JSON
output (``json_text``) escapes the same characters as ``\\u`` escapes, which keeps every value
exact for a program that parses it.

Values (ids, URLs, numbers, money, flag names) are never dropped or ellipsised, whatever the width:

- ``FitTable`` is every table we print. Rich, short of room, shrinks the
  widest columns without regard to their longest word and ends cells with "…" (a provider id read
  ``prov_e4a9…``, token counts ``1…``); a ``FitTable`` gives each column at least its longest word,
  folds rather than ellipsises, and where even that does not fit (a 40-column terminal) it shows
  one block per row instead (``FitTable.as_list``). It does so through rich's public API only.
- ``make_console``: output that goes to no terminal (``| grep``, a file) is not wrapped at 80
  columns, which rich assumes there: every line is whole for the program that reads it.
  ``COLUMNS``, where set, is still the width asked for.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import sys
from collections.abc import Iterable
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.highlighter import JSONHighlighter
from rich.measure import Measurement
from rich.padding import Padding
from rich.style import StyleType
from rich.table import Column, Table
from rich.text import Text

MAX_CHARS = 500
"""The most characters of one outside value that a table cell or line shows."""
UNWRAPPED_WIDTH = 100_000
"""The width of output that goes to no terminal: wide enough that no line of ours is ever wrapped."""
TERMINAL_FALLBACK_WIDTH = 80
"""rich's width for a terminal that gives none."""
_BIDI_AND_SEPARATORS = "\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI_AND_SEPARATORS}]")
_CONTROL_IN_JSON = re.compile(f"[\x7f-\x9f{_BIDI_AND_SEPARATORS}]")  # json.dumps escapes C0 itself


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def plain(value: object, limit: int = MAX_CHARS) -> str:
    """``value`` as one line a terminal shows as written: control characters escaped, cut to ``limit``."""
    try:
        text = value if isinstance(value, str) else str(value)
    except ValueError:  # an int with more digits than Python converts
        return "(a value too long to show)"
    shown = _CONTROL.sub(_escape, text[:limit])
    return shown if len(text) <= limit else f"{shown}… ({len(text) - limit:,} more characters)"


def shown(value: object, style: StyleType = "", limit: int = MAX_CHARS) -> Text:
    """``plain(value)`` as rich ``Text``: never parsed as markup."""
    return Text(plain(value, limit), style=style)


def json_text(data: Any) -> Text:
    """``data`` as indented, highlighted JSON (what ``Console.print_json`` prints), with the
    characters a terminal would obey written as ``\\u`` escapes, and NaN or infinity (which JSON
    cannot hold) as null. Print it with ``soft_wrap=True``."""
    text = json.dumps(_finite(data), indent=2, ensure_ascii=False)
    highlighted = JSONHighlighter()(Text(_CONTROL_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)))
    highlighted.no_wrap = True
    highlighted.overflow = None
    return highlighted


def _finite(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(value) for value in data]
    return data


def make_console(stderr: bool = False) -> Console:
    """A console for our output (never markup: see the module docstring): the terminal's width, or
    ``COLUMNS``, or, for output that goes to no terminal, lines as long as they are."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(markup=False, stderr=stderr, width=console_width(stream))


def console_width(stream: Any) -> int | None:
    """A rich console's ``width`` for ``stream``: None where rich's own choice is right (a positive
    ``COLUMNS``, or a terminal's width); lines as long as they are for no terminal. rich also takes
    ``COLUMNS=0`` as a width, and then printed nothing at all, error lines included: on a terminal
    that is the terminal's own width, or rich's 80 where it says 0 (as without ``COLUMNS``)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return None
    if not _is_terminal(stream):
        return UNWRAPPED_WIDTH
    if not columns.isdigit():
        return None
    try:
        return os.get_terminal_size(stream.fileno()).columns or TERMINAL_FALLBACK_WIDTH
    except (AttributeError, ValueError, OSError):
        return TERMINAL_FALLBACK_WIDTH


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed, or no file behind it
        return False


class FitTable(Table):
    """A rich ``Table`` that never cuts a value: see the module docstring.

    It chooses its layout before rich lays it out, from the console's width and its cells' measured
    widths (``Measurement.get``): rich's own widths where every cell fits whole on one line; else a
    copy of the table whose columns have fixed widths (``Column.width``), each at least its longest
    word, folding (``overflow="fold"``) rather than cutting; else, where even the longest words do not
    fit side by side, one block per row (``as_list``). It overrides and calls none of rich's private
    methods (they change between releases without notice), only the render protocol."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width if self.width is None else min(self.width, options.max_width)
        ranges = [self._content_range(console, options.update_width(width), column) for column in self.columns]
        room = width - self._rules_width() - sum(self._padding_width(index) for index in range(len(self.columns)))
        least, most = [measure.minimum for measure in ranges], [measure.maximum for measure in ranges]
        if sum(least) > room:
            yield self.as_list()
        else:
            yield from Table.__rich_console__(self._folding(None if sum(most) <= room else share(room, least, most)), console, options)

    def _content_range(self, console: Console, options: ConsoleOptions, column: Column) -> Measurement:
        """A column's content widths (no padding): its longest word to its longest line, as its
        options (``width``, ``min_width``, ``max_width``) bound them."""
        if column.width is not None:
            return Measurement(column.width, column.width)
        cells = [*([column.header] if self.show_header else []), *column.cells, *([column.footer] if self.show_footer else [])]
        measures = [Measurement.get(console, options, cell) for cell in cells]
        measure = Measurement(max((m.minimum for m in measures), default=1), max((m.maximum for m in measures), default=1))
        return measure.clamp(column.min_width, column.max_width)

    def _padding_width(self, index: int) -> int:
        """The columns' padding at left and right, as the table's public options set it."""
        _, right, _, left = self.padding
        if self.collapse_padding and index > 0:
            left = max(0, left - right)
        if not self.pad_edge:
            left = 0 if index == 0 else left
            right = 0 if index == len(self.columns) - 1 else right
        return left + right

    def _rules_width(self) -> int:
        """The columns taken by the vertical rules: between columns, and at both edges if shown."""
        if not self.box or not self.columns:
            return 0
        return len(self.columns) - 1 + (2 if self.show_edge else 0)

    def _folding(self, widths: list[int] | None) -> Table:
        """A copy of this table whose columns fold rather than cut, each ``widths`` wide if given."""
        table = copy.copy(self)
        table.columns = [copy.copy(column) for column in self.columns]
        for index, column in enumerate(table.columns):
            column.overflow = "fold"
            if widths is not None:
                column.width = widths[index]
        return table

    def as_list(self) -> Group:
        """The table for a terminal too narrow for it, one block per row: a table with headers shows
        the row's first cell, then each value beside its column's header; one without (a list of
        names and values) shows every cell but the last on a line, and the last indented under it."""
        headers = [column.header for column in self.columns] if self.show_header else None
        parts: list[RenderableType] = []
        if self.title:
            parts.append(_styled(self.title, "italic"))
        for cells in zip(*(list(column.cells) for column in self.columns)):
            parts.append(_block(cells, headers))
        if self.show_footer:
            parts.append(_block([column.footer for column in self.columns], headers))
        if self.caption:
            parts.append(_styled(self.caption, "dim"))
        return Group(*parts)


def share(room: int, least: list[int], most: list[int]) -> list[int]:
    """Widths that add up to at most ``room``: each at least its ``least``, the spare room shared in
    proportion to how much more each column would take (up to its ``most``)."""
    wants = [max(0, high - low) for low, high in zip(least, most)]
    spare = room - sum(least)
    if sum(wants) <= spare:
        return [low + want for low, want in zip(least, wants)]
    widths = [low + spare * want // sum(wants) for low, want in zip(least, wants)]
    for index in sorted(range(len(widths)), key=lambda i: -wants[i])[: room - sum(widths)]:
        widths[index] += 1
    return widths


def _block(cells: Iterable[RenderableType | None], headers: list[RenderableType] | None) -> RenderableType:
    cells = list(cells)
    if headers is None:  # a list of names and values (status): all but the last on one line
        *lead, last = [cell for cell in cells if not _empty(cell)] or [Text("")]
        if not all(isinstance(cell, (str, Text)) for cell in lead):
            return Group(*(_styled(cell, "bold") for cell in lead), Padding(_folding(last), (0, 0, 0, 2), expand=False))
        if not lead:
            return _styled(last, "bold")
        return Group(Text("  ").join(_styled(cell, "bold") for cell in lead), Padding(_folding(last), (0, 0, 0, 2), expand=False))
    grid = Table.grid(padding=(0, 0, 0, 2))
    grid.add_column(overflow="fold")
    grid.add_column(overflow="fold")
    for header, cell in zip(headers[1:], cells[1:]):
        if not _empty(cell):
            grid.add_row(header, cell)
    return Group(_styled(cells[0] if not _empty(cells[0]) else "", "bold"), grid)


def _empty(cell: RenderableType | None) -> bool:
    return cell is None or (isinstance(cell, (str, Text)) and not str(cell).strip())


def _styled(renderable: RenderableType | None, style: str) -> RenderableType:
    if isinstance(renderable, str):
        return Text(renderable, style=style, overflow="fold")
    if isinstance(renderable, Text):
        text = renderable.copy()
        text.stylize(style)
        text.overflow = "fold"
        return text
    return renderable if renderable is not None else Text("")


def _folding(cell: RenderableType) -> RenderableType:
    if isinstance(cell, str):
        return Text(cell, overflow="fold")
    if isinstance(cell, Text):
        text = cell.copy()
        text.overflow = "fold"
        return text
    return cell
