"""Who receives a session's notifications: the `Owner` protocol and its one error, `OwnerGone`.

Factored out of `ccx.session` (as structlog keeps its exceptions apart) so that a transport or
an MCP buffer that delivers messages, or raises `OwnerGone`, imports this small module and not
the whole session machinery.

Inputs: none (types only).  Outputs: `Owner` (what a connection implements: `send_message`,
`send_frame`), `OwnerGone` (raised by an owner that can no longer deliver).
Docs: https://typing.python.org/en/latest/spec/protocol.html
"""

from __future__ import annotations

from typing import Protocol


class OwnerGone(Exception):
    """The owner (a connection) can no longer deliver messages."""


class Owner(Protocol):
    """Who receives a session's notifications: a connection, in practice."""

    async def send_message(self, message: dict[str, object]) -> None:
        """Deliver one message; wait while the peer is slow; raise `OwnerGone` if closed."""

    async def send_frame(self, frame: bytes) -> None:
        """Deliver one message already encoded (`encode_utf8`), as `send_message` does."""
