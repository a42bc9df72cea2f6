"""Server-Sent Events streams that can be resumed: every event held until it is sent and, once
sent, kept within a byte budget, so a client that lost its connection asks again with
`Last-Event-ID` and gets exactly the events after it.

Inputs: JSON-RPC messages pushed by the task that produces them (waiting while `budget_bytes`
of them are unsent: back-pressure), a writer for the current HTTP response.
Outputs: SSE event bytes `id: <stream>:<seq>` + `data: <json>`, written by one follower at a
time (a newer follower takes over); `resume_after(seq)` re-queues what came after *seq*.
The held events are an `Outbox` (the same structure that replays `process.output` over
WebSocket, PROTOCOL.md section 8), on disk (`SpoolOutbox`) when the server spools output;
`forget()` deletes them.
Docs: https://html.spec.whatwg.org/multipage/server-sent-events.html
      https://modelcontextprotocol.io/specification/2025-11-25/basic/transports#resumability-and-redelivery
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import attrs
import trio

from ccx.errors import ReplayUnavailable
from ccx.outbox import Held, Outbox, SpoolOutbox
from ccx.owner import OwnerGone
from ccx.protocol import encode_utf8


@attrs.define(eq=False)
class EventStream:
    """The events of one SSE stream, held for replay; one follower writes them at a time."""

    id: str
    outbox: Outbox | SpoolOutbox  # spooled to disk when the server has a spool (ccx.spool)
    done: bool = False  # nothing more will be pushed
    closed: bool = False  # the session ended: pushers fail
    _changed: trio.Event = attrs.field(factory=trio.Event)
    _follower: trio.CancelScope | None = None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def push(self, message: dict[str, object]) -> None:
        """Hold one message as the next event; wait while `budget_bytes` are unsent.

        **Cancellation**: safe; nothing is held if cancelled while waiting.
        """
        frame = encode_utf8(message)
        while not self.outbox.has_room and not self.closed:
            await self._changed.wait()
        if self.closed:
            raise OwnerGone(self.id)
        await self.outbox.put(Held("event", frame, self.outbox.take_seq()))
        self._notify()

    def finish(self) -> None:
        self.done = True
        if isinstance(self.outbox, SpoolOutbox):
            self.outbox.spool.seal()  # nothing more is appended: no descriptor kept for it
        self._notify()

    def close(self) -> None:
        self.closed = self.done = True
        if self._follower is not None:
            self._follower.cancel()
        self._notify()

    def forget(self) -> None:
        """The stream is no longer kept for resumption: close it, let go of its events."""
        self.close()
        self.outbox.clear()

    @property
    def finished(self) -> bool:
        """Done and every event written out: a follower has nothing more to send."""
        return self.done and self.outbox.head() is None

    def resume_after(self, seq: int) -> None:
        """Queue every held event after *seq* again (the client's `Last-Event-ID`)."""
        if seq + 1 < self.outbox.first_seq:
            raise ReplayUnavailable(f"events after {self.id}:{seq} are no longer held",
                                    {"first_seq": self.outbox.first_seq})
        self.outbox.rewind(seq, [])
        self._notify()

    async def follow(self, write: Callable[[bytes], Awaitable[None]], *,
                     max_s: float) -> str:
        """Write held and new events until the stream is `finished`, or *max_s* passed
        (`paused`), or a newer follower took over or the session ended (`replaced`).

        **Cancellation**: an event is marked sent only after its write returned.
        """
        if self._follower is not None:
            self._follower.cancel()
        deadline = trio.current_time() + max_s if max_s > 0 else math.inf
        with trio.CancelScope() as scope:
            self._follower = scope
            try:
                while True:
                    held = self.outbox.head()
                    if held is None:
                        if self.done:
                            return "finished"
                        changed = self._changed
                        with trio.move_on_at(deadline):
                            await changed.wait()
                    if trio.current_time() >= deadline:
                        return "paused"
                    if held is not None:
                        await write(sse_event(f"{self.id}:{held.seq}", held.frame))
                        self.outbox.delivered()
                        self._notify()  # room for a waiting pusher
            finally:
                if self._follower is scope:
                    self._follower = None
        return "replaced"


def sse_event(event_id: str, data: bytes, *, retry_ms: int | None = None) -> bytes:
    """One SSE event; `data` is compact UTF-8 JSON (no newlines) or empty (a priming event)."""
    retry = f"retry: {retry_ms}\n" if retry_ms is not None else ""
    return f"id: {event_id}\n{retry}data: ".encode() + data + b"\n\n"


async def _self_check() -> None:
    stream = EventStream("r1", Outbox(1024))
    await stream.push({"n": 1})
    await stream.push({"n": 2})
    written: list[bytes] = []

    async def write(data: bytes) -> None:
        written.append(data)

    stream.finish()
    assert await stream.follow(write, max_s=0) == "finished"
    assert written == [b'id: r1:0\ndata: {"n":1}\n\n', b'id: r1:1\ndata: {"n":2}\n\n'], written
    stream.resume_after(0)  # the client saw event 0 only: event 1 again
    written.clear()
    assert await stream.follow(write, max_s=0) == "finished" and len(written) == 1
    print("ccx.transport.sse: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
