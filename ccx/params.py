"""The typed params of each method (PROTOCOL.md section 2), as attrs classes with validators.

Inputs: none (types only); `ccx.protocol.structure_params` builds them from a request's JSON
params with one cattrs converter. Outputs: `ExecuteParams` and the other params classes, which
the methods layer hands to the session manager (so the manager never sees JSON);
`LaunchParams`, the launch fields `execute` shares with the MCP tools, with the description
and JSON Schema constraints of each (the MCP `inputSchema`s are made from them).
Unknown extra params are ignored (PROTOCOL.md section 2).
Docs: https://www.attrs.org/en/stable/api.html#attrs.frozen
      https://www.attrs.org/en/stable/init.html#validators
"""

from __future__ import annotations

from typing import Literal

import attrs

from ccx.config import Settings
from ccx.schema import doc

Encoding = Literal["utf-8", "base64"]
ControlType = Literal["PAUSE", "RESUME", "CANCEL"]


MAX_WINDOW_CELLS = 0xFFFF  # the kernel's struct winsize holds unsigned shorts


def _window_cells(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= MAX_WINDOW_CELLS:
        raise ValueError(f"{attribute.name} must be between 1 and {MAX_WINDOW_CELLS}")


@attrs.frozen
class PtySize:
    """A terminal window size in character cells (PROTOCOL.md section 9)."""

    cols: int = attrs.field(validator=_window_cells)
    rows: int = attrs.field(validator=_window_cells)


@attrs.frozen
class LaunchParams:
    """What starts a process group, shared by `execute` and the MCP tools that start one:
    each field's description and constraints are also its JSON Schema (`ccx.schema`)."""

    command: str | list[str] = attrs.field(metadata=doc(
        "argv as an array, or a string split like a POSIX shell (no shell runs unless shell "
        "is true)", minItems=1))
    shell: bool = attrs.field(default=False, metadata=doc(
        "run command (a string) with /bin/sh -c; the server may refuse"))
    cwd: str | None = attrs.field(default=None, metadata=doc("working directory (must exist)"))
    env: dict[str, str] = attrs.field(factory=dict, metadata=doc(
        "variables added to the environment"))
    timeout: float | None = attrs.field(default=None, metadata=doc(
        "seconds; then the process group is cancelled (status timeout)", exclusiveMinimum=0))
    kill_grace: float | None = attrs.field(default=None, metadata=doc(
        "seconds between SIGTERM and SIGKILL when cancelling (at most the server's "
        "CCX_MAX_KILL_GRACE)", minimum=0,
        maximum=attrs.fields(Settings).max_kill_grace.default))  # a server publishes its own


@attrs.frozen
class ExecuteParams(LaunchParams):
    stdin: bool = False
    encoding: Encoding = "utf-8"
    linger: float = 0.0
    tag: str | None = None
    pty: PtySize | None = None


@attrs.frozen
class ControlParams:
    type: ControlType
    session_id: str | None = None


@attrs.frozen
class InputParams:
    session_id: str
    data: str
    encoding: Encoding = "utf-8"
    eof: bool = False


@attrs.frozen
class SessionParams:
    session_id: str


@attrs.frozen
class DrainParams:
    timeout: float | None = attrs.field(default=None, validator=attrs.validators.optional(
        attrs.validators.ge(0)))
    undo: bool = False


@attrs.frozen
class SessionsParams:
    tag: str | None = None
    scope: Literal["node", "cluster"] = "node"  # PROTOCOL.md 10: "cluster" asks every node


@attrs.frozen
class ResizeParams:
    session_id: str
    cols: int = attrs.field(validator=_window_cells)
    rows: int = attrs.field(validator=_window_cells)


@attrs.frozen
class AttachParams:
    session_id: str
    since_seq: int = -1


@attrs.frozen
class NoParams:
    pass
