"""The errors a user can hit, each with its code from the contract (PROTOCOL.md section 4).

Inputs: a message and optional `data` where something goes wrong (policy, limits, state,
replay, forwarding). Outputs: `RpcError` and its family; `to_json()` gives the JSON-RPC
`error` object the dispatcher (`ccx.api`, `ccx.mcp`) answers with. Kept apart from
`ccx.protocol` (the codec) so that sessions, outboxes and buffers raise them without importing
the wire format (as h11 keeps `LocalProtocolError` apart from its connection state).
Docs: https://www.jsonrpc.org/specification#error_object
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class RpcError(Exception):
    """A JSON-RPC error with its code; anything else a handler raises becomes -32603."""

    code: ClassVar[int] = -32603

    def __init__(self, message: str, data: Mapping[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, object]:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = dict(self.data)
        return error


class ParseError(RpcError):
    code = -32700


class InvalidRequest(RpcError):
    code = -32600


class MethodNotFound(RpcError):
    code = -32601


class InvalidParams(RpcError):
    code = -32602


class InternalError(RpcError):
    code = -32603


class NotAllowed(RpcError):
    code = -32001


class SessionNotFound(RpcError):
    code = -32002


class LimitReached(RpcError):
    code = -32003


class InvalidState(RpcError):
    code = -32004


class SpawnFailed(RpcError):
    code = -32005


class ReplayUnavailable(RpcError):
    code = -32006


class NodeDraining(RpcError):
    """execute on a draining node (PROTOCOL.md 10); `data: {"node"}`."""

    code = -32007


class SessionLost(RpcError):
    """The session's node cannot be reached or has restarted (PROTOCOL.md 10);
    `data: {"node", "reason": "unreachable" | "restarted"}`. Never -32002 for such an id."""

    code = -32008


class PassedOn(RpcError):
    """An error the owning node answered to a forwarded request (PROTOCOL.md 10): passed on
    as it is, whatever its code (-32002 included)."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(message)
        self.passed_code = code
        self.passed_data = data

    def to_json(self) -> dict[str, object]:
        error: dict[str, object] = {"code": self.passed_code, "message": self.message}
        if self.passed_data is not None:
            error["data"] = self.passed_data
        return error
