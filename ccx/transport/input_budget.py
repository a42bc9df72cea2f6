"""Back-pressure on client input: bytes of input frames a connection has read and not yet
written to children (CCX_MAX_INPUT_BYTES, PROTOCOL.md section 6).

Inputs: parsed frames (`ccx.protocol.Frame`) and their size in bytes, from a transport's reader.
Outputs: `carries_input(frame)` (does it write to a child's stdin?) and an `InputBudget` the
reader awaits before it reads past an input frame that does not fit, so a client that sends
faster than the child reads waits, as on a pipe. Used by the WebSocket and stdio transports.
Docs: docs/protocol-notes.md (Memory limits); https://trio.readthedocs.io/en/stable/reference-core.html#trio.Event
"""

from __future__ import annotations

import attrs
import trio

from ccx.protocol import Frame, Request


@attrs.define(eq=False)
class InputBudget:
    """Bytes of input frames one connection has read and not yet answered."""

    limit_bytes: int
    pending_bytes: int = 0
    waiting: bool = False  # a reader waits for room (the client is being back-pressured)
    _released: trio.Event = attrs.field(factory=trio.Event)

    async def acquire(self, size: int) -> None:
        """Wait until *size* more bytes fit (a frame always fits when nothing is pending,
        so one larger than the limit still goes alone); then count them.

        **Cancellation**: safe; nothing is counted if cancelled while waiting.
        """
        try:
            while self.pending_bytes and self.pending_bytes + size > self.limit_bytes:
                self.waiting = True
                await self._released.wait()
        finally:
            self.waiting = False
        self.pending_bytes += size

    def release(self, size: int) -> None:
        self.pending_bytes -= size
        self._released.set()
        self._released = trio.Event()


def carries_input(frame: Frame) -> bool:
    """Whether a request of *frame* writes to a child's stdin (native or MCP)."""
    for item in frame.items:
        if not isinstance(item, Request):
            continue
        if item.method == "input":
            return True
        if item.method == "tools/call" and isinstance(item.params, dict) \
                and item.params.get("name") == "send_input":
            return True
    return False


async def _self_check() -> None:
    from ccx.protocol import parse_frame

    assert carries_input(parse_frame('{"jsonrpc":"2.0","id":1,"method":"input","params":{}}'))
    assert not carries_input(parse_frame('{"jsonrpc":"2.0","id":1,"method":"ping"}'))
    budget = InputBudget(limit_bytes=10)
    await budget.acquire(8)
    with trio.move_on_after(0.05) as waited:
        await budget.acquire(5)  # 8 + 5 > 10: waits for a release
    assert waited.cancelled_caught and budget.pending_bytes == 8
    budget.release(8)
    await budget.acquire(50)  # nothing pending: one frame over the limit still goes alone
    assert budget.pending_bytes == 50
    print("ccx.transport.input_budget: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
