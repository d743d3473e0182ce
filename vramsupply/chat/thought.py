"""GBNF for the rest of a thought the generation prompt opened: any text, up to and including the
first end marker (``</think>``), then at most a few spaces or line breaks.

llama-cpp-python's ``not_literal`` gives a unit (``[^<] | "<" ([^/] | …)?``) whose repetition also
matches the marker itself ("<" alone is a unit, then "/think>" are more): a grammar built on it
never has to leave the thought, so a model could go on "thinking" past ``</think>`` while the
output parser had already ended the thought. Here the thought is the marker's search automaton
(Knuth-Morris-Pratt): one rule per marker prefix matched so far, so the grammar's thought ends
exactly where the parser's does. Each rule refers to the next in tail position, where llama.cpp's
grammar stacks do not grow.
"""

from __future__ import annotations

import json

from .pattern import class_char


def thought_rules(end: str, name: str) -> dict[str, str]:
    """Rules whose entry, ``name``, matches text up to and including the first ``end``, then up to
    four spaces or line breaks. Other rules are named ``name-1``, ``name-2``... (one per prefix)."""
    if not end:
        raise ValueError("a thought's end marker cannot be empty")
    states = [name] + [f"{name}-{k}" for k in range(1, len(end))]
    rules = {}
    for k, state in enumerate(states):
        alternatives = []
        for char in sorted(set(end)):
            if k == len(end) - 1 and char == end[k]:
                alternatives.append(f"{_literal(char)} [ \\n]{{0,4}}")
            else:
                alternatives.append(f"{_literal(char)} {states[_next(end, k, char)]}")
        alternatives.append(f"[^{''.join(class_char(ord(c)) for c in sorted(set(end)))}] {states[0]}")
        rules[state] = " | ".join(alternatives)
    return rules


def _next(end: str, matched: int, char: str) -> int:
    """How much of ``end`` is matched after ``char`` follows its first ``matched`` characters."""
    text = end[:matched] + char
    for length in range(min(len(text), len(end) - 1), 0, -1):
        if text.endswith(end[:length]):
            return length
    return 0


def _literal(char: str) -> str:
    return json.dumps(char, ensure_ascii=False)
