"""Who receives a session's events: the `Owner` protocol (a sink) and its one error, `OwnerGone`.

Factored out of `ccx.session` (as structlog keeps its exceptions apart) so that a transport or
an MCP buffer that delivers messages, or raises `OwnerGone`, imports this small module and not
the whole session machinery.

Inputs: none (types only).  Outputs: `Owner` (what a connection implements: `send_event` for
a session's events, each sink encoding them its own way; `send_frame` for native frames
relayed unparsed from another node, `ccx.cluster`), `OwnerGone` (raised by an owner that
can no longer deliver).
Docs: https://typing.python.org/en/latest/spec/protocol.html
"""

from __future__ import annotations

from typing import Protocol

from ccx.events import Event


class OwnerGone(Exception):
    """The owner (a connection) can no longer deliver messages."""


class Owner(Protocol):
    """Who receives a session's notifications: a connection, in practice."""

    async def send_frame(self, frame: bytes) -> None:
        """Deliver one native JSON-RPC message already encoded (UTF-8 JSON); wait while the
        peer is slow; raise `OwnerGone` if closed."""

    async def send_event(self, event: Event) -> None:
        """Deliver one event of a session it owns or watches (`ccx.events`); wait while the
        peer is slow; raise `OwnerGone` if closed. Cancel-safe: taken whole or not at all."""
