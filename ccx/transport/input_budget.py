"""Back-pressure on client input: bytes of input frames a connection has read and not yet
written to children (CCX_MAX_INPUT_BYTES, PROTOCOL.md section 6).

Inputs: parsed frames (`ccx.protocol.Frame`) and their size in bytes, from a transport's reader.
Outputs: `carries_input(frame)` (does it write to a child's stdin?) and an `InputBudget` the
reader awaits before it reads past an input frame that does not fit, so a client that sends
faster than the child reads waits, as on a pipe. Used by the WebSocket and stdio transports.
While the reader waits it reads nothing, so a peer's close behind its unread input would go
unseen: `acquire_unless_hung_up` also watches the peer's descriptors (socket; stdin, stdout)
for a hang-up (`hung_up`: poll(2) without reading) and gives up when one comes.
Docs: docs/protocol-notes.md (Memory limits); https://trio.readthedocs.io/en/stable/reference-core.html#trio.Event
      https://man7.org/linux/man-pages/man2/poll.2.html (POLLRDHUP, POLLHUP, POLLERR)
"""

from __future__ import annotations

import select
from collections.abc import Sequence
from typing import Protocol

import attrs
import trio

from ccx.protocol import Frame, Request

HANGUP_POLL_S = 0.5  # while a reader waits for input room: how often its peer is checked
# Peer FIN (POLLRDHUP, seen even with unread data before it), RST or a pipe's writer gone
# (POLLHUP), a pipe's reader gone (POLLERR on its write end).
HANGUP_EVENTS = select.POLLRDHUP | select.POLLHUP | select.POLLERR


class HasFileno(Protocol):
    def fileno(self) -> int: ...


def hung_up(peers: Sequence[int | HasFileno]) -> bool:
    """Whether the other side of one of *peers* (descriptors or sockets) hung up, without
    reading; a descriptor closed here counts as hung up too."""
    poller = select.poll()
    try:
        for peer in peers:
            poller.register(peer, HANGUP_EVENTS)
    except (OSError, ValueError):  # closed here already
        return True
    return any(events & (HANGUP_EVENTS | select.POLLNVAL) for _, events in poller.poll(0))


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

    async def acquire_unless_hung_up(self, size: int, peers: Sequence[int | HasFileno]) -> bool:
        """`acquire(size)`, unless one of *peers* hangs up first (checked every
        `HANGUP_POLL_S`, only while waiting: no event exists for it without reading); then
        False, with nothing counted.

        **Cancellation**: safe; nothing is counted if cancelled while waiting.
        """
        if not peers:
            await self.acquire(size)
            return True
        gone = acquired = False
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                nonlocal gone
                while not hung_up(peers):
                    await trio.sleep(HANGUP_POLL_S)
                gone = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await self.acquire(size)
            acquired = True
            nursery.cancel_scope.cancel()
        if gone and acquired:
            self.release(size)
        return not gone

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
    import os

    read_end, write_end = os.pipe()
    assert not hung_up([read_end, write_end])
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            async def hang_up_soon() -> None:
                await trio.sleep(0.05)
                os.close(write_end)  # the writer goes: POLLHUP on the read end

            nursery.start_soon(hang_up_soon)
            assert not await budget.acquire_unless_hung_up(10, [read_end])
    assert budget.pending_bytes == 50 and hung_up([read_end])
    os.close(read_end)
    print("ccx.transport.input_budget: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
