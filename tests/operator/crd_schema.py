"""Check objects against a CRD's own schema the way the API server does: default, validate, run CEL rules.

- defaulting: ``default`` values fill absent fields, top-down (a defaulted object gets its own defaults);
- validation: the OpenAPI v3 schema through ``jsonschema`` (Draft 4-ish keywords), with unknown fields
  rejected as ``kubectl apply``'s strict field validation does;
- ``x-kubernetes-validations``: every CEL rule, evaluated with cel-python where its node is present.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

# NOTE: the API server's defaulting and the structural-schema translation are the operator's own (one copy);
# this module adds what only the server does: strict validation of whole objects and the CEL rules.
from tandem.operator.spec import apply_defaults, crd_json_schema

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "tandem.dev_llmdeployments.yaml"


def load_crd(path: Path = CRD_PATH) -> dict[str, Any]:
    """The CRD manifest as a dict."""
    return yaml.safe_load(path.read_text())


def storage_schema(crd: Mapping[str, Any]) -> dict[str, Any]:
    """The openAPIV3Schema of the storage version."""
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return version["schema"]["openAPIV3Schema"]


def _cel_errors(schema: Mapping[str, Any], value: Any, path: str, env: celpy.Environment) -> list[str]:
    errors = []
    for rule in schema.get("x-kubernetes-validations") or []:
        program = env.program(env.compile(rule["rule"]))
        result = program.evaluate({"self": celpy.json_to_cel(value)})
        if isinstance(result, Exception) or not bool(result):
            errors.append(f"{path}: {rule.get('message') or rule['rule']}")
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                errors += _cel_errors(sub, value[key], f"{path}.{key}", env)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            errors += _cel_errors(schema["items"], item, f"{path}[{i}]", env)
    return errors


def check(obj: Mapping[str, Any], crd: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """(the defaulted object, every schema and CEL error message); no errors means the API server accepts it."""
    crd = crd or load_crd()
    schema = storage_schema(crd)
    defaulted = apply_defaults(schema, obj)
    validator = jsonschema.Draft7Validator(crd_json_schema(schema))
    errors = [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
              for e in validator.iter_errors(defaulted)]
    if not errors:  # the API server runs CEL only on schema-valid objects
        errors = _cel_errors(schema, defaulted, "<root>", celpy.Environment())
    return defaulted, errors
