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
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from rich.highlighter import JSONHighlighter
from rich.style import StyleType
from rich.text import Text

MAX_CHARS = 500
"""The most characters of one outside value that a table cell or line shows."""
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
