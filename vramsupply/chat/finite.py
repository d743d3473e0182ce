"""Which rules of a GBNF grammar can ever finish: a schema whose recursion is required has no value.

``{"properties": {"child": {"$ref": "#"}}, "required": ["child"]}`` is a fine grammar to llama.cpp
(the recursion is not left recursion), but every value of it holds another one: no JSON text of it
is finite, and a constrained answer runs to the token limit without ever being valid JSON. The
same holds of ``$defs`` that must refer to each other, and of an array of the schema itself with
``minItems`` of 1 or more. Whether a rule can finish is the classic fixed point over the rules the
converter built (a rule is *productive* when one of its alternatives needs only literals,
classes, productive rules and repetitions that may be empty), so it sees exactly what the grammar
allows: an optional property, an ``anyOf`` branch without the recursion or ``minItems: 0`` keep a
schema finite, as they keep its grammar productive.
"""

from __future__ import annotations

from collections.abc import Mapping

from .gbnf_text import GBNF_TOKEN

Item = tuple[object, int]  # a rule's name (or True: a literal or class), and how many times at least
Rule = list[list[Item]]  # alternatives of sequences; a bracketed group is a rule of its own here


def unproductive(rules: Mapping[str, str]) -> set[str]:
    """The names of ``rules`` (GBNF bodies by name) that no finite text can ever complete."""
    parsed: dict[object, Rule] = {}
    for name, body in rules.items():
        _parse(name, body, parsed)
    users: dict[object, set[object]] = {}
    for name, alternatives in parsed.items():
        for sequence in alternatives:
            for used, _ in sequence:
                users.setdefault(used, set()).add(name)
    productive: set[object] = set()
    pending = list(parsed)
    while pending:
        name = pending.pop()
        if name not in productive and _finishes(parsed[name], productive):
            productive.add(name)
            pending.extend(users.get(name, ()))
    return set(rules) - productive


def _finishes(alternatives: Rule, productive: set[object]) -> bool:
    return any(all(least == 0 or used is True or used in productive for used, least in sequence) for sequence in alternatives)


def _parse(name: str, body: str, parsed: dict[object, Rule]) -> None:
    """A rule's body as alternatives of sequences, each bracketed group a rule named by a tuple
    (no recursion: ``maxItems`` nests a group per item); ``gbnf_text.check_gbnf`` has checked it."""
    stack: list[tuple[object, Rule]] = [(name, [[]])]
    for match in GBNF_TOKEN.finditer(body):
        kind, text = match.lastgroup, match.group()
        if kind == "space":
            continue
        if kind == "open":
            stack.append(((name, match.start()), [[]]))
        elif kind == "close":
            group, alternatives = stack.pop()
            parsed[group] = alternatives
            stack[-1][1][-1].append((group, 1))
        elif kind == "op" and text == "|":
            stack[-1][1].append([])
        elif kind == "op":
            used, _ = stack[-1][1][-1].pop()
            stack[-1][1][-1].append((used, _least(text)))
        else:
            stack[-1][1][-1].append((text if kind == "name" else True, 1))
    parsed[name] = stack[0][1]


def _least(op: str) -> int:
    """How many times ``*``, ``+``, ``?`` or ``{n}``, ``{n,}``, ``{n,m}`` repeat at least."""
    if op in "*?":
        return 0
    if op == "+":
        return 1
    return int(op[1:-1].split(",")[0])
