"""The layout of ``pyvirtio bench --json``, as a JSON Schema (draft 2020-12 keywords,
a small subset) and a validator for that subset, so that no dependency is needed
(``jsonschema.validate(doc, SCHEMA)`` accepts the same documents where it is installed).

Keywords understood: ``type`` (a name or a list of names), ``properties``,
``required``, ``additionalProperties`` (a schema), ``items``, ``minItems``,
``maxItems``, ``enum``, ``minimum``, ``const``.

    python -m pyvirtio.bench.schema FILE.json     # exit 0 when FILE validates
"""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["SCHEMA", "SchemaError", "errors", "validate"]

_NUM = {"type": "number"}
_STR = {"type": "string"}
_SUMMARY = {"type": ["number", "null"]}

FIGURE = {
    "type": "object",
    "required": ["level", "name", "unit", "higher_is_better", "samples", "baseline",
                 "baseline_samples", "note", "median", "ratio", "baseline_median"],
    "properties": {
        "level": _STR, "name": _STR, "unit": _STR,
        "higher_is_better": {"type": "boolean"},
        "samples": {"type": "array", "items": _NUM, "minItems": 1},
        "baseline": {"type": ["string", "null"]},
        "baseline_samples": {"type": "array", "items": _NUM},
        "note": _STR,
        "median": _NUM, "ratio": _SUMMARY, "baseline_median": _SUMMARY,
    },
}

#: version of the JSON layout ``pyvirtio bench --json`` writes
SCHEMA_VERSION = 1

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "pyvirtio bench --json",
    "type": "object",
    "required": ["schema", "environment", "settings", "seconds", "figures", "skipped",
                 "vs_vhost_net"],
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "environment": {
            "type": "object",
            "required": ["cpu", "cores", "kernel", "machine", "python", "packages", "tools",
                         "root", "loadavg", "loadavg_end", "time"],
            "properties": {
                "cpu": _STR, "cores": {"type": "integer", "minimum": 1}, "kernel": _STR,
                "machine": _STR, "python": _STR, "root": {"type": "boolean"},
                "packages": {"type": "object",
                             "required": ["vqcore", "numpy"],
                             "additionalProperties": {"type": ["string", "null"]}},
                "tools": {"type": "object",
                          "additionalProperties": {"type": ["string", "null"]}},
                "loadavg": {"type": "array", "items": _NUM, "minItems": 3, "maxItems": 3},
                "loadavg_end": {"type": "array", "items": _NUM, "minItems": 3, "maxItems": 3},
                "time": _STR,
            },
        },
        "settings": {"type": "object", "required": ["quick", "tiny"],
                     "properties": {"quick": {"type": "boolean"},
                                    "tiny": {"type": "boolean"}}},
        "seconds": {"type": "object", "required": ["total"],
                    "additionalProperties": {"type": "number", "minimum": 0}},
        "figures": {"type": "array", "items": FIGURE},
        "skipped": {"type": "array", "items": {
            "type": "object", "required": ["level", "part", "reason"],
            "properties": {"level": _STR, "part": _STR, "reason": _STR}}},
        "vs_vhost_net": {"type": "array", "items": {
            "type": "object",
            "required": ["comparison", "published", "ours", "userspace_measured",
                         "like_for_like"],
            "additionalProperties": _STR}},
    },
}


class SchemaError(ValueError):
    """A document does not match :data:`SCHEMA`; ``.errors`` lists every mismatch."""

    def __init__(self, problems: list[str]) -> None:
        self.errors = problems
        super().__init__("; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def _check(value: Any, schema: dict[str, Any], path: str, out: list[str]) -> None:
    if "const" in schema and value != schema["const"]:
        out.append(f"{path}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[n](value) for n in names):
            out.append(f"{path}: {type(value).__name__} is not {' or '.join(names)}")
            return
    if isinstance(value, (int, float)) and not isinstance(value, bool) \
            and "minimum" in schema and value < schema["minimum"]:
        out.append(f"{path}: {value} < {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                out.append(f"{path}: missing {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, v in value.items():
            if key in props:
                _check(v, props[key], f"{path}.{key}", out)
            elif isinstance(extra, dict):
                _check(v, extra, f"{path}.{key}", out)
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            out.append(f"{path}: {len(value)} items, at least {schema['minItems']} expected")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            out.append(f"{path}: {len(value)} items, at most {schema['maxItems']} expected")
        if "items" in schema:
            for i, v in enumerate(value):
                _check(v, schema["items"], f"{path}[{i}]", out)


def errors(doc: Any, schema: dict[str, Any] = SCHEMA) -> list[str]:
    """Every way ``doc`` departs from ``schema`` (empty: it validates)."""
    out: list[str] = []
    _check(doc, schema, "$", out)
    return out


def validate(doc: Any, schema: dict[str, Any] = SCHEMA) -> None:
    """:class:`SchemaError` unless ``doc`` validates."""
    problems = errors(doc, schema)
    if problems:
        raise SchemaError(problems)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m pyvirtio.bench.schema FILE.json\n")
        return 2
    with open(args[0]) as fh:
        problems = errors(json.load(fh))
    for p in problems:
        sys.stderr.write(p + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
