"""The MCP tools' `inputSchema`s (what `tools/list` publishes) as plain data: no server.

EXPECTED is today's hand-written schemas, pasted as literal data before they were generated
from the attrs argument classes (`ccx.schema`); the generated ones must stay equal (key order
aside), and the arguments those classes accept must be the ones the schemas publish.
Docs: https://modelcontextprotocol.io/specification/2025-11-25/server/tools
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from ccx.config import Settings
from ccx.errors import InvalidParams
from ccx.mcp_tools import TOOLS, ExecuteArgs, StartArgs, _launch
from ccx.params import ExecuteParams
from ccx.protocol import structure_params
from ccx.schema import doc, object_schema

_COMMAND = {"description": "argv as an array, or a string split like a POSIX shell (no shell "
            "runs unless shell is true)",
            "anyOf": [{"type": "string"},
                      {"type": "array", "items": {"type": "string"}, "minItems": 1}]}
_LAUNCH: dict[str, Any] = {
    "command": _COMMAND,
    "shell": {"type": "boolean", "default": False,
              "description": "run command (a string) with /bin/sh -c; the server may refuse"},
    "cwd": {"type": "string", "description": "working directory (must exist)"},
    "env": {"type": "object", "additionalProperties": {"type": "string"},
            "description": "variables added to the environment"},
    "timeout": {"type": "number", "exclusiveMinimum": 0,
                "description": "seconds; then the process group is cancelled (status timeout)"},
    "kill_grace": {"type": "number", "minimum": 0, "maximum": 300.0,
                   "description": "seconds between SIGTERM and SIGKILL when cancelling (at "
                   "most the server's CCX_MAX_KILL_GRACE)"},
}
_SESSION_ID = {"type": "string", "description": "from start or list_sessions"}
_ONLY_SESSION_ID = {"type": "object", "properties": {"session_id": _SESSION_ID},
                    "required": ["session_id"]}

EXPECTED: dict[str, dict[str, Any]] = {
    "execute": {
        "type": "object",
        "properties": {
            **_LAUNCH,
            "input": {"type": "string", "description": "written to stdin, then closed"},
            "tail_bytes": {"type": "integer", "minimum": 1, "maximum": 4194304,
                           "description": "bytes of each stream to return (the end)"}},
        "required": ["command"]},
    "start": {
        "type": "object",
        "properties": {
            **_LAUNCH,
            "stdin": {"type": "boolean", "default": False,
                      "description": "keep stdin open for send_input"},
            "tag": {"type": "string", "description": "label for list_sessions"},
            "linger": {"type": "number", "minimum": 0, "default": 0,
                       "description": "seconds the session survives without an MCP "
                       "connection (capped by the server's CCX_MAX_LINGER)"}},
        "required": ["command"]},
    "read_output": {
        "type": "object",
        "properties": {
            "session_id": _SESSION_ID,
            "stdout_offset": {"type": "integer", "minimum": 0, "default": 0},
            "stderr_offset": {"type": "integer", "minimum": 0, "default": 0},
            "wait_s": {"type": "number", "minimum": 0, "maximum": 600.0, "default": 0},
            "max_bytes": {"type": "integer", "minimum": 1, "maximum": 4194304,
                          "default": 65536}},
        "required": ["session_id"]},
    "send_input": {
        "type": "object",
        "properties": {"session_id": _SESSION_ID, "data": {"type": "string"},
                       "eof": {"type": "boolean", "default": False}},
        "required": ["session_id", "data"]},
    "pause": _ONLY_SESSION_ID,
    "resume": _ONLY_SESSION_ID,
    "cancel": _ONLY_SESSION_ID,
    "list_sessions": {
        "type": "object",
        "properties": {"tag": {"type": "string", "description": "only sessions with this tag"}}},
}


def _sorted(value: Any) -> Any:
    """*value* with every `required` list sorted: its order carries no meaning."""
    if isinstance(value, dict):
        return {k: sorted(v) if k == "required" else _sorted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def test_the_tools_are_the_same() -> None:
    assert list(TOOLS) == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_input_schema_is_what_tools_list_published_before(name: str) -> None:
    published = TOOLS[name].describe("2025-11-25")["inputSchema"]
    assert _sorted(published) == _sorted(EXPECTED[name])
    assert TOOLS[name].describe("2024-11-05")["inputSchema"] == published


@pytest.mark.parametrize("name", ["execute", "start"])
def test_kill_grace_publishes_this_servers_maximum(name: str) -> None:
    settings = Settings(state_dir="", max_kill_grace=12.5, kill_grace=1.0)
    published: Any = TOOLS[name].describe("2025-11-25", settings)["inputSchema"]
    expected = _sorted(EXPECTED[name])
    expected["properties"]["kill_grace"]["maximum"] = 12.5
    assert _sorted(published) == expected
    unchanged: Any = TOOLS[name].describe("2025-11-25")["inputSchema"]
    assert unchanged["properties"]["kill_grace"]["maximum"] == 300.0  # not changed in place



# --------------------------------------------------------------------------- the classes behind


@pytest.mark.parametrize("name", list(EXPECTED))
def test_the_arguments_a_schema_requires_are_what_its_class_requires(name: str) -> None:
    tool = TOOLS[name]
    samples = {"command": ["echo", "hi"], "session_id": "s1", "data": "x"}
    required = EXPECTED[name].get("required", [])
    structure_params({key: samples[key] for key in required}, tool.arguments)
    for missing in required:
        with pytest.raises(InvalidParams, match=f"params.{missing}"):
            structure_params({k: samples[k] for k in required if k != missing}, tool.arguments)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_published_default_is_the_classes_default(name: str) -> None:
    tool = TOOLS[name]
    samples = {"command": ["echo", "hi"], "session_id": "s1", "data": "x"}
    args = structure_params({k: samples[k] for k in EXPECTED[name].get("required", [])},
                            tool.arguments)
    for key, prop in EXPECTED[name]["properties"].items():
        if "default" in prop:
            assert getattr(args, key) == prop["default"], key
        elif key not in samples:
            assert getattr(args, key) in (None, {}), key  # left out: no value of its own


def test_start_hands_every_launch_argument_to_execute_params() -> None:
    args = structure_params({"command": "sleep 1", "shell": True, "cwd": "/tmp",
                             "env": {"A": "1"}, "timeout": 2.5, "kill_grace": 0.5,
                             "stdin": True, "tag": "t", "linger": 3}, StartArgs)
    params = _launch(args, stdin=args.stdin, tag=args.tag, linger=args.linger)
    assert params == ExecuteParams(command="sleep 1", shell=True, cwd="/tmp", env={"A": "1"},
                                   timeout=2.5, kill_grace=0.5, stdin=True, encoding="base64",
                                   tag="t", linger=3.0)


@pytest.mark.parametrize(("arguments", "field"), [
    ({"command": ["echo"], "timeout": "5"}, "timeout"),
    ({"command": ["echo"], "env": {"A": 1}}, "env"),
    ({"command": 7}, "command"),
    ({"command": ["echo"], "tail_bytes": 1.5}, "tail_bytes"),
])
def test_a_value_of_the_wrong_type_is_refused_naming_its_field(arguments: dict[str, Any],
                                                               field: str) -> None:
    with pytest.raises(InvalidParams, match=f"params.{field}"):
        structure_params(arguments, ExecuteArgs)


# --------------------------------------------------------------------------- ccx.schema


def test_a_type_without_a_json_schema_is_refused_when_the_schema_is_made() -> None:
    @attrs.frozen
    class Odd:
        when: complex

    with pytest.raises(TypeError, match="no JSON Schema"):
        object_schema(Odd)


def test_a_constraint_goes_to_the_union_branch_it_applies_to_or_is_refused() -> None:
    @attrs.frozen
    class Mixed:
        size: int | list[int] = attrs.field(metadata=doc(minimum=1, maxItems=3))
        name: str = attrs.field(default="x", metadata=doc(maximum=3))

    with pytest.raises(TypeError, match="name: maximum"):
        object_schema(Mixed)
    with pytest.raises(TypeError, match="not a constraint keyword"):
        doc(minimun=1)

    @attrs.frozen
    class Fine:
        size: int | list[int] = attrs.field(metadata=doc(minimum=1, maxItems=3))

    assert object_schema(Fine)["properties"]["size"] == {"anyOf": [
        {"type": "integer", "minimum": 1},
        {"type": "array", "items": {"type": "integer"}, "maxItems": 3}]}
