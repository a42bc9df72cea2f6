"""JSON Schemas generated from attrs classes, so each argument is written once: in its class.

Inputs: an attrs class whose fields are typed with bool, int, float, str, `list[X]`,
`dict[str, X]` and unions of them (`X | None` = may be left out), whose metadata may hold a
description and JSON Schema constraints (minimum, maxItems...), made by `doc(...)` (the way
`ccx.config.setting` keeps a setting's help line in its field).
Outputs: `object_schema(cls)`, the schema of a JSON object that structures into *cls* (what an
MCP tool's `inputSchema` is): a property per field, "default" for a plain default, "required"
for fields without one. A type it cannot express raises `TypeError` (at import, not at run).
Docs: https://www.attrs.org/en/stable/api.html#attrs.field (metadata)
      https://json-schema.org/understanding-json-schema/reference
"""

from __future__ import annotations

import types
import typing
from typing import Any

import attrs

_SCALARS: dict[object, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}
# The JSON types each constraint keyword applies to (it goes to the matching anyOf branch).
_APPLIES_TO: dict[str, frozenset[str]] = {
    **dict.fromkeys(("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"),
                    frozenset({"number", "integer"})),
    **dict.fromkeys(("minItems", "maxItems"), frozenset({"array"})),
    **dict.fromkeys(("minLength", "maxLength"), frozenset({"string"})),
}


def doc(description: str | None = None, **constraints: Any) -> dict[str, Any]:
    """The metadata of an attrs field that is also a JSON Schema property: its *description*
    and *constraints* (JSON Schema keywords, e.g. `minimum=0`, `minItems=1`), as in
    `attrs.field(default=0, metadata=doc("seconds", minimum=0))`. Type and default come from
    the field itself."""
    unknown = set(constraints) - set(_APPLIES_TO)
    if unknown:
        raise TypeError(f"not a constraint keyword: {', '.join(sorted(unknown))}")
    metadata: dict[str, Any] = {"schema": constraints}
    if description is not None:
        metadata["description"] = description
    return metadata


def object_schema(cls: type) -> dict[str, Any]:
    """The JSON Schema of an object holding *cls*'s fields (see the module docstring)."""
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required = []
    for field in attrs.fields(cls):
        properties[field.name] = _property(field, hints[field.name])
        if field.default is attrs.NOTHING:
            required.append(field.name)
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _property(field: attrs.Attribute[Any], hint: object) -> dict[str, Any]:
    schema = _constrained(_of_type(hint), field.metadata.get("schema", {}), field.name)
    if "description" in field.metadata:
        schema["description"] = field.metadata["description"]
    default = field.default
    factory = getattr(default, "factory", None)  # attrs.Factory: a value made per call
    if default is not attrs.NOTHING and default is not None and not callable(factory):
        schema["default"] = default
    return schema


def _of_type(hint: object) -> dict[str, Any]:
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return {"type": "array", "items": _of_type(args[0])}
    if origin is dict and args[0] is str:
        return {"type": "object", "additionalProperties": _of_type(args[1])}
    if origin in (typing.Union, types.UnionType):
        branches = [arg for arg in args if arg is not types.NoneType]  # None: may be left out
        if len(branches) == 1:
            return _of_type(branches[0])
        return {"anyOf": [_of_type(branch) for branch in branches]}
    raise TypeError(f"no JSON Schema for {hint!r}")


def _constrained(schema: dict[str, Any], constraints: dict[str, Any],
                 name: str) -> dict[str, Any]:
    """*schema* with each constraint put where it applies: on it, or on its anyOf branches
    of the right JSON type (`minItems` on the array branch of `str | list[str]`)."""
    if not constraints:
        return schema
    branches = schema.get("anyOf", [schema])
    for key, value in constraints.items():
        fitting = [b for b in branches if b.get("type") in _APPLIES_TO[key]]
        if not fitting:
            raise TypeError(f"{name}: {key} does not apply to {schema}")
        for branch in fitting:
            branch[key] = value
    return schema


if __name__ == "__main__":
    @attrs.frozen
    class _Example:
        command: str | list[str] = attrs.field(metadata=doc("argv or a string", minItems=1))
        timeout: float | None = attrs.field(default=None,
                                            metadata=doc("seconds", exclusiveMinimum=0))
        env: dict[str, str] = attrs.Factory(dict)
        shell: bool = False

    example = object_schema(_Example)
    assert example == {"type": "object", "required": ["command"], "properties": {
        "command": {"description": "argv or a string", "anyOf": [
            {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "description": "seconds"},
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "shell": {"type": "boolean", "default": False}}}, example
    try:
        doc(minimun=0)
    except TypeError:
        pass
    else:
        raise AssertionError("a misspelt constraint must be refused")
    print("ccx.schema: PASS")
