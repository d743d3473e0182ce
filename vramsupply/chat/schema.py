"""JSON schema → GBNF: the one converter behind ``response_format`` and forced tool calls.

It is llama-cpp-python's converter (a port of llama.cpp's json-schema-to-grammar) with the gaps
that let a constrained answer break its schema closed:

- a string character excludes raw control characters (a raw newline inside a string is invalid
  JSON); llama.cpp's own converter excludes them too;
- property names and ``enum``/``const`` values are written as GBNF literals that say exactly
  their JSON (``gbnf_text.py``): a name holding ``"`` or ``\\`` broke the grammar or the JSON;
- ``minimum``, ``maximum``, ``exclusiveMinimum`` and ``exclusiveMaximum`` (draft-4 boolean form
  included) of ``integer`` and ``number`` are enforced digit by digit (``numbers.py``), so that
  they still hold once a number is read as a double; a range no number fits is an error, not a
  grammar that can never finish;
- a ``type`` list (``["integer", "null"]``) keeps the schema's other keywords in every branch, and
  ``enum``/``const`` values are checked against their siblings (``type``, lengths, bounds…);
- a string ``pattern`` is converted by ``pattern.py``, which writes what the regex allows as JSON
  writes it inside a string (the base converter wrote quotes raw and GBNF-invalid escapes);
  ``format`` ``date``, ``time``, ``date-time``, ``uuid``, ``email``, ``hostname``, ``ipv4`` and
  ``duration`` are enforced (``gbnf_text.py``);
- a ``required`` name that ``properties`` does not list is still written (any value, or what
  ``additionalProperties`` allows; none allowed: ``UnsatisfiableSchema``); a boolean schema is
  ``true`` (any value) or ``false`` (no value: such a property is never written); ``{}`` is any
  value, not only an object; ``$ref`` names are resolved per schema, so two tools' ``$defs`` of
  one name stay apart;
- a schema may refer to itself (a tree's ``"items": {"$ref": "#"}``, a list's ``next`` in
  ``$defs``): GBNF rules may recurse. What llama.cpp cannot parse is left recursion, a ``$ref``
  that comes back to itself through ``$ref``/``anyOf``/``oneOf`` alone, before any JSON of its own
  is written (such a schema has no finite value, or none the recursion adds): it is a
  ``RecursiveSchema`` error naming its place, where llama.cpp logged an error and the request got
  a 400 that named no field. So is a recursion that is required all the way round (a required
  ``child`` of the schema itself, ``minItems: 1`` of its own items): no value of it is finite, and
  its answer ran to the token limit; whether every rule can finish is ``finite.py``'s check.

What a schema says beyond that is recorded per keyword (``keywords.py``): ``strict`` refuses it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llama_cpp.llama_grammar import INVALID_RULE_CHARS_RE, PRIMITIVE_RULES, RESERVED_NAMES, BuiltinRule, SchemaConverter, _build_repetition

from . import keywords
from .bounds import BOUND_KEYS, bound_number, bounded
from .finite import unproductive
from .gbnf_text import STRING_FORMATS, check_gbnf, gbnf_literal, json_literal
from .keywords import UnenforcedKeyword

MAX_SPELLED_LENGTH = 1000
"""The longest ``maxLength`` a grammar holds: the converter spells out each length up to it."""
from .numbers import to_gbnf
from .pattern import PatternError, pattern_to_gbnf
from .schema_normal import UnsatisfiableSchema, register_refs, rename_root_refs, rewritten

JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
_NAME = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")
"""Digits of a bound written out (1e-300 has 300): the pattern grows with them."""

_PASS_THROUGH = {"ref", "union", "types", "allOf-one"}
"""Branches that write no JSON text of their own before the schemas they hold."""

__all__ = ["JsonSchemaConverter", "PatternError", "RecursiveSchema", "UnenforcedKeyword", "UnsatisfiableSchema", "schema_to_gbnf"]


class RecursiveSchema(ValueError):
    """A ``$ref`` that comes back to itself before any JSON is written: no grammar can hold it."""


class JsonSchemaConverter(SchemaConverter):
    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self._places: dict[int, str] = {}  # id of a schema node -> its JSON path from its root
        self._kept: list[Any] = []  # nodes made here: alive, so that no other node takes their id
        self._ref_rules: dict[str, str] = {}
        self._ref_early: set[str] = set()
        self._unwritten: set[str] = set()  # refs being resolved since the last JSON text written
        self.unenforced: list[tuple[str, str]] = []  # (path, keyword), in the order met (repeats too)

    # ---- adding schemas ---------------------------------------------------------------------------

    def resolved(self, schema: Any, url: str) -> Any:
        """A copy of ``schema`` whose ``$ref``s are registered (under ``url``), for visiting its parts."""
        copy = json.loads(json.dumps(schema))
        self._kept.append(copy)
        self._place(copy, "")
        if not isinstance(copy, (dict, list)):
            return copy
        self._refs[url + "#"] = copy  # "#": the whole schema (the base knows only "#/…")
        rename_root_refs(copy, url + "#")
        register_refs(copy, url, self._refs)
        return copy

    def add_schema(self, schema: Any, name: str) -> str:
        """The rule for ``schema`` (``$ref``s resolved within it), named after ``name``."""
        return self.visit(self.resolved(schema, name), name)

    def refuse_unenforced(self, root: str, since: int = 0) -> None:
        """``UnenforcedKeyword`` for the first keyword recorded (after ``since``) under ``root``."""
        found = list(dict.fromkeys(self.unenforced[since:]))
        if found:
            path, keyword = found[0]
            more = f" (and {len(found) - 1} more: {', '.join(repr(k) for _, k in found[1:4])})" if len(found) > 1 else ""
            raise UnenforcedKeyword(
                f"'{keyword}' at {place(root, path)}{more} cannot be enforced by this server's grammar; with strict: true it is "
                "refused: remove it, or send strict: false to have it accepted but not enforced"
            )

    def refuse_endless(self, root: str, expression: str | None = None) -> None:
        """``RecursiveSchema`` when a rule built so far (or ``expression``, over them) can never
        finish: a recursion required all the way round. ``root`` names the schema's place."""
        rules = dict(self._rules) | ({} if expression is None else {" expression": expression})
        endless = unproductive(rules)
        if not endless:
            return
        refs = [ref for ref, rule in self._ref_rules.items() if rule in endless]
        where = self._places.get(id(self._refs.get(refs[0])), "") if refs else ""
        which = f" ('$ref' {'#' + refs[0].split('#', 1)[-1]!r} comes back inside every value of it)" if refs else ""
        raise RecursiveSchema(
            f"{place(root, where)} has no finite value{which}: its recursion is required all the way round (through required "
            "properties, or arrays with minItems of 1 or more), so no answer could ever end; make one step of it optional "
            "(leave it out of 'required', allow minItems 0, or add an anyOf branch without it)"
        )

    def note(self, schema: Any, enforced: Any) -> None:
        """Record the keywords of ``schema`` that the rule written for it does not hold."""
        path = self._places.get(id(schema), "")
        self.unenforced += [(path, keyword) for keyword in keywords.unenforced(schema, enforced)]

    def _place(self, node: Any, path: str) -> None:
        self._places[id(node)] = path
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            if isinstance(child, (dict, list)):
                self._place(child, _step(path, key))

    def _made(self, original: Any, made: dict[str, Any]) -> dict[str, Any]:
        """``made`` (a rewritten ``original``), placed where the original is."""
        self._kept.append(made)
        self._places[id(made)] = self._places.get(id(original), "")
        return made

    # ---- visiting -------------------------------------------------------------------------------

    def visit(self, schema: Any, name: str) -> str:
        schema = self._normal(schema)
        branch = _branch(schema)
        if branch in _PASS_THROUGH:
            return self._visit(schema, name, branch)
        unwritten, self._unwritten = self._unwritten, set()  # JSON text comes first: recursion is fine
        try:
            return self._visit(schema, name, branch)
        finally:
            self._unwritten = unwritten

    def _visit(self, schema: dict[str, Any], name: str, branch: str) -> str:
        rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
        self._note_branch(schema, branch)
        if branch == "types":
            return self._add_rule(rule_name, self._generate_union_rule(name, [self._made(schema, {**schema, "type": t}) for t in schema["type"]]))
        if branch == "allOf-one":
            return self._add_rule(rule_name, self.visit(schema["allOf"][0], f"{name}-all" if name else "all"))
        if branch == "array":
            return self._add_rule(rule_name, self._array(schema, name))
        if branch == "format":
            body = self._add_rule(f"format-{schema['format']}", STRING_FORMATS[schema["format"]])
            return self._add_rule(rule_name, f'"\\"" {body} "\\"" space')
        if branch == "bounded":
            return self._add_rule(rule_name, f"({to_gbnf(bounded(schema))}) space")
        if branch == "value":
            return self._add_primitive("root" if rule_name == "root" else "value", PRIMITIVE_RULES["value"])
        if _unspelled_length(schema, branch):  # past what a grammar spells out: left unenforced
            return super().visit({k: v for k, v in schema.items() if k != "maxLength"}, name)
        return super().visit(schema, name)

    def _normal(self, schema: Any) -> dict[str, Any]:
        """``schema`` as the base converter can write it: booleans, required names without a
        property, ``false`` branches and properties, enum values that break their siblings."""
        where = self._places.get(id(schema), "")
        if schema is True or schema is False:
            if schema is False:
                raise UnsatisfiableSchema(f"a schema{' at ' + where.lstrip('.') if where else ''} is false, which no value fits")
            return self._made(schema, {})
        if not isinstance(schema, dict):
            raise ValueError(f"a schema{' at ' + where.lstrip('.') if where else ''} is {json.dumps(schema)[:40]}, not an object or a boolean")
        made = rewritten(schema, where)
        return schema if made is None else self._made(schema, made)

    def _note_branch(self, schema: dict[str, Any], branch: str) -> None:
        if branch == "types":
            return  # each type's branch is noted when visited
        if branch == "union":
            union = "oneOf" if "oneOf" in schema else "anyOf"
            exact = union == "anyOf" or keywords.exclusive([self.target(b) for b in schema[union]])
            self.note(schema, {union} if exact else set())
        elif branch == "object":
            required = schema.get("required") if isinstance(schema.get("required"), list) else []
            free = schema.get("additionalProperties") is True or isinstance(schema.get("additionalProperties"), dict)
            self.note(schema, keywords.object_enforced(schema, schema.get("properties") or {}, required, free))
        elif branch == "array":
            self.note(schema, keywords.array_enforced(schema))
        elif branch == "allOf":
            self.note(schema, {"type", "allOf"} if self._plain_all_of(schema["allOf"]) else {"type"})
        else:
            enforced = _ENFORCED.get(branch, set()) - ({"maxLength"} if _unspelled_length(schema, branch) else set())
            self.note(schema, enforced | _whole_multiples(schema) | _object_any(schema, branch))

    def target(self, schema: Any) -> Any:
        """``schema`` with its ``$ref`` followed (as far as registered refs go)."""
        for _ in range(32):
            if not (isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and schema["$ref"] in self._refs):
                break
            schema = self._refs[schema["$ref"]]
        return schema

    def _plain_all_of(self, parts: list[Any]) -> bool:
        """Whether the base's merge of ``allOf`` members' properties is all they say."""
        names: list[str] = []
        for part in map(self.target, parts):
            if not isinstance(part, dict) or part.get("type", "object") != "object" or keywords.unenforced(part, ("type", "properties", "required")):
                return False
            properties = part.get("properties") or {}
            if not set(part.get("required") or []) <= set(properties):
                return False
            names += list(properties)
        return len(names) == len(set(names))

    def _array(self, schema: dict[str, Any], name: str) -> str:
        items, prefix = schema.get("items"), schema.get("prefixItems")
        tuple_items = items if isinstance(items, list) else prefix if isinstance(prefix, list) and not items else None
        if tuple_items is not None:
            parts = [self.visit(item, f"{name}{'-' if name else ''}tuple-{i}") for i, item in enumerate(tuple_items)]
            return '"[" space ' + ' "," space '.join(parts) + ' "]" space'
        low, high = schema.get("minItems", 0), 0 if items is False else schema.get("maxItems")
        if high is not None and low > high:
            raise UnsatisfiableSchema(f"no array fits {json.dumps({k: schema[k] for k in ('items', 'minItems', 'maxItems') if k in schema})}")
        item_rule = self.visit({} if items in (None, True, False) else items, f"{name}{'-' if name else ''}item") if high != 0 else ""
        return '"[" space ' + _build_repetition(item_rule, low, high, separator_rule='"," space') + ' "]" space'

    def _resolve_ref(self, ref: str) -> str:
        """The rule of a ``$ref``, one per ref (the base named it by its last segment only)."""
        if ref in self._unwritten:
            where = self._places.get(id(self._refs.get(ref)), "")
            raise RecursiveSchema(
                f"'$ref' {'#' + ref.split('#', 1)[-1]!r} refers back to {place('the schema', where) if where else 'the whole schema'} before any "
                "JSON of its own is written (left recursion, which no grammar can hold): a recursive '$ref' must sit inside an object's "
                "property or an array's items"
            )
        if ref in self._ref_rules:
            if ref in self._refs_being_resolved:
                self._ref_early.add(ref)
            return self._ref_rules[ref]
        rule = INVALID_RULE_CHARS_RE.sub("-", ref.split("/")[-1]) if "/" in ref else "self"
        rule = rule or "ref"
        while rule in self._rules or rule in RESERVED_NAMES or rule in self._ref_rules.values():
            rule += "-ref"
        self._ref_rules[ref] = rule
        self._refs_being_resolved.add(ref)
        self._unwritten.add(ref)
        written = self.visit(self._refs[ref], rule)
        self._unwritten.discard(ref)
        self._refs_being_resolved.discard(ref)
        if written != rule and ref in self._ref_early:
            self._rules[rule] = written
        elif written != rule:
            self._ref_rules[ref] = rule = written
        return rule

    # ---- what the base converter writes ---------------------------------------------------------

    def _format_literal(self, literal: str) -> str:
        """A literal of the base's (a ``json.dumps``'d property name): written exactly, as UTF-8."""
        try:
            value = json.loads(literal)
        except ValueError:
            return gbnf_literal(literal)
        return json_literal(value) if isinstance(value, str) and literal.startswith('"') else gbnf_literal(literal)

    def _generate_constant_rule(self, value: Any) -> str:
        return json_literal(value)

    def _visit_pattern(self, pattern: str, name: str) -> str:
        if not isinstance(pattern, str):
            raise PatternError("'pattern' must be a string")
        return self._add_rule(name, f'"\\"" {pattern_to_gbnf(pattern)} "\\"" space')

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        if rule is PRIMITIVE_RULES["char"]:
            rule = BuiltinRule(JSON_CHAR, [])
        return super()._add_primitive(name, rule)


