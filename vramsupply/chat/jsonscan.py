"""Is this text, so far, the beginning of a JSON value? Answered one character at a time.

Streaming a tool call's arguments as the model writes them needs to know, at each character, that
the text can still become valid JSON (else the call is broken, and the rest is not arguments) and
where the arguments' object ends (the call's own wrapper follows). ``json`` only judges complete
texts, so this is a small validating scanner: a stack of open containers and what each expects
next, strict RFC 8259 syntax (no raw control characters in strings, no leading zeros).
"""

from __future__ import annotations

_WHITESPACE = " \t\n\r"
_ESCAPES = '"\\/bfnrtu'
_HEX = "0123456789abcdefABCDEF"
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
# A number's states, and the characters that may follow in each; "end" states may also end it.
_NUMBER = {
    "sign": {"0": "zero", **dict.fromkeys("123456789", "int")},
    "zero": {".": "dot", "e": "exp", "E": "exp"},
    "int": {**dict.fromkeys("0123456789", "int"), ".": "dot", "e": "exp", "E": "exp"},
    "dot": dict.fromkeys("0123456789", "frac"),
    "frac": {**dict.fromkeys("0123456789", "frac"), "e": "exp", "E": "exp"},
    "exp": {"+": "exp_sign", "-": "exp_sign", **dict.fromkeys("0123456789", "exp_digits")},
    "exp_sign": dict.fromkeys("0123456789", "exp_digits"),
    "exp_digits": dict.fromkeys("0123456789", "exp_digits"),
}
_NUMBER_ENDS = {"zero", "int", "frac", "exp_digits"}


class JsonScanner:
    """Feed characters; ``feed`` refuses (returns False, consuming nothing) the first one that
    cannot continue a JSON value. ``done``: one whole value has been read (nothing may follow)."""

    def __init__(self) -> None:
        self._stack: list[str] = []  # "{" or "["
        self._expect = "value"  # value | value_or_end | key | key_or_end | colon | comma_or_end | string | done
        self._string_is_key = False
        self._escape = ""  # "" | "\\" | "u" + hex digits seen
        self._number = ""  # a number's state while one is being read
        self._literal = ""  # what is left of true/false/null

    @property
    def done(self) -> bool:
        return self._expect == "done"

    @property
    def depth(self) -> int:
        return len(self._stack)

    def feed(self, char: str) -> bool:
        if self._literal:
            if char != self._literal[0]:
                return False
            self._literal = self._literal[1:]
            if not self._literal:
                self._value_ended()
            return True
        if self._number:
            following = _NUMBER[self._number].get(char)
            if following is not None:
                self._number = following
                return True
            if self._number not in _NUMBER_ENDS:
                return False
            self._number = ""
            self._value_ended()  # the character after a number belongs to what follows it
        if self._expect == "string":
            return self._in_string(char)
        return self._between(char)

    def _in_string(self, char: str) -> bool:
        if self._escape == "\\":
            if char not in _ESCAPES:
                return False
            self._escape = "u" if char == "u" else ""
        elif self._escape.startswith("u"):
            if char not in _HEX:
                return False
            self._escape = "" if len(self._escape) == 4 else self._escape + char
        elif char == "\\":
            self._escape = "\\"
        elif char == '"':
            self._expect = "colon" if self._string_is_key else "comma_or_end"
            if not self._string_is_key:
                self._value_ended()
        elif ord(char) < 0x20:
            return False
        return True

    def _between(self, char: str) -> bool:
        if char in _WHITESPACE:
            return self._expect != "done" or False
        expect = self._expect
        if expect in ("value", "value_or_end"):
            if expect == "value_or_end" and char == "]":
                return self._close("[")
            return self._value(char)
        if expect in ("key", "key_or_end"):
            if expect == "key_or_end" and char == "}":
                return self._close("{")
            if char != '"':
                return False
            self._expect, self._string_is_key = "string", True
            return True
        if expect == "colon":
            if char != ":":
                return False
            self._expect = "value"
            return True
        if expect == "comma_or_end" and self._stack:
            if char == ",":
                self._expect = "key" if self._stack[-1] == "{" else "value"
                return True
            return self._close("]" if char == "]" else "}" if char == "}" else "")
        return False

    def _value(self, char: str) -> bool:
        if char == "{":
            self._stack.append("{")
            self._expect = "key_or_end"
        elif char == "[":
            self._stack.append("[")
            self._expect = "value_or_end"
        elif char == '"':
            self._expect, self._string_is_key = "string", False
        elif char in _LITERALS:
            self._literal = _LITERALS[char]
        elif char == "-":
            self._number = "sign"
        elif char in "0123456789":
            self._number = "zero" if char == "0" else "int"
        else:
            return False
        return True

    def _close(self, bracket: str) -> bool:
        opener = {"}": "{", "]": "["}.get(bracket, bracket)
        if not self._stack or self._stack[-1] != opener:
            return False
        self._stack.pop()
        self._value_ended()
        return True

    def _value_ended(self) -> None:
        self._expect = "comma_or_end" if self._stack else "done"

    def finishes(self) -> bool:
        """Whether the text read so far is a whole value (a number needs no following character)."""
        if self._number in _NUMBER_ENDS and not self._stack:
            return True
        return self.done
