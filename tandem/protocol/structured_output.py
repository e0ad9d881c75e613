"""Structured output requests: what a client asked the completion to conform to, parsed once at the edge.

Three spellings reach a server: OpenAI's ``response_format``, vLLM's ``structured_outputs`` object and vLLM's
older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` fields. All become one
``StructuredOutputSpec``; the engine compiles it into a token mask (``tandem/engine/structured_output/``).

NOTE: torch-free and xgrammar-free. Only the shape is checked here; whether a schema, regex or grammar
compiles is decided by the engine, which names ``spec.field`` in its error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Literal

StructuredOutputKind = Literal["json", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json", "json_object", "regex", "choice", "grammar")

# vLLM's older top-level fields, each naming the spec kind it carries.
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}
# Keys of vLLM's ``structured_outputs`` object that we honour (``json_object`` takes a boolean).
_STRUCTURED_OUTPUTS_KEYS = ("json", "regex", "choice", "grammar", "json_object")
_BACKENDS = ("auto", "xgrammar")


@dataclass(frozen=True, slots=True)
class StructuredOutputSpec:
    """What the completion must conform to.

    ``value`` by kind: ``json`` a JSON schema (a dict, or its JSON text; stored as compact JSON text so the
    spec is hashable and two equal schemas share one compiled grammar), ``json_object`` None, ``regex`` and
    ``grammar`` (EBNF, GBNF-style as xgrammar reads it) a string, ``choice`` the allowed strings (stored as a
    tuple). ``field`` names the request field it came from, for error messages; it is not part of equality.
    """

    kind: StructuredOutputKind
    value: Any = None
    field: str = dc_field(default="", compare=False)

    def __post_init__(self) -> None:
        where = self.field or f"structured_outputs.{self.kind}"
        if self.kind not in KINDS:
            raise ValueError(f"{where}: unknown structured output kind {self.kind!r}; expected one of {KINDS}")
        object.__setattr__(self, "value", _normalise(self.kind, self.value, where))
        if not self.field:
            object.__setattr__(self, "field", where)

    @property
    def schema(self) -> dict | None:
        """The JSON schema as a dict (``json`` specs only)."""
        return json.loads(self.value) if self.kind == "json" else None


def _normalise(kind: str, value: Any, where: str) -> Any:
    """Check ``value``'s shape for ``kind`` and return it in hashable form; ValueError names ``where``."""
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg} at position {exc.pos})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{where}: a JSON schema must be an object, got {type(value).__name__}")
        # NOTE: key order is kept: it is the order the properties are generated in.
        return json.dumps(value, separators=(",", ":"))
    if kind == "json_object":
        if value is not None:
            raise ValueError(f"{where}: json_object takes no value")
        return None
    if kind == "choice":
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{where}: must be a non-empty list of strings")
        if any(not isinstance(c, str) or not c for c in value):
            raise ValueError(f"{where}: every choice must be a non-empty string")
        return tuple(value)
    if not isinstance(value, str) or not value.strip():  # regex, grammar
        raise ValueError(f"{where}: must be a non-empty string")
    return value


def parse_structured_output(body: dict) -> StructuredOutputSpec | None:
    """The structured output a request body asks for, or None (none asked, or ``response_format`` text).

    Reads ``response_format``, ``structured_outputs`` and the ``guided_*`` fields; null fields count as
    absent. Asking in more than one place is an error. Raises ValueError whose message starts with the
    offending field's name (e.g. ``response_format.json_schema.schema: ...``).
    """
    _check_backend(body)
    if body.get("guided_whitespace_pattern") is not None:
        raise ValueError("guided_whitespace_pattern: not supported")
    found: list[tuple[str, StructuredOutputSpec | None]] = []
    if body.get("response_format") is not None:
        found.append(("response_format", _from_response_format(body["response_format"])))
    if body.get("structured_outputs") is not None:
        found.append(("structured_outputs", _from_structured_outputs(body["structured_outputs"])))
    for name, kind in _GUIDED_FIELDS.items():
        if body.get(name) is not None:
            found.append((name, StructuredOutputSpec(kind, body[name], field=name)))
    if body.get("guided_json_object") is not None:
        found.append(("guided_json_object", _json_object_flag(body["guided_json_object"], "guided_json_object")))
    asked = [(name, spec) for name, spec in found if spec is not None]
    if len(asked) > 1:
        names = ", ".join(name for name, _ in asked)
        raise ValueError(f"{asked[1][0]}: only one structured output may be given, got {names}")
    return asked[0][1] if asked else None


def _check_backend(body: dict) -> None:
    backend = body.get("guided_decoding_backend")
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"guided_decoding_backend: must be one of {_BACKENDS}, got {backend!r}")


def _from_response_format(rf: Any) -> StructuredOutputSpec | None:
    if not isinstance(rf, dict):
        raise ValueError("response_format: must be an object")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputSpec("json_object", field="response_format")
    if kind != "json_schema":
        raise ValueError(f"response_format.type: must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise ValueError("response_format.json_schema: required, an object with 'name' and 'schema'")
    name = js.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("response_format.json_schema.name: required, a non-empty string")
    strict = js.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ValueError(f"response_format.json_schema.strict: must be a boolean, got {strict!r}")
    if js.get("schema") is None:
        raise ValueError("response_format.json_schema.schema: required")
    # NOTE: strict or not, the output is constrained to the schema (as vLLM does); strict only matters to
    # OpenAI's own server, which refuses schemas it cannot enforce.
    return StructuredOutputSpec("json", js["schema"], field="response_format.json_schema.schema")


def _from_structured_outputs(so: Any) -> StructuredOutputSpec | None:
    if not isinstance(so, dict):
        raise ValueError("structured_outputs: must be an object")
    for key, value in so.items():
        if key not in _STRUCTURED_OUTPUTS_KEYS and value is not None and value is not False:
            raise ValueError(f"structured_outputs.{key}: not supported; supported: {', '.join(_STRUCTURED_OUTPUTS_KEYS)}")
    specs = []
    for key in _STRUCTURED_OUTPUTS_KEYS:
        value = so.get(key)
        if value is None:
            continue
        if key == "json_object":
            spec = _json_object_flag(value, "structured_outputs.json_object")
        else:
            spec = StructuredOutputSpec(key, value, field=f"structured_outputs.{key}")  # type: ignore[arg-type]
        if spec is not None:
            specs.append((key, spec))
    if len(specs) > 1:
        raise ValueError(f"structured_outputs.{specs[1][0]}: only one of {', '.join(k for k, _ in specs)} may be given")
    return specs[0][1] if specs else None


def _json_object_flag(value: Any, where: str) -> StructuredOutputSpec | None:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: must be a boolean, got {value!r}")
    return StructuredOutputSpec("json_object", field=where) if value else None
