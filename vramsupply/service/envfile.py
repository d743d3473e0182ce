"""An env file's values as systemd reads them (``EnvironmentFile=``), not as python-dotenv does.

``service install`` keeps the settings already in the env file: it reads them back on a re-install.
Read by python-dotenv's rules, a hand-edited line meant something else than the service had used:
``VRAM_SUPPLY_PARALLEL=6   # tuned`` is "6" to dotenv (an inline comment) and ``6   # tuned`` to
systemd (no inline comments: the service failed on it, and the install said all was well), and
``KEY=a\\b`` is "a\\b" to dotenv and "ab" to systemd. The re-install then wrote dotenv's reading
back, changing what the running service used without a word. This reads each line as systemd's
own parser does (``parse_env_file`` in systemd's ``env-file.c``, v252):

- a line starting with ``#`` or ``;`` is a comment (a backslash at its end continues it);
- ``KEY=VALUE``, blanks around the key and before the value dropped;
- unquoted, a backslash keeps the next character (at a line's end, it joins the next line), and
  trailing blanks are dropped; ``#`` is an ordinary character;
- in single quotes everything is literal; in double quotes a backslash keeps ``"``, ``\\``, a
  backtick or ``$`` alone, joins lines before a newline, and stays before any other character;
  quoted and unquoted parts join (``'a'b`` is ``ab``).
"""

from __future__ import annotations

SHELL_NEED_ESCAPE = '"\\`$'
BLANKS = " \t"


def systemd_env_values(text: str) -> dict[str, str]:
    """Every ``KEY=VALUE`` of ``text`` as systemd's ``EnvironmentFile=`` reads it (later ones win)."""
    values: dict[str, str] = {}
    for key, value in _assignments(text.replace("\r\n", "\n")):
        values[key] = value
    return values


def _assignments(text: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    at, end = 0, len(text)
    while at < end:
        while at < end and text[at] in BLANKS + "\n":
            at += 1
        if at >= end:
            break
        if text[at] in "#;":
            at = _after_comment(text, at)
            continue
        equals, newline = text.find("=", at), text.find("\n", at)
        if equals < 0 or (0 <= newline < equals):  # no "=" on the line: systemd skips it
            at = end if newline < 0 else newline + 1
            continue
        key = text[at:equals].strip(BLANKS)
        value, at = _value(text, equals + 1)
        if key:
            found.append((key, value))
    return found


def _after_comment(text: str, at: int) -> int:
    while at < len(text) and text[at] != "\n":
        at += 2 if text[at] == "\\" else 1
    return at + 1


def _value(text: str, at: int) -> tuple[str, int]:
    """The value starting at ``at``, and where the next line starts."""
    out: list[str] = []
    kept = 0  # the value's length without its trailing unquoted blanks
    while at < len(text) and text[at] in BLANKS:
        at += 1
    while at < len(text) and text[at] != "\n":
        char = text[at]
        if char in "'\"":
            at = _quoted(text, at, out)
            kept = len(out)
            continue
        if char == "\\":
            at += 1
            if at < len(text) and text[at] != "\n":
                out.append(text[at])
                kept = len(out)
            at += 1  # past the kept character, or past the newline the backslash joined
            continue
        out.append(char)
        if char not in BLANKS:
            kept = len(out)
        at += 1
    return "".join(out[:kept]), at + 1


def _quoted(text: str, at: int, out: list[str]) -> int:
    """Append the quoted part starting at ``at`` (its quote character) to ``out``; return past it."""
    quote, at = text[at], at + 1
    while at < len(text) and text[at] != quote:
        char = text[at]
        if quote == '"' and char == "\\" and at + 1 < len(text):
            following = text[at + 1]
            if following in SHELL_NEED_ESCAPE:
                out.append(following)
            elif following != "\n":
                out.extend(("\\", following))
            at += 2
            continue
        out.append(char)
        at += 1
    return at + 1
