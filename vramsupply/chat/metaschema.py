"""A schema held to JSON Schema's own rules (its meta-schema) before it is read.

The converter reads the keywords it knows and passes over what it cannot read, so a schema that
breaks JSON Schema's rules (``{"type": "strng"}``, ``"minimum": "5"``, ``"required": "x"``) gave
a grammar that did not say what the buyer meant, or none at all (with ``tool_choice`` ``auto`` a
tool's schema is only converted for the lazy grammar, and a failure there was silent), or a 400
blaming the converter rather than the schema. OpenAI refuses such a schema with a 400 naming the
function; so does this server, by the ``jsonschema`` library's meta-schemas.

The draft is the one the schema's ``$schema`` names, or a later one (Draft 4 refused an empty
``required``, which generators that stamp Draft 4 still write). Without one (or with one
``jsonschema`` does not know), Draft 2020-12, which OpenAI validates against; a schema it refuses
is still taken when Draft 7 or Draft 4 accepts it, as the converter reads their forms too (a
tuple's ``items`` list, a boolean ``exclusiveMinimum``), and buyers' older tools write them without
a ``$schema``. The reason given is the first draft's. A null ``description`` or ``title`` (a
client's empty one) is passed over: annotations say nothing of the values. Formats in the meta-schemas are not asserted (which ones
``jsonschema`` checks depends on the optional packages installed): a ``pattern`` is an ECMA-262
regex, for ``pattern.py`` to judge where a grammar needs it.

Checking a schema against 2020-12's meta-schema (``$dynamicRef``, vocabularies) took about 20 ms
for a 7 KB tool's schema, five times Draft 7's or Draft 4's, while the request was read, on the
event loop of every stream. Any draft's acceptance is the verdict and only a refusal needs the
first draft's reason, so the fast drafts are asked first and a slow one only when they refuse: a
schema without ``$schema`` that Draft 7 takes (nearly all: it passes over 2020-12's keywords)
never meets 2020-12's meta-schema. Agents also send the same tools on every turn, so the verdict is
cached by a digest of the schema's JSON text. The validator recurses once per level of the
schema: hold a schema to ``limits.check_depth`` first.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any

from jsonschema import Draft4Validator, Draft6Validator, Draft7Validator, Draft201909Validator, Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match

MAX_REASON = 300
"""Characters of the reason kept: jsonschema writes the whole offending value into it."""
TYPES = "array, boolean, integer, null, number, object and string"
_LATEST = Draft202012Validator
_OLDER = (Draft7Validator, Draft4Validator)
_IN_ORDER = (Draft4Validator, Draft6Validator, Draft7Validator, Draft201909Validator, Draft202012Validator)
_SLOW = (Draft201909Validator, Draft202012Validator)
"""Drafts whose meta-schemas take several times longer to check a schema against (dynamic references
through vocabularies): tried after the others."""
KEPT_VERDICTS = 256
"""Schemas whose verdict is kept (by a digest of their JSON text, ``_kept_verdict``)."""
_KEPT: OrderedDict[bytes, tuple[str, str] | None] = OrderedDict()
_KEPT_LOCK = threading.Lock()
NOTES = ("description", "title", "$comment")
"""Annotations that say nothing of the values: null there (a client's empty description) is
passed over, not refused."""
_NAMED_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


class InvalidSchema(ValueError):
    """The schema breaks JSON Schema's own rules; ``path`` is where (``.properties.a.type``,
    appended to the request field that holds the schema; empty: the whole schema)."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


def check_valid(schema: Any, text: str | None = None) -> None:
    """``InvalidSchema`` saying what in ``schema`` breaks its draft's meta-schema, and where;
    ``text``: ``schema_text(schema)``, where the caller has it already."""
    verdict = _kept_verdict(schema_text(schema) if text is None else text)
    if verdict is not None:
        raise InvalidSchema(*verdict)


def schema_text(schema: Any) -> str:
    """The JSON text a schema's verdict is kept under: keys sorted, so that their order does not matter."""
    return json.dumps(schema, sort_keys=True)


def _kept_verdict(text: str) -> tuple[str, str] | None:
    """``_verdict``, kept for the last ``KEPT_VERDICTS`` schemas by a digest of their text (a
    schema past the limits may be 128 KiB: its text is not kept). Requests may be read on worker
    threads, hence the lock; two threads checking one new schema both check it."""
    key = hashlib.blake2b(text.encode(), digest_size=16).digest()
    with _KEPT_LOCK:
        if key in _KEPT:
            _KEPT.move_to_end(key)
            return _KEPT[key]
    verdict = _verdict(text)
    with _KEPT_LOCK:
        _KEPT[key] = verdict
        while len(_KEPT) > KEPT_VERDICTS:
            _KEPT.popitem(last=False)
    return verdict


def _verdict(text: str) -> tuple[str, str] | None:
    """(message, path) of the schema's first fault in its first draft, or None when any of its
    drafts accepts it. The fast drafts are asked first, the first draft's errors gathered only when
    they refuse, and a slow draft after the first only when that refuses too."""
    schema = _without_null_notes(json.loads(text))
    first, *others = _drafts(schema)
    if any(_meta_validator(draft).is_valid(schema) for draft in others if draft not in _SLOW):
        return None
    error = best_match(_meta_validator(first).iter_errors(schema))
    if error is None or any(_meta_validator(draft).is_valid(schema) for draft in others if draft in _SLOW):
        return None
    return _described(error)


def _drafts(schema: Any) -> tuple[type, ...]:
    """The draft ``$schema`` names, then the later ones (a generator that stamps Draft 4 may write
    a later draft's forms, such as an empty ``required``, which Draft 4 refused); without one,
    2020-12 and then the older ones."""
    named = schema.get("$schema") if isinstance(schema, dict) else None
    if isinstance(named, str):
        draft = validators.validator_for(schema, default=None)
        if draft is not None:
            return _IN_ORDER[_IN_ORDER.index(draft) :] if draft in _IN_ORDER else (draft,)
    return (_LATEST, *_OLDER)


def _without_null_notes(node: Any) -> Any:
    """``node`` (a schema) without the ``NOTES`` that are null, at every level; the names under
    ``properties`` and the like are parameters' names, kept whatever their schema."""
    if isinstance(node, list):
        return [_without_null_notes(item) for item in node]
    if not isinstance(node, dict):
        return node
    kept: dict[str, Any] = {}
    for key, value in node.items():
        if key in NOTES and value is None:
            continue
        if key in _NAMED_SCHEMAS and isinstance(value, dict):
            kept[key] = {name: _without_null_notes(schema) for name, schema in value.items()}
        else:
            kept[key] = _without_null_notes(value)
    return kept


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
