"""Grammars for gpt-oss's harmony format: where a forced call or a JSON answer goes in its channels.

A harmony model thinks on the ``analysis`` channel before it answers, so a grammar that held its
first token to a call or to JSON would take its thought away, or make the thought the answer.
Here every such grammar lets the model write one thought first (``PRELUDE``: ``analysis``,
up to ``<|end|>``, then ``<|start|>assistant``) or skip it, and then:

- a forced call: ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>ARGS``,
  the header gpt-oss's own template writes; the arguments are held to the tool's schema;
- a JSON ``response_format`` (or any answer constraint): ``<|channel|>final<|message|>`` and the
  JSON, which so lands in ``content`` as OpenAI's structured output does; with tools ``auto`` as
  well, either that answer or a call.

The grammar ends before ``<|call|>`` and ``<|return|>``: both end the generation in this
llama.cpp build, and a finished grammar allows only that. One call per answer: the generation
ends at its ``<|call|>``. ``tool_choice`` ``auto`` without an answer constraint gets a lazy
grammar that wakes at a call's header (``trigger``), so a call the model starts is valid.
"""

from __future__ import annotations

import re

from .gbnf_text import gbnf_literal, grammar_rules, grammar_text, renamed, unused_name
from .thought import thought_rules

CALL_HEAD = "<|channel|>commentary to=functions."
FINAL_HEAD = "<|channel|>final<|message|>"


def call_rule(name: str, args: str) -> str:
    """One function's call message, from its header on, ``args`` the arguments' rule."""
    return f"{gbnf_literal(CALL_HEAD + name + ' <|constrain|>json<|message|>')} {args}"


def with_prelude(rules: dict[str, str], answer: str) -> dict[str, str]:
    """``rules`` with a ``root`` that allows one thought before ``answer`` (a rule's body)."""
    thought = unused_name(rules, "harmony-thought")
    prelude = unused_name({**rules, thought: ""}, "harmony-prelude")
    rules.update(thought_rules("<|end|>", thought))
    rules[prelude] = f"( {gbnf_literal('<|channel|>analysis<|message|>')} {thought} {gbnf_literal('<|start|>assistant')} )?"
    rules["root"] = f"{prelude} ( {answer} )"
    return rules


def in_final(grammar: str, calls: str | None = None) -> str:
    """An answer grammar (GBNF with a ``root``) as harmony's final message after an optional
    thought; with ``calls`` (a harmony call grammar, ``root`` a call message) that or a call."""
    rules = grammar_rules(grammar)
    answer = unused_name(rules, "harmony-answer")
    rules[answer] = f"{gbnf_literal(FINAL_HEAD)} {rules.pop('root')}"
    body = answer
    if calls is not None:
        theirs = grammar_rules(calls)
        prefix = unused_name(rules, "harmony-call")
        names = {name: f"{prefix}-{name}" for name in theirs}
        for name, rule in theirs.items():
            rules[names[name]] = renamed(rule, names)
        body = f"{answer} | {names['root']}"
    return grammar_text(with_prelude(rules, body))


def trigger() -> tuple[str, ...]:
    """Where a lazy call grammar takes over: a call's header, opening the answer or a message
    after ``<|start|>assistant`` (so not inside a thought's text)."""
    head = re.escape("<|channel|>commentary to=")
    return (f"(?:[\\s\\S]*?<\\|start\\|>assistant)?({head})[\\s\\S]*",)
