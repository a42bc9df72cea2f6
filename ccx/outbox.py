"""A session's held notifications: unsent ones in order, and recently sent output for replay.

Inputs: notifications encoded once by the session, as the UTF-8 JSON that goes on the wire
(output carries a `seq`).
Outputs: the next frame to deliver to the current owner; `rewind()` to re-deliver from a
given seq to a new owner (PROTOCOL.md section 8); room checks that turn into back-pressure.
Two budgets (`budget_bytes` each) of the raw output bytes the held frames carry, as
PROTOCOL.md section 8 counts them: `pending` (not yet delivered; when full, the session stops
reading the child) and `sent` (delivered; oldest evicted first). Frames are kept encoded, no
`str` or dict copies, so memory is the budgets times the frame's expansion over its raw bytes
(about 1.05 for stream-json text, 4/3 for base64, at worst 6 for text of control characters
escaped as backslash-u-00XX), plus one frame each.
Pure data, no I/O, no trio. Docs: ../shared/PROTOCOL.md section 8.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

import attrs

from ccx.protocol import ReplayUnavailable


@attrs.frozen
class Held:
    """One notification exactly as it goes on the wire; output has a `seq`."""

    method: str
    frame: bytes  # the whole JSON-RPC notification: compact JSON, UTF-8 (`encode_utf8`)
    seq: int | None = None
    raw_bytes: int | None = None  # output bytes it carries; None: count the frame itself

    @property
    def is_output(self) -> bool:
        return self.seq is not None

    @property
    def size(self) -> int:
        """Bytes charged to a budget: the raw output carried (or the whole frame when that
        is not given); control notifications are not charged."""
        if self.seq is None:
            return 0
        return len(self.frame) if self.raw_bytes is None else self.raw_bytes


@attrs.define
class Outbox:
    budget_bytes: int
    pending: collections.deque[Held] = attrs.field(factory=collections.deque)
    pending_bytes: int = 0
    sent: collections.deque[Held] = attrs.field(factory=collections.deque)
    sent_bytes: int = 0
    next_seq: int = 0

    @property
    def has_room(self) -> bool:
        """Whether more output may be queued; False means: stop reading the child."""
        return self.pending_bytes < self.budget_bytes

    def push(self, held: Held) -> None:
        self.pending.append(held)
        self.pending_bytes += held.size

    def take_seq(self) -> int:
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        return seq

    def head(self) -> Held | None:
        return self.pending[0] if self.pending else None

    def delivered(self) -> Held:
        """The head went out: keep it (if output) among the recently sent."""
        held = self.pending.popleft()
        self.pending_bytes -= held.size
        if held.is_output:
            self._remember(held)
        return held

    def _remember(self, held: Held) -> None:
        self.sent.append(held)
        self.sent_bytes += held.size
        while self.sent_bytes > self.budget_bytes and len(self.sent) > 1:
            self.sent_bytes -= self.sent.popleft().size

    def forget_sent(self) -> int:
        """Drop the recently sent output kept for replay; return the raw bytes it counted."""
        freed = self.sent_bytes
        self.sent.clear()
        self.sent_bytes = 0
        return freed

    @property
    def first_seq(self) -> int:
        """The oldest seq still held (sent or pending), or `next_seq` if none is."""
        for queue in (self.sent, self.pending):
            for held in queue:
                if held.seq is not None:
                    return held.seq
        return self.next_seq

    def check_replay(self, since_seq: int) -> None:
        """Raise -32006 if output after *since_seq* is no longer held (-1: never raises)."""
        if since_seq >= 0 and since_seq + 1 < self.first_seq:
            raise ReplayUnavailable(
                f"output after seq {since_seq} is no longer held; oldest held is "
                f"{self.first_seq}", {"first_seq": self.first_seq})

    def rewind(self, since_seq: int, tail: Iterable[Held]) -> None:
        """Queue, for a new owner: every held output with seq > *since_seq*, then *tail*.

        Queued control notifications are dropped: the caller's *tail* states the current
        situation (paused, completed) instead.
        """
        outputs = [h for h in (*self.sent, *self.pending) if h.is_output]
        self.sent.clear()
        self.sent_bytes = 0
        self.pending.clear()
        self.pending_bytes = 0
        for held in outputs:
            if held.seq is not None and held.seq <= since_seq:
                self._remember(held)  # the client has it: keep it only for a later replay
            else:
                self.push(held)
        for held in tail:
            self.push(held)


if __name__ == "__main__":
    box = Outbox(budget_bytes=10)
    for _ in range(4):
        box.push(Held("process.output", b"1234", box.take_seq()))
    assert not box.has_room
    for _ in range(3):
        box.delivered()
    assert [h.seq for h in box.sent] == [1, 2] and box.first_seq == 1  # seq 0 evicted
    box.check_replay(-1)
    box.check_replay(0)
    try:
        Outbox(budget_bytes=4, sent=box.sent, next_seq=3).check_replay(-1)
        box.sent.popleft()
        box.check_replay(0)
    except ReplayUnavailable as exc:
        assert exc.data == {"first_seq": 2}, exc.data
    else:
        raise AssertionError("seq 1 is gone: replay after 0 must fail")
    box.rewind(2, [Held("process.completed", b"{}")])
    assert [h.seq for h in box.pending] == [3, None] and [h.seq for h in box.sent] == [2]
    print("ccx.outbox: PASS")
