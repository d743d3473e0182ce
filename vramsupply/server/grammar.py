"""``response_format`` → a llama.cpp GBNF grammar that constrains sampling to valid JSON.

llama-cpp-python ships llama.cpp's generic JSON grammar and its JSON-schema-to-GBNF converter;
the engine only ever sees the resulting grammar text.
"""

from __future__ import annotations

import json

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from vramsupply.server.errors import ApiError
from vramsupply.server.schemas import ResponseFormat


def grammar_for(response_format: ResponseFormat | None) -> str | None:
    """The grammar for a response format; ``None`` means unconstrained text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return JSON_GBNF
    assert response_format.json_schema is not None  # guaranteed by ResponseFormat's validator
    schema = response_format.json_schema.schema_
    if not schema:
        return JSON_GBNF
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises bare Exceptions and KeyErrors on schemas it cannot express
        raise ApiError(
            400,
            f"Invalid value for 'response_format.json_schema.schema': cannot turn this JSON schema into a grammar ({exc})",
            param="response_format.json_schema.schema",
            code="invalid_value",
        ) from None
