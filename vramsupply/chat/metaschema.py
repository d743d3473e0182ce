"""A schema held to JSON Schema's own rules (its meta-schema) before it is read.

The converter reads the keywords it knows and passes over what it cannot read, so a schema that
breaks JSON Schema's rules (``{"type": "strng"}``, ``"minimum": "5"``, ``"required": "x"``) gave
a grammar that did not say what the buyer meant, or none at all (with ``tool_choice`` ``auto`` a
tool's schema is only converted for the lazy grammar, and a failure there was silent), or a 400
blaming the converter rather than the schema. OpenAI refuses such a schema with a 400 naming the
function; so does this server, by the ``jsonschema`` library's meta-schemas.

The draft is the one the schema's ``$schema`` names. Without one (or with one ``jsonschema`` does
not know), Draft 2020-12, which OpenAI validates against; a schema it refuses is still taken when
Draft 7 or Draft 4 accepts it, as the converter reads their forms too (a tuple's ``items`` list,
a boolean ``exclusiveMinimum``), and buyers' older tools write them without a ``$schema``. The
reason given is 2020-12's. Formats in the meta-schemas are not asserted (which ones
``jsonschema`` checks depends on the optional packages installed): a ``pattern`` is an ECMA-262
regex, for ``pattern.py`` to judge where a grammar needs it.

Checking against 2020-12's meta-schema costs about a millisecond for a small schema (more than
converting it) and agents send the same tools on every turn, so the verdict is cached by the
schema's JSON text. The validator recurses once per level of the schema: hold a schema to
``limits.check_schema`` first.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from jsonschema import Draft4Validator, Draft7Validator, Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match

MAX_REASON = 300
"""Characters of the reason kept: jsonschema writes the whole offending value into it."""
TYPES = "array, boolean, integer, null, number, object and string"
_LATEST = Draft202012Validator
_OLDER = (Draft7Validator, Draft4Validator)


class InvalidSchema(ValueError):
    """The schema breaks JSON Schema's own rules; ``path`` is where (``.properties.a.type``,
    appended to the request field that holds the schema; empty: the whole schema)."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


def check_valid(schema: Any) -> None:
    """``InvalidSchema`` saying what in ``schema`` breaks its draft's meta-schema, and where."""
    verdict = _verdict(json.dumps(schema, sort_keys=True))
    if verdict is not None:
        raise InvalidSchema(*verdict)


@lru_cache(maxsize=256)
def _verdict(text: str) -> tuple[str, str] | None:
    """(message, path) of the schema's first fault, or None when it has none."""
    schema = json.loads(text)
    first, *others = _drafts(schema)
    error = best_match(_meta_validator(first).iter_errors(schema))
    if error is None or any(_meta_validator(draft).is_valid(schema) for draft in others):
        return None
    return _described(error)


def _drafts(schema: Any) -> tuple[type, ...]:
    """The draft ``$schema`` names alone; without one, 2020-12 and then the older ones."""
    named = schema.get("$schema") if isinstance(schema, dict) else None
    if isinstance(named, str):
        draft = validators.validator_for(schema, default=None)
        if draft is not None:
            return (draft,)
    return (_LATEST, *_OLDER)


def _meta_validator(draft: type) -> Any:
    """A validator of ``draft``'s meta-schema; formats not asserted. Made per use (it is cheap),
    so that no validator is shared between the threads that check schemas."""
    meta = validators.validator_for(draft.META_SCHEMA, default=draft)
    return meta(draft.META_SCHEMA, format_checker=None)


def _described(error: ValidationError) -> tuple[str, str]:
    path = list(error.absolute_path)
    reason = error.message
    if list(error.schema_path)[-3:] == ["properties", "type", "anyOf"]:  # "… is not valid under any of the given schemas"
        reason = f"{json.dumps(error.instance)[:60]} is not a JSON Schema type; the types are {TYPES} (or a list of them)"
    if len(reason) > MAX_REASON:
        reason = reason[: MAX_REASON - 1] + "…"
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)
    return f"{reason}, {at(where)}", where


def at(path: str) -> str:
    """``at properties.a.type`` for the path ``.properties.a.type``; the empty path is the top."""
    return f"at {path.lstrip('.') or 'the top'}"
