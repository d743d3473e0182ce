"""``response_format`` → a llama.cpp GBNF grammar that constrains sampling to valid JSON.

The grammar comes from the same JSON-schema converter that forces tool calls
(``vramsupply.chat.schema``: strings without raw control characters, numeric bounds enforced);
``json_object`` is the schema of any object. The engine only ever sees the grammar text.

One request's schema must not cost every other buyer, so it is checked against the limits of
``chat/limits.py`` and converted in a worker thread; past a limit the answer is a 400 naming
``response_format``. With ``json_schema.strict: true``, a keyword the grammar cannot enforce is a
400 naming it and its place, as OpenAI's strict mode refuses what it does not support.

Beside ``tools`` (``chat_grammar``), as at OpenAI, ``response_format`` shapes the answers given in
text: a forced call (``tool_choice`` ``required`` or a named function) is this turn's answer, and
with ``auto`` the model either calls tools or answers in the JSON, from its first token (or after
the thought the prompt left open). Before, the JSON grammar held every answer, so a model asked
for both could never call a tool (an agent framework sends both on every turn: tools to use, and
the final answer's shape), and a forced call beside a JSON format was a 400.

vLLM's output constraints (``vllm_fields.py``) give the same kind of answer grammar: a JSON
schema through the same converter (held strictly, as vLLM refuses what its backend cannot
enforce), a choice of strings, or a regex over the whole answer through the converter of a
schema's string ``pattern`` in its whole-answer form: each character written as itself, ``<``
included (the XML-value form leaves ``<`` out, which no whole answer has a reason to), NUL
excepted (llama.cpp's grammar never matches one).
"""

from __future__ import annotations

import asyncio
from typing import Any

from vramsupply.chat.forced import after_thought, either
from vramsupply.chat.gbnf_text import gbnf_literal
from vramsupply.chat.harmony_grammar import THOUGHT_END, THOUGHT_HEAD, in_final
from vramsupply.chat.limits import InvalidSchema, SchemaTooComplex, check_grammar_size, check_limits, schema_grammar
from vramsupply.chat.pattern import PatternError, pattern_to_gbnf
from vramsupply.chat.schema import UnenforcedKeyword, schema_to_gbnf
from vramsupply.engine import ChatPrompt
from vramsupply.engine.text import Thought
from vramsupply.server.errors import ApiError
from vramsupply.server.schemas import GenerationBody, ResponseFormat
from vramsupply.server.vllm_fields import Constraint, output_constraint

PARAM = "response_format"
JSON_OBJECT = schema_to_gbnf({"type": "object"})


def holds_answer(body: GenerationBody) -> bool:
    """Whether a grammar holds the answer's text (``answer_grammar`` gives one)."""
    response_format = getattr(body, "response_format", None)
    return output_constraint(body) is not None or (response_format is not None and response_format.type != "text")


async def answer_grammar(body: GenerationBody) -> str | None:
    """The grammar the request's answer is held to: its ``response_format``'s or its one vLLM
    constraint's (``vllm_fields.output_constraint`` refuses two); ``None``: unconstrained text."""
    constraint = output_constraint(body)
    if constraint is None:
        return await grammar_for(getattr(body, "response_format", None))
    if constraint.kind == "json":
        return await _schema_grammar(constraint.value, True, constraint.param, constraint.param, f"'{constraint.param}'") if constraint.value else JSON_OBJECT
    if constraint.kind == "json_object":
        return JSON_OBJECT
    try:
        return check_grammar_size(_text_grammar(constraint))
    except PatternError as exc:  # in the whole answer's words already (``pattern_to_gbnf``'s "text" form)
        raise ApiError(400, f"Invalid value for '{constraint.param}': {exc}", param=constraint.param, code="invalid_value") from None
    except (SchemaTooComplex, ValueError) as exc:
        message = str(exc).replace("'pattern'", "the regex")  # check_limits's word for it
        raise ApiError(400, f"Invalid value for '{constraint.param}': {message}", param=constraint.param, code="invalid_value") from None


def _text_grammar(constraint: Constraint) -> str:
    if constraint.kind == "choice":
        return "root ::= " + " | ".join(dict.fromkeys(gbnf_literal(choice) for choice in constraint.value))
    if constraint.kind == "regex":
        check_limits({"pattern": constraint.value})
        return f"root ::= {pattern_to_gbnf(_anchored(constraint.value), 'text')}"
    raise AssertionError(f"no grammar for a {constraint.kind!r} constraint")


