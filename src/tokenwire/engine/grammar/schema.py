"""JSON Schema to a grammar (bnf.py) of the JSON texts valid against it, compact by default.

Compact: no whitespace anywhere outside strings (``{"a":1,"b":[2,3]}``), as llguidance writes it for the
transformers engine: a small model given room for whitespace fills it (runs of newlines until max_tokens).
Flexible (``compact=False``): any run of spaces, tabs and newlines between tokens, as JSON allows.

What it enforces: ``type`` (one or a list), ``properties`` in their order with ``required`` (other keys only
where ``additionalProperties`` allows them; unset allows them only on an object without ``properties``),
``items``, ``prefixItems``, ``minItems``/``maxItems``, ``enum``, ``const``, ``anyOf``/``oneOf`` (as anyOf),
``allOf`` (merged), ``$ref`` into ``$defs``/``definitions`` (recursion too), ``minLength``/``maxLength``,
``pattern`` (regex.py) and the formats date, time, date-time and uuid. Any other keyword that constrains a value
is refused by name (:class:`Unsupported`), never dropped.
"""

from __future__ import annotations

import json
from typing import Any

from tokenwire.engine.grammar import regex
from tokenwire.engine.grammar.bnf import Alternative, Builder, Chars, Grammar

ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
     "writeOnly", "$defs", "definitions", "strict", "format_hint"}
)  # fmt: skip
KNOWN = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
     "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "minLength", "maxLength", "pattern", "format"}
)  # fmt: skip
FORMATS = {
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "time": r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?",
    "date-time": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
}
MAX_REPEAT = 1024  # the largest bound of a repetition (minLength, maxItems...) written out as rules
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
STRING_CHAR = Chars.of('"\\').union(Chars.ranges_of([(0, 0x1F)])).negated()  # unescaped, inside a string


class Unsupported(ValueError):
    """A schema keyword (or value) this compiler cannot enforce; the message names it."""


def compile_schema(schema_text: str, compact: bool = True) -> Grammar:
    """The grammar of the JSON documents valid against the schema (a JSON text). Unsupported if it uses what
    this compiler cannot enforce; ValueError if it is not a schema."""
    schema = json.loads(schema_text)
    if not isinstance(schema, dict):
        raise ValueError("a JSON Schema must be an object")
    compiler = _Compiler(schema, compact)
    grammar = compiler.builder.grammar
    grammar.start = compiler.value(schema, "doc")
    return grammar