def schema_to_gbnf(schema: dict[str, Any], strict: bool = False, root: str = "the schema") -> str:
    """A grammar whose every sentence is a JSON value valid under ``schema``; with ``strict``,
    ``UnenforcedKeyword`` for a keyword it cannot hold (``root`` names the schema's place)."""
    converter = JsonSchemaConverter()
    converter.add_schema(schema, "")
    grammar = check_gbnf(converter.format_grammar())
    converter.refuse_endless(root)
    if strict:
        converter.refuse_unenforced(root)
    return grammar


def _step(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if _NAME.fullmatch(key) else f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def place(root: str, path: str) -> str:
    """Where a keyword is: ``response_format.json_schema.schema.properties.a``, or for a root
    that is a phrase, ``properties.a in the parameters of tool 'f'``."""
    if not path:
        return root
    return f"{root}{path}" if " " not in root else f"{path.lstrip('.')} in {root}"


# ---- which way a schema is written ----------------------------------------------------------------

_ENFORCED = {
    "ref": {"$ref"},
    "values": {"enum", "const", *keywords.VALUE_CHECKS},
    "allOf-one": {"allOf"},
    "pattern": {"type", "pattern"},
    "format": {"type", "format"},
    "length": {"type", "minLength", "maxLength"},
    "bounded": {"type", *BOUND_KEYS},
    "primitive": {"type"},
}


def _branch(schema: dict[str, Any]) -> str:
    """The way the converter writes ``schema``, in the base converter's order."""
    kind = schema.get("type")
    if "$ref" in schema:
        return "ref"
    if "oneOf" in schema or "anyOf" in schema:
        return "union"
    if "const" in schema or "enum" in schema:
        return "values"
    if isinstance(kind, list):
        return "types"
    if kind in (None, "object") and ("properties" in schema or ("additionalProperties" in schema and schema["additionalProperties"] is not True)):
        return "object"
    if kind in (None, "object") and "allOf" in schema:
        return "allOf-one" if len(schema["allOf"]) == 1 and not keywords.unenforced(schema, ("type", "allOf")) else "allOf"
    if (kind in (None, "array") and ("items" in schema or "prefixItems" in schema)) or (kind == "array" and ("minItems" in schema or "maxItems" in schema)):
        return "array"
    if kind in (None, "string") and "pattern" in schema:
        return "pattern"
    if kind in (None, "string") and schema.get("format") in STRING_FORMATS:
        return "format"
    if kind == "string" and ("minLength" in schema or "maxLength" in schema):
        return "length"
    if kind in ("integer", "number") and any(bound_number(schema, k) is not None for k in BOUND_KEYS):
        return "bounded"
    return "value" if kind is None else "primitive"


def _unspelled_length(schema: dict[str, Any], branch: str) -> bool:
    """A string's ``maxLength`` past ``MAX_SPELLED_LENGTH`` (pydantic's ``HttpUrl`` says 2083): its
    grammar would spell out every length, so the bound is not enforced (a strict schema is refused
    for it, as for any keyword not held); the other limits refuse such counts (``limits.py``)."""
    high = schema.get("maxLength")
    return branch == "length" and isinstance(high, int) and not isinstance(high, bool) and high > MAX_SPELLED_LENGTH


def _whole_multiples(schema: dict[str, Any]) -> set[str]:
    """``multipleOf`` holds for every integer when 1 is a multiple of it (``0.5``, ``1``)."""
    step = schema.get("multipleOf")
    if schema.get("type") == "integer" and isinstance(step, (int, float)) and not isinstance(step, bool) and step > 0:
        return {"multipleOf"} if (1 / step).is_integer() else set()
    return set()


def _object_any(schema: dict[str, Any], branch: str) -> set[str]:
    """Any object (``{"type": "object"}``): what holds of it."""
    if branch == "primitive" and schema.get("type") == "object":
        return keywords.object_enforced(schema, (), (), free=True)
    return set()
