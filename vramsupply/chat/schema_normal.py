"""A schema rewritten into what llama-cpp-python's converter writes correctly.

The base converter reads a schema as it comes and crashed on, or silently dropped, what it did not
expect: a ``required`` name without a property was never written (the answer then broke its own
schema), a boolean schema raised ``'bool' object has no attribute 'get'``, and an ``enum`` ignored
its sibling keywords. Each rewrite here keeps the schema's meaning, or narrows it to values that
still fit it; what no value fits is an ``UnsatisfiableSchema``.
"""

from __future__ import annotations

import json
from typing import Any

from . import keywords


class UnsatisfiableSchema(ValueError):
    """No JSON value fits the schema (e.g. ``minimum`` above ``maximum``)."""


def rewritten(schema: dict[str, Any], where: str) -> dict[str, Any] | None:
    """``schema`` rewritten (a new dict), or None when it needs nothing."""
    copy = dict(schema)
    changed = [step(copy, where) for step in (_values, _members, _unions, _all_of)]
    return copy if any(changed) else None


def _values(schema: dict[str, Any], where: str) -> bool:
    """``enum``/``const`` values that break the sibling keywords are left out (the base converter
    wrote each value, whatever ``type`` or ``maxLength`` said)."""
    if any(k in schema for k in ("$ref", "anyOf", "oneOf")) or not ("const" in schema or isinstance(schema.get("enum"), list)):
        return False
    values = [schema["const"]] if "const" in schema else schema["enum"]
    kept = keywords.filter_values(schema, values)
    if not kept:
        raise UnsatisfiableSchema(f"no value of the enum or const at {where or 'the top'} fits the schema's other keywords")
    if "const" not in schema and len(kept) == len(values):
        return False
    schema["enum"] = kept
    schema.pop("const", None)
    return True


def _members(schema: dict[str, Any], where: str) -> bool:
    """A ``false`` property is never written (a required one: unsatisfiable), and a required name
    ``properties`` does not list is written with what ``additionalProperties`` allows."""
    if any(k in schema for k in ("$ref", "anyOf", "oneOf", "const", "enum")) or schema.get("type") not in (None, "object"):
        return False
    properties, required = schema.get("properties"), schema.get("required")
    if not isinstance(properties, (dict, type(None))) or not isinstance(required, (list, type(None))):
        return False
    members = dict(properties or {})
    names = [name for name in required or () if isinstance(name, str)]
    for name in [n for n, sub in members.items() if fits_nothing(sub)]:
        if name in names:
            what = "the schema false" if members[name] is False else f"a schema no value fits ({json.dumps(members[name])[:40]})"
            raise UnsatisfiableSchema(f"the required property {json.dumps(name)} at {where or 'the top'} has {what}")
        del members[name]
    extra = schema.get("additionalProperties", True)
    for name in names:
        if name not in members:
            if extra is False:
                raise UnsatisfiableSchema(
                    f"{json.dumps(name)} is required at {where or 'the top'} but is not one of its properties, and additionalProperties is false"
                )
            members[name] = extra if isinstance(extra, dict) else {}
    if members == (properties or {}):
        return False
    schema["properties"] = members
    return True


def fits_nothing(schema: Any) -> bool:
    """``false``, or a schema that says as much: an empty ``anyOf``, ``oneOf`` or ``type`` list."""
    return schema is False or (isinstance(schema, dict) and any(schema.get(key) == [] for key in ("anyOf", "oneOf", "type")))


def _unions(schema: dict[str, Any], where: str) -> bool:
    """A ``false`` branch of ``anyOf``/``oneOf`` fits nothing: left out. None left (or none to
    begin with) is a union no value fits; so is an empty ``type`` list."""
    if schema.get("type") == []:
        raise UnsatisfiableSchema(f"the type list at {where or 'the top'} is empty, so no value fits it")
    changed = False
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if "$ref" in schema or not isinstance(branches, list) or (branches and not any(fits_nothing(b) for b in branches)):
            continue
        kept = [b for b in branches if not fits_nothing(b)]
        if not kept:
            raise UnsatisfiableSchema(f"no branch of the {key} at {where or 'the top'} fits any value")
        schema[key], changed = kept, True
    return changed


def _all_of(schema: dict[str, Any], where: str) -> bool:
    """``true`` (or ``{}``) members of ``allOf`` say nothing; a ``false`` one fits nothing."""
    parts = schema.get("allOf")
    if not isinstance(parts, list):
        return False
    if any(p is False for p in parts):
        raise UnsatisfiableSchema(f"the allOf at {where or 'the top'} has a false member")
    kept = [p for p in parts if p is not True and p != {}]
    if len(kept) == len(parts):
        return False
    if kept:
        schema["allOf"] = kept
    else:
        del schema["allOf"]
    return True


def rename_root_refs(node: Any, ref: str) -> None:
    """Each ``{"$ref": "#"}`` in ``node`` to ``ref``, the key its whole schema is registered under."""
    if isinstance(node, dict):
        if node.get("$ref") == "#":
            node["$ref"] = ref
        children: Any = node.values()
    else:
        children = node if isinstance(node, list) else ()
    for child in children:
        if isinstance(child, (dict, list)):
            rename_root_refs(child, ref)


def register_refs(schema: Any, url: str, refs: dict[str, Any]) -> None:
    """Each local ``$ref`` (``#/…``) in ``schema`` made absolute under ``url`` and registered in
    ``refs`` with the part it names. llama-cpp-python's own walk stopped at a node with a ``$ref``,
    so the ``$defs`` beside a root ``$ref`` (pydantic's shape for a recursive model) were never
    reached, and a definition's ``$ref`` to another was unknown: a 400 for a valid schema. This one
    visits every node. A reference to anything but this schema is a ValueError."""
    if isinstance(schema, list):
        for item in schema:
            register_refs(item, url, refs)
        return
    if not isinstance(schema, dict):
        return
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref not in refs:
        if not ref.startswith("#/"):
            raise ValueError(f"Unsupported ref {ref}")
        absolute = f"{url}{ref}"
        schema["$ref"] = absolute
        if absolute not in refs:
            refs[absolute] = _pointed(refs[url + "#"], ref)
    for key, value in schema.items():
        if key != "$ref":
            register_refs(value, url, refs)


def _pointed(root: Any, ref: str) -> Any:
    target = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            raise ValueError(f"Error resolving ref {ref}: {part} not found")
    return target