class _Compiler:
    def __init__(self, root: dict[str, Any], compact: bool) -> None:
        self.root = root
        self.builder = Builder()
        b = self.builder
        self.ws: Alternative = () if compact else (b.star((Chars.of(" \t\n\r"),), "ws"),)
        self._refs: dict[str, str] = {}
        hexd = Chars.ranges_of([(48, 57), (65, 70), (97, 102)])
        escape = b.rule("esc", [(Chars.of('"\\/bfnrt'),), (Chars.of("u"), hexd, hexd, hexd, hexd)])
        self.char = b.rule("char", [(STRING_CHAR,), (Chars.of("\\"), escape)])
        self.digits = b.star((Chars.ranges_of([(48, 57)]),), "digits")
        nonzero = Chars.ranges_of([(49, 57)])
        self.int = b.rule("int", [(Chars.of("0"),), (nonzero, self.digits)])
        minus = b.rule("minus", [(), (Chars.of("-"),)])
        digit = Chars.ranges_of([(48, 57)])
        frac = b.rule("frac", [(), (Chars.of("."), digit, self.digits)])
        exp = b.rule("exp", [(), (Chars.of("eE"), b.rule("sign", [(), (Chars.of("+-"),)]), digit, self.digits)])
        self.integer = b.rule("integer", [(minus, self.int)])
        self.number = b.rule("number", [(minus, self.int, frac, exp)])
        self.string = b.rule("string", [(Chars.of('"'), b.star((self.char,), "chars"), Chars.of('"'))])
        self._any: str | None = None

    # -- values
    def value(self, schema: Any, hint: str) -> str:
        if schema is True or schema == {}:
            return self.any_value()
        if schema is False:
            raise Unsupported("a schema of false (no value is valid)")
        if not isinstance(schema, dict):
            raise ValueError(f"a schema must be an object or a boolean, not {json.dumps(schema)[:40]}")
        for key in schema:
            if key not in KNOWN and key not in ANNOTATIONS:
                raise Unsupported(f"the keyword {key!r}")
        if "$ref" in schema:
            return self.ref(schema["$ref"]) if len(schema.keys() - ANNOTATIONS) == 1 else self.merged(schema, hint)
        if "allOf" in schema:
            return self.merged(schema, hint)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                rest = {k: v for k, v in schema.items() if k != key}
                variants = schema[key]
                if not isinstance(variants, list) or not variants:
                    raise ValueError(f"{key} must be a non-empty list of schemas")
                names = [self.value({**rest, **v} if isinstance(v, dict) else v, hint) for v in variants]
                return self.builder.rule(hint, [(n,) for n in names])
        if "const" in schema:
            return self.builder.rule(hint, [self.builder.literal(_dump(schema["const"]))])
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise ValueError("enum must be a non-empty list")
            return self.builder.rule(hint, [self.builder.literal(_dump(v)) for v in values])
        kinds = schema.get("type")
        if kinds is None:
            kinds = [k for k in TYPES if k != "integer" and _applies(schema, k)] or [k for k in TYPES if k != "integer"]
        if isinstance(kinds, str):
            kinds = [kinds]
        names = [self.typed(schema, kind, hint) for kind in kinds]
        return names[0] if len(names) == 1 else self.builder.rule(hint, [(n,) for n in names])

    def typed(self, schema: dict[str, Any], kind: Any, hint: str) -> str:
        if kind == "string":
            return self.string_of(schema, hint)
        if kind == "integer":
            return self.integer
        if kind == "number":
            return self.number
        if kind == "boolean":
            return self.builder.rule("bool", [self.builder.literal("true"), self.builder.literal("false")])
        if kind == "null":
            return self.builder.rule("null", [self.builder.literal("null")])
        if kind == "object":
            return self.object_of(schema, hint)
        if kind == "array":
            return self.array_of(schema, hint)
        raise ValueError(f"unknown type {kind!r}")

    def any_value(self) -> str:
        if self._any is None:
            b = self.builder
            self._any = b.name("any")
            key_value = (self.string, *self.ws, Chars.of(":"), *self.ws, self._any)
            members = self._list(key_value, 0, None, "members")
            items = self._list((self._any,), 0, None, "items")
            obj = (Chars.of("{"), *self.ws, *members, *self.ws, Chars.of("}"))
            arr = (Chars.of("["), *self.ws, *items, *self.ws, Chars.of("]"))
            literals = [b.literal("true"), b.literal("false"), b.literal("null")]
            b.define(self._any, [(self.string,), (self.number,), obj, arr, *literals])
        return self._any

    # -- strings
    def string_of(self, schema: dict[str, Any], hint: str) -> str:
        pattern, fmt = schema.get("pattern"), schema.get("format")
        least, most = _bound(schema, "minLength", 0), _bound(schema, "maxLength", None)
        if fmt is not None and fmt not in FORMATS:
            raise Unsupported(f"the string format {fmt!r} (supported: {', '.join(FORMATS)})")
        if pattern is not None and fmt is not None:
            raise Unsupported("pattern and format together")
        source = pattern if pattern is not None else FORMATS.get(fmt) if fmt is not None else None
        if source is not None:
            if least > 0 or most is not None:
                raise Unsupported("minLength or maxLength with a pattern or format")
            if not isinstance(source, str):
                raise ValueError("pattern must be a string")
            body = regex.compile_regex(source, self.builder, STRING_CHAR, self.char, hint)
            return self.builder.rule(hint, [(Chars.of('"'), *body, Chars.of('"'))])
        if least == 0 and most is None:
            return self.string
        chars = self.builder.repeat((self.char,), least, most, "chars")
        return self.builder.rule(hint, [(Chars.of('"'), *chars, Chars.of('"'))])

    # -- objects
    def object_of(self, schema: dict[str, Any], hint: str) -> str:
        b = self.builder
        props = schema.get("properties") or {}
        if not isinstance(props, dict):
            raise ValueError("properties must be an object")
        required = set(schema.get("required") or ())
        extra = schema.get("additionalProperties", "properties" not in schema)
        for name in sorted(required - props.keys()):  # required, described only by additionalProperties
            props = {**props, name: extra if isinstance(extra, dict) else True}
        members = [
            ((*b.literal(_dump(name)), *self.ws, Chars.of(":"), *self.ws, self.value(sub, f"{hint}_{name}")), name)
            for name, sub in props.items()
        ]
        extra_member: Alternative | None = None
        if extra is not False:
            extra_value = self.any_value() if extra is True or extra == {} else self.value(extra, f"{hint}_extra")
            extra_member = (self.string, *self.ws, Chars.of(":"), *self.ws, extra_value)
        comma = (*self.ws, Chars.of(","), *self.ws)
        # first[i]: the members from the i-th on, none written yet; after[i]: the same after one (a comma first)
        if extra_member is not None:
            after_extra = b.name(f"{hint}_more")
            b.define(after_extra, [(), (*comma, *extra_member, after_extra)])
            after_end: Alternative = (after_extra,)
            first_end: Alternative = (b.rule(f"{hint}_more", [(), (*extra_member, after_extra)]),)
        else:
            after_end = first_end = ()
        after, first = after_end, first_end
        for member, name in reversed(members):
            after_alts: list[Alternative] = [(*comma, *member, *after)]
            first_alts: list[Alternative] = [(*member, *after)]
            if name not in required:
                after_alts.append(after)
                first_alts.append(first)
            after = (b.rule(f"{hint}_after", after_alts),)
            first = (b.rule(f"{hint}_first", first_alts),)
        return b.rule(hint, [(Chars.of("{"), *self.ws, *first, *self.ws, Chars.of("}"))])

    # -- arrays
    def array_of(self, schema: dict[str, Any], hint: str) -> str:
        b = self.builder
        heads = [self.value(s, f"{hint}_{i}") for i, s in enumerate(schema.get("prefixItems") or [])]
        items = schema.get("items", True)
        least, most = _bound(schema, "minItems", 0), _bound(schema, "maxItems", None)
        item = None if items is False else self.value(items, f"{hint}_item")
        if item is None:
            most = len(heads) if most is None else min(most, len(heads))
        if most is not None and most < least:
            raise ValueError("maxItems is below minItems (or prefixItems with items false)")
        comma = (*self.ws, Chars.of(","), *self.ws)

        def elements_from(k: int) -> Alternative:
            """The elements from the k-th on (a comma before each, unless k is 0)."""
            if most is not None and k >= most:
                return ()
            if k >= len(heads):
                assert item is not None
                left = None if most is None else most - k
                return self._list((item,), max(0, least - k), left, f"{hint}_items", lead=k > 0)
            one = (*(comma if k > 0 else ()), heads[k], *elements_from(k + 1))
            return (b.rule(f"{hint}_from{k}", [one, *([()] if k >= least else [])]),)

        return b.rule(hint, [(Chars.of("["), *self.ws, *elements_from(0), *self.ws, Chars.of("]"))])

    def _list(self, item: Alternative, least: int, most: int | None, hint: str, lead: bool = False) -> Alternative:
        """``least`` to ``most`` of ``item`` separated by commas; ``lead``: after an element already (a comma
        before the first of these too)."""
        b = self.builder
        comma = (*self.ws, Chars.of(","), *self.ws)
        if lead:
            return b.repeat((*comma, *item), least, most, hint)
        if most == 0:
            return ()
        more = b.repeat((*comma, *item), max(0, least - 1), None if most is None else most - 1, hint)
        one = (*item, *more)
        return one if least > 0 else (b.rule(hint, [(), one]),)

    # -- composition
    def ref(self, ref: Any) -> str:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise Unsupported(f"the $ref {ref!r} (only references inside the schema, #/...)")
        found = self._refs.get(ref)
        if found is not None:
            return found
        node: Any = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"the $ref {ref!r} points nowhere")
            node = node[part]
        name = self.builder.name("ref_" + ref.rsplit("/", 1)[-1])
        self._refs[ref] = name
        self.builder.define(name, [(self.value(node, name),)])
        return name

    def merged(self, schema: dict[str, Any], hint: str) -> str:
        """allOf (and $ref beside other keywords): the schemas merged into one (properties and required joined)."""
        parts = [{k: v for k, v in schema.items() if k not in ("allOf", "$ref")}]
        if "$ref" in schema:
            parts.append(self.resolve(schema["$ref"]))
        for sub in schema.get("allOf") or []:
            if not isinstance(sub, dict):
                raise ValueError("allOf must be a list of schemas")
            parts.append(self.resolve(sub["$ref"]) if set(sub) == {"$ref"} else sub)
        out: dict[str, Any] = {}
        for part in parts:
            for key, value in part.items():
                if key == "properties":
                    out["properties"] = {**out.get("properties", {}), **value}
                elif key == "required":
                    out["required"] = [*out.get("required", []), *value]
                elif key in out and out[key] != value:
                    raise Unsupported(f"allOf with two different values of {key!r}")
                else:
                    out[key] = value
        return self.value(out, hint)

    def resolve(self, ref: Any) -> dict[str, Any]:
        node: Any = self.root
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise Unsupported(f"the $ref {ref!r} (only references inside the schema, #/...)")
        for part in [p for p in ref[1:].split("/") if p]:
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"the $ref {ref!r} points nowhere")
            node = node[part]
        if not isinstance(node, dict):
            raise ValueError(f"the $ref {ref!r} is not a schema object")
        return node


def _applies(schema: dict[str, Any], kind: str) -> bool:
    """Whether a schema without ``type`` says something of ``kind`` (its keywords)."""
    keys = {
        "object": ("properties", "required", "additionalProperties"),
        "array": ("items", "prefixItems", "minItems", "maxItems"),
        "string": ("minLength", "maxLength", "pattern", "format"),
    }.get(kind, ())
    return any(k in schema for k in keys)


def _bound(schema: dict[str, Any], key: str, default: int | None) -> Any:
    value = schema.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer")
    if value > MAX_REPEAT:
        raise Unsupported(f"{key} above {MAX_REPEAT}")
    return value


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
