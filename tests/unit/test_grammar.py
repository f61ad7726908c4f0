"""JSON Schema to grammar (engine/grammar/): the documents it admits, compact or flexible, and the grammar of a
document's rest after any prefix of it (how a constrained request goes on after a pause or a worker restart)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenwire.engine.grammar.compiled import SchemaGrammars
from tokenwire.engine.grammar.residual import NotAPrefix, accepts, residual
from tokenwire.engine.grammar.schema import Unsupported, compile_schema

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "pet": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/pet"}]},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
    "$defs": {"pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}, "required": ["kind"]}},
}

# (schema, valid documents, invalid documents) -- all written compactly
CASES: list[tuple[dict[str, Any], list[Any], list[str]]] = [
    (
        PERSON,
        [
            {"name": "Ann", "age": 3},
            {"name": "", "age": -10, "tags": ["a"]},
            {"name": "Bo", "age": 0, "pet": {"kind": "dog"}},
            {"name": 'B"o\\', "age": 7, "tags": ["x", "y", "z"], "pet": None},
        ],
        [
            '{"age":3,"name":"Ann"}',
            '{"name":"Ann"}',
            '{"name":"Ann","age":3,"x":1}',
            '{"name":"123456789","age":1}',
            '{"name":"A","age":1,"tags":[]}',
            '{"name":"A","age":1.5}',
            '{"name":"A","age":01}',
            '{"name":"A","age":1,"pet":{"kind":"cow"}}',
        ],
    ),
    (
        {"type": "object"},
        [{}, {"a": [1, 2.5e-3, True, None, {"b": "c"}]}, {"x": "ü 中"}],
        ["[]", '{"a"}', '{"a":1,}', "{", '{"a":tru}'],
    ),
    (
        {"type": "string", "pattern": "^[A-Z]{2}-\\d+$"},
        ["AB-1", "ZZ-0042"],
        ['"ab-1"', '"AB-"', '"AB-1x"'],
    ),
    (
        {"type": "string", "format": "date"},
        ["2026-12-07"],
        ['"2026-13-01"', '"26-12-07"'],
    ),
    (
        {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}], "items": False},
        [[1, True], [1], []],
        ["[1,true,3]", '["a"]'],
    ),
    (
        {"type": ["number", "null"]},
        [1, -2.5, 3e10, None],
        ['"1"', "true", "-"],
    ),
]


def dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@pytest.mark.parametrize(("schema", "valid", "invalid"), CASES)
def test_the_grammar_admits_valid_documents_written_compactly_and_nothing_invalid(
    schema: dict[str, Any], valid: list[Any], invalid: list[str]
) -> None:
    grammar = compile_schema(dump(schema))
    for value in valid:
        jsonschema.validate(value, schema)  # the case itself is right
        assert accepts(grammar, dump(value)), dump(value)
    for text in invalid:
        assert not accepts(grammar, text), text


def test_compact_refuses_whitespace_outside_strings_and_flexible_takes_it() -> None:
    """The default model filled the room XGrammar's JSON grammar leaves for whitespace with runs of newlines."""
    schema = dump(PERSON)
    spaced = '{\n  "name": "Ann",\n  "age" : 3 }'
    assert not accepts(compile_schema(schema), spaced)
    assert accepts(compile_schema(schema, compact=False), spaced)
    assert accepts(compile_schema(schema), '{"name":"A n n","age":3}')  # inside strings, spaces are text


@pytest.mark.parametrize(("schema", "valid", "invalid"), CASES)
def test_the_rest_after_any_prefix_of_a_document_is_exactly_what_completes_it(
    schema: dict[str, Any], valid: list[Any], invalid: list[str]
) -> None:
    """For every split of a valid document, the residual grammar takes its rest, and not the rest with a
    character more or less; a prefix no document begins with is NotAPrefix."""
    grammar = compile_schema(dump(schema))
    for value in valid:
        text = dump(value)
        for cut in range(len(text) + 1):
            rest = residual(grammar, text[:cut])
            assert accepts(rest, text[cut:]), (text[:cut], text[cut:])
            assert not accepts(rest, text[cut:] + "}")
            if cut < len(text):
                assert not accepts(rest, text[cut + 1 :]) or accepts(grammar, text[:cut] + text[cut + 1 :])
    with pytest.raises(NotAPrefix):
        residual(grammar, "x")


@settings(max_examples=60, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=6),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
        max_leaves=8,
    ),
    st.data(),
)
def test_any_json_value_is_admitted_by_the_empty_schema_and_resumes_from_any_cut(value: Any, data: Any) -> None:
    grammar = compile_schema("{}")
    text = dump(value)
    assert accepts(grammar, text)
    cut = data.draw(st.integers(0, len(text)))
    assert accepts(residual(grammar, text[:cut]), text[cut:])


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "string", "format": "email"}, "email"),
        ({"type": "object", "patternProperties": {"a": {}}}, "patternProperties"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "string", "pattern": "(?=a)b"}, "pattern"),
        ({"type": "array", "maxItems": 5000}, "maxItems"),
    ],
)
def test_what_the_compiler_cannot_enforce_is_refused_by_name(schema: dict[str, Any], named: str) -> None:
    with pytest.raises(Unsupported, match=named):
        compile_schema(dump(schema))
    assert named in (SchemaGrammars().refusal(dump(schema)) or "")


def test_the_grammar_text_is_genai_ebnf_with_root_first() -> None:
    text = SchemaGrammars().ebnf(dump(PERSON), '{"name":"A')
    assert text.startswith("root ::= ")
    names = {line.split(" ::= ")[0] for line in text.splitlines()}
    used = {word for line in text.splitlines() for word in line.split(" ::= ")[1].split() if word[0].isalpha()}
    assert used <= names  # every rule it refers to is defined