def _anchored(regex: str) -> str:
    """vLLM's regex is matched by the whole answer: ``^`` and ``$`` at its ends change nothing."""
    body = regex.removeprefix("^")
    if body.endswith("$") and (len(body) - 1 - len(body[:-1].rstrip("\\"))) % 2 == 0:
        body = body[:-1]  # an unescaped $
    return f"^(?:{body})$"


async def grammar_for(response_format: ResponseFormat | None) -> str | None:
    """The grammar for a response format; ``None`` means unconstrained text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return JSON_OBJECT
    json_schema = response_format.json_schema
    assert json_schema is not None  # guaranteed by ResponseFormat's validator
    if not json_schema.schema_:
        return JSON_OBJECT
    label = PARAM if json_schema.name is None else f"{PARAM} {json_schema.name!r}"
    return await _schema_grammar(json_schema.schema_, json_schema.strict is True, f"{PARAM}.json_schema.schema", PARAM, label)


async def _schema_grammar(schema: dict[str, Any], strict: bool, field: str, too_complex_param: str, label: str) -> str:
    """A schema's grammar, converted in a worker thread; ``field`` names the schema in the 400s,
    and ``label`` in the one for a schema that breaks JSON Schema's rules, as OpenAI words it
    ("Invalid schema for response_format 'answer': …")."""
    try:
        return await asyncio.to_thread(schema_grammar, schema, strict, field)
    except InvalidSchema as exc:
        raise ApiError(400, f"Invalid schema for {label}: {exc}", param=f"{field}{exc.path}", code="invalid_value") from None
    except UnenforcedKeyword as exc:
        raise ApiError(400, f"Invalid value for '{field}': {exc}", param=field, code="invalid_value") from None
    except SchemaTooComplex as exc:
        raise ApiError(400, f"'{field}' is too complex for this server: {exc}", param=too_complex_param, code="invalid_value") from None
    except Exception as exc:  # the converter raises bare Exceptions and KeyErrors on schemas it cannot express
        raise ApiError(
            400, f"Invalid value for '{field}': cannot turn this JSON schema into a grammar ({exc})", param=field, code="invalid_value"
        ) from None


def chat_grammar(chat: ChatPrompt, json_grammar: str | None) -> dict[str, Any]:
    """The sampling fields that constrain a chat's answer: its tool calls' grammar (``chat``),
    its JSON ``response_format``'s (``json_grammar``, from ``grammar_for``), or either of the two.
    A harmony model's answer is its final message, after one thought or none (``in_final``)."""
    if chat.grammar is not None and not chat.grammar_triggers:
        return {"grammar": chat.grammar}  # a forced call
    if json_grammar is None:
        return {"grammar": chat.grammar, "grammar_triggers": chat.grammar_triggers} if chat.grammar is not None else {}
    if chat.channels:  # harmony: the answer is the final message, after a thought or none
        try:
            return {"grammar": check_grammar_size(in_final(json_grammar, chat.grammar))}
        except SchemaTooComplex as exc:
            raise ApiError(400, f"'tools' and '{PARAM}' together are too complex for this server: {exc}", param="tools", code="invalid_value") from None
    answer = json_grammar
    if chat.grammar is not None:
        try:
            answer = check_grammar_size(either(json_grammar, chat.grammar))
        except SchemaTooComplex as exc:
            raise ApiError(400, f"'tools' and '{PARAM}' together are too complex for this server: {exc}", param="tools", code="invalid_value") from None
    if chat.in_reasoning and chat.reasoning is not None:
        answer = after_thought(answer, chat.reasoning)  # the answer, not the thought
    return {"grammar": answer}


def free_thought(chat: ChatPrompt, sampling: dict[str, Any]) -> Thought | None:
    """The thought a chat's grammar lets come first (``chat_grammar``'s ``sampling`` fields: a
    forced call or an answer held from the first token), so that stop strings apply in that thought
    as in one no grammar holds (``GenerationRequest.thought``); None where there is no such thought.
    It is the rest of a thought the prompt left open, to its end marker, or harmony's optional
    analysis message, which every such grammar of harmony's allows (``harmony_grammar.with_prelude``)
    and which ends at its ``<|end|>``."""
    if sampling.get("grammar") is None or sampling.get("grammar_triggers"):
        return None
    if chat.channels:
        return Thought(THOUGHT_END, opening=THOUGHT_HEAD)
    return Thought(chat.reasoning.end) if chat.in_reasoning and chat.reasoning is not None else None
