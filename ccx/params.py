"""The typed params of each method (PROTOCOL.md section 2), as attrs classes with validators.

Inputs: none (types only); `ccx.protocol.structure_params` builds them from a request's JSON
params with one cattrs converter. Outputs: `ExecuteParams` and the other params classes, which
the methods layer hands to the session manager (so the manager never sees JSON).
Unknown extra params are ignored (PROTOCOL.md section 2).
Docs: https://www.attrs.org/en/stable/api.html#attrs.frozen
      https://www.attrs.org/en/stable/init.html#validators
"""

from __future__ import annotations

from typing import Literal

import attrs

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
class ExecuteParams:
    command: str | list[str]
    shell: bool = False
    cwd: str | None = None
    env: dict[str, str] = attrs.Factory(dict)
    timeout: float | None = None
    stdin: bool = False
    encoding: Encoding = "utf-8"
    kill_grace: float | None = None
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
