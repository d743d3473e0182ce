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
"""

from __future__ import annotations

import asyncio
from typing import Any

from vramsupply.chat.forced import after_thought, either
from vramsupply.chat.limits import SchemaTooComplex, check_grammar_size, schema_grammar
from vramsupply.chat.schema import UnenforcedKeyword, schema_to_gbnf
from vramsupply.engine import ChatPrompt
from vramsupply.server.errors import ApiError
from vramsupply.server.schemas import ResponseFormat

PARAM = "response_format"
JSON_OBJECT = schema_to_gbnf({"type": "object"})


async def grammar_for(response_format: ResponseFormat | None) -> str | None:
    """The grammar for a response format; ``None`` means unconstrained text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return JSON_OBJECT
    assert response_format.json_schema is not None  # guaranteed by ResponseFormat's validator
    schema = response_format.json_schema.schema_
    if not schema:
        return JSON_OBJECT
    strict = response_format.json_schema.strict is True
    try:
        return await asyncio.to_thread(schema_grammar, schema, strict, f"{PARAM}.json_schema.schema")
    except UnenforcedKeyword as exc:
        raise ApiError(400, f"Invalid value for '{PARAM}.json_schema.schema': {exc}", param=f"{PARAM}.json_schema.schema", code="invalid_value") from None
    except SchemaTooComplex as exc:
        raise ApiError(400, f"'{PARAM}.json_schema.schema' is too complex for this server: {exc}", param=PARAM, code="invalid_value") from None
    except Exception as exc:  # the converter raises bare Exceptions and KeyErrors on schemas it cannot express
        raise ApiError(
            400,
            f"Invalid value for '{PARAM}.json_schema.schema': cannot turn this JSON schema into a grammar ({exc})",
            param=f"{PARAM}.json_schema.schema",
            code="invalid_value",
        ) from None


def chat_grammar(chat: ChatPrompt, json_grammar: str | None) -> dict[str, Any]:
    """The sampling fields that constrain a chat's answer: its tool calls' grammar (``chat``),
    its JSON ``response_format``'s (``json_grammar``, from ``grammar_for``), or either of the two."""
    if chat.grammar is not None and not chat.grammar_triggers:
        return {"grammar": chat.grammar}  # a forced call
    if json_grammar is None:
        return {"grammar": chat.grammar, "grammar_triggers": chat.grammar_triggers} if chat.grammar is not None else {}
    answer = json_grammar
    if chat.grammar is not None:
        try:
            answer = check_grammar_size(either(json_grammar, chat.grammar))
        except SchemaTooComplex as exc:
            raise ApiError(400, f"'tools' and '{PARAM}' together are too complex for this server: {exc}", param="tools", code="invalid_value") from None
    if chat.in_reasoning and chat.reasoning is not None:
        answer = after_thought(answer, chat.reasoning)  # the answer, not the thought
    return {"grammar": answer}
