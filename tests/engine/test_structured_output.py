"""Structured output: the request parser (torch-free) and the engine's grammar-constrained sampling."""

from __future__ import annotations

import pytest

from tandem.protocol.structured_output import StructuredOutputSpec, parse_structured_output

SCHEMA = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}


# ---- parsing the request fields ------------------------------------------------------------------
@pytest.mark.parametrize("body, kind", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}},
     "json"),
    ({"response_format": {"type": "json_object"}}, "json_object"),
    ({"structured_outputs": {"json": SCHEMA}}, "json"),
    ({"structured_outputs": {"regex": "[0-9]+"}}, "regex"),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice"),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "grammar"),
    ({"structured_outputs": {"json_object": True}}, "json_object"),
    ({"guided_json": SCHEMA}, "json"),
    ({"guided_json": '{"type": "object"}'}, "json"),
    ({"guided_regex": "a|b"}, "regex"),
    ({"guided_choice": ["a", "b"]}, "choice"),
    ({"guided_grammar": 'root ::= "a"'}, "grammar"),
])
def test_parse_each_spelling(body, kind):
    spec = parse_structured_output(body)
    assert spec is not None and spec.kind == kind


def test_parse_nothing_asked():
    assert parse_structured_output({}) is None
    assert parse_structured_output({"response_format": {"type": "text"}, "guided_json": None}) is None
    assert parse_structured_output({"structured_outputs": {"json_object": False}}) is None


def test_spec_is_hashable_and_canonical():
    a = StructuredOutputSpec("json", {"type": "object", "b": 1})
    b = StructuredOutputSpec("json", '{"type": "object",  "b": 1}', field="guided_json")
    assert a == b and hash(a) == hash(b)  # one compiled grammar for equal schemas, whatever the field
    assert list(a.schema) == ["type", "b"]  # key order is kept: properties are generated in it
    assert StructuredOutputSpec("choice", ["x", "y"]).value == ("x", "y")


@pytest.mark.parametrize("body, field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": "y"}}},
     "response_format.json_schema.strict"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format"),
    ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": "yes"}}, "structured_outputs.choice"),
    ({"structured_outputs": {"choice": ["a", 3]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"json": SCHEMA, "regex": "a"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object"),
    ({"structured_outputs": []}, "structured_outputs"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_grammar": 5}, "guided_grammar"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
])
def test_parse_errors_name_the_field(body, field):
    with pytest.raises(ValueError) as info:
        parse_structured_output(body)
    assert str(info.value).startswith(field + ":"), str(info.value)


def test_protocol_module_imports_neither_torch_nor_xgrammar():
    import subprocess
    import sys

    code = ("import sys, tandem.protocol.structured_output; "
            "print(sorted(m for m in ('torch', 'xgrammar') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
