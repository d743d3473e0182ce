"""Grammars for gpt-oss's harmony format: where a forced call or a JSON answer goes in its channels.

A harmony model thinks on the ``analysis`` channel before it answers, so a grammar that held its
first token to a call or to JSON would take its thought away, or make the thought the answer.
Here every such grammar lets the model write one thought first (``PRELUDE``: ``analysis``,
up to ``<|end|>``, then ``<|start|>assistant``) or skip it, and then:

- a forced call: ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>ARGS``;
  a call the model starts (``auto``), with its header in that form or in the one gpt-oss's
  template writes in history (``to=functions.NAME<|channel|>commentary json``), on the analysis
  channel too; the arguments are held to the tool's schema;
- a JSON ``response_format`` (or any answer constraint): ``<|channel|>final<|message|>`` and the
  JSON, which so lands in ``content`` as OpenAI's structured output does; with tools ``auto`` as
  well, either that answer or a call.

The grammar ends before ``<|call|>`` and ``<|return|>``: both end the generation in this
llama.cpp build, and a finished grammar allows only that. One call per answer, whatever
``parallel_tool_calls`` says: the generation ends at its ``<|call|>``, as harmony means it to (the
caller runs the tool; gpt-oss makes its next call on the next turn). ``tool_choice`` ``auto`` without an answer constraint gets a lazy
grammar that wakes at a call's header (``trigger``), so a call the model starts is valid.
"""

from __future__ import annotations

import re

from .gbnf_text import gbnf_literal, grammar_rules, grammar_text, renamed, unused_name
from .thought import thought_rules

FINAL_HEAD = "<|channel|>final<|message|>"
THOUGHT_HEAD = "<|channel|>analysis<|message|>"
THOUGHT_END = "<|end|>"
"""What opens and what ends the one thought every grammar here lets come first (``with_prelude``)."""
CALL_HEADS = ("<|channel|>commentary to=", "<|channel|>analysis to=", " to=functions.")
"""Where a call's header may begin: with its channel (gpt-oss's output), or with its recipient right
after ``<|start|>assistant`` (what its template writes in every history call, which the model copies)."""
_CHANNELS = f"( {gbnf_literal('commentary')} | {gbnf_literal('analysis')} )"
_CONSTRAIN = f"( {gbnf_literal(' <|constrain|>json')} | {gbnf_literal(' json')} )?"


def call_rule(name: str, args: str, any_form: bool = False) -> str:
    """One function's call message, from its header on, ``args`` the arguments' rule: a forced
    call as gpt-oss writes it; with ``any_form`` (a call the model started, ``trigger``) the header
    in either form of ``CALL_HEADS``, on either channel."""
    recipient = f" to=functions.{name}"
    if not any_form:
        return f"{gbnf_literal('<|channel|>commentary' + recipient + ' <|constrain|>json<|message|>')} {args}"
    channel_first = f"{gbnf_literal('<|channel|>')} {_CHANNELS} {gbnf_literal(recipient)} {_CONSTRAIN}"
    recipient_first = f"{gbnf_literal(recipient + '<|channel|>')} {_CHANNELS} {_CONSTRAIN}"
    return f"( {channel_first} | {recipient_first} ) {gbnf_literal('<|message|>')} {args}"


def with_prelude(rules: dict[str, str], answer: str) -> dict[str, str]:
    """``rules`` with a ``root`` that allows one thought before ``answer`` (a rule's body)."""
    thought = unused_name(rules, "harmony-thought")
    prelude = unused_name({**rules, thought: ""}, "harmony-prelude")
    rules.update(thought_rules(THOUGHT_END, thought))
    rules[prelude] = f"( {gbnf_literal(THOUGHT_HEAD)} {thought} {gbnf_literal('<|start|>assistant')} )?"
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
    """Where a lazy call grammar takes over: a call's header (any of ``CALL_HEADS``), opening the
    answer or a message after ``<|start|>assistant`` (so not inside a thought's text)."""
    heads = "|".join(map(re.escape, CALL_HEADS))
    return (f"(?:[\\s\\S]*?<\\|start\\|>assistant)?({heads})[\\s\\S]*",)
