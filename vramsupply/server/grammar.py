"""``response_format`` → a llama.cpp GBNF grammar that constrains sampling to valid JSON.

The grammar comes from the same JSON-schema converter that forces tool calls
(``vramsupply.chat.schema``: strings without raw control characters, numeric bounds enforced);
``json_object`` is the schema of any object. The engine only ever sees the grammar text.

One request's schema must not cost every other buyer, so it is checked against the limits of
``chat/limits.py`` and converted in a worker thread; past a limit the answer is a 400 naming
``response_format``. With ``json_schema.strict: true``, a keyword the grammar cannot enforce is a
400 naming it and its place, as OpenAI's strict mode refuses what it does not support.
"""

from __future__ import annotations

import asyncio

from vramsupply.chat.limits import SchemaTooComplex, schema_grammar
from vramsupply.chat.schema import UnenforcedKeyword, schema_to_gbnf
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
