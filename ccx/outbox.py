"""A session's held events: unsent ones in order, and recently sent output for replay; and
`HeldBudget`, the server-wide count of the bytes all sessions hold.

Inputs: opaque records with their method (output carries a `seq`): a session's events as
`ccx.events.pack` makes them (raw output and a header byte), or an SSE stream's JSON frames
(`ccx.transport.sse`); the outbox never looks inside.
Outputs: the next record to deliver to the current owner; `rewind()` to re-deliver from a
given seq to a new owner (PROTOCOL.md section 8); room checks that turn into back-pressure;
`output(seq)`, any held output by its seq (sent or not), for watchers (PROTOCOL.md 11), who
read what is held and pin nothing: when it is evicted, it is gone for them too.

Memory bounds. Per session, two budgets (`budget_bytes` each) of the raw output bytes the
held records carry, as PROTOCOL.md section 8 counts them: `pending` (not yet delivered; when
full, the session stops reading the child) and `sent` (delivered; oldest evicted first).
A session's records are its raw output plus a byte each (no JSON escaping: sinks encode
what they send), so it holds about the budgets, plus one record each.
Server-wide, every outbox charges the bytes it really keeps (`len` of each record, control
events included) to one `HeldBudget` (CCX_MAX_HELD_BYTES, PROTOCOL.md
section 6). When it is full, sent output kept for replay is forgotten first, oldest first
(the order it was delivered in, across sessions); if that is not enough the budget stays full:
sessions with unsent output wait (`wait_for_room`) and new sessions are refused. Unsent
output is never dropped. Every update is O(1) per frame; a reclaim frees down to a low-water
mark, so its cost (a heap over the outboxes that hold sent output) is amortized.
`Outbox` is pure data, no I/O, no trio. `SpoolOutbox` (issue 18) keeps the same contract
with output frames on disk (`ccx.spool`): memory per session is then an index of 16 bytes a
frame, the control notifications and a small cache of frames just queued; only those are
charged to `HeldBudget` (spooled output does not count, PROTOCOL.md section 6). A spool that
cannot be written (disk full) makes `put` wait and retry: the collector stops taking from
the channel and the child blocks, as with a slow client; nothing is dropped.
Size (over 400 lines): `Outbox` and `SpoolOutbox` are two implementations of one contract
(same methods, budgets and -32006 rule), kept side by side so a change to one is seen next
to the other; `HeldBudget` is the server-wide count both charge.
Docs: ../shared/PROTOCOL.md sections 6 and 8.
"""

from __future__ import annotations

import array
import collections
import heapq
from collections.abc import Callable, Iterable

import attrs
import trio

from ccx.errors import ReplayUnavailable
from ccx.spool import Spool


@attrs.frozen
class Held:
    """One held record and its method; output has a `seq`."""

    method: str
    frame: bytes  # the record: `ccx.events.pack` for a session, the JSON frame for SSE
    seq: int | None = None
    raw_bytes: int | None = None  # output bytes it carries; None: count the record itself

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


RECLAIM_TO = 7 / 8  # a reclaim frees sent output down to this share of the limit


@attrs.define(eq=False)
class HeldBudget:
    """Bytes held in memory by every session of one server, against one limit.

    Outboxes (and MCP output buffers) `charge` what they keep and `credit` what they let go.
    `full` is O(1). Callers that must wait register a wake-up with `wait_for_room`; it is
    called once the budget is below its limit again (event-driven: no polling).
    """

    limit_bytes: int
    held_bytes: int = 0
    replaying: set[Outbox] = attrs.field(factory=set)  # outboxes holding sent output
    _waiting: dict[Callable[[], None], None] = attrs.field(factory=dict)
    _next_stamp: int = 0

    @property
    def full(self) -> bool:
        return self.held_bytes >= self.limit_bytes

    def charge(self, size: int) -> None:
        self.held_bytes += size
        if self.held_bytes >= self.limit_bytes and self.replaying:
            self.reclaim()

    def credit(self, size: int) -> None:
        self.held_bytes -= size
        if self._waiting and self.held_bytes < self.limit_bytes:
            waiting, self._waiting = self._waiting, {}
            for wake in waiting:
                wake()

    def wait_for_room(self, wake: Callable[[], None]) -> None:
        """Call *wake* (once) when the budget is no longer full; at once if it is not."""
        if self.full:
            self._waiting[wake] = None
        else:
            wake()

    def stop_waiting(self, wake: Callable[[], None]) -> None:
        self._waiting.pop(wake, None)

    def stamp(self) -> int:
        """A number that grows with every frame delivered, whichever session sent it."""
        self._next_stamp += 1
        return self._next_stamp

    def reclaim(self) -> int:
        """Forget sent output kept for replay, oldest first across all sessions, until the
        budget is at `RECLAIM_TO` of its limit or no sent output is left. Returns bytes freed."""
        before = self.held_bytes
        goal = int(self.limit_bytes * RECLAIM_TO)
        heap = [(box.sent_stamps[0], id(box), box) for box in self.replaying]
        heapq.heapify(heap)
        while heap and self.held_bytes > goal:
            _, _, box = heapq.heappop(heap)
            box.forget_oldest_sent()
            if box.sent:
                heapq.heappush(heap, (box.sent_stamps[0], id(box), box))
        return before - self.held_bytes


class _Budgets:
    """What both outboxes share: the room check, the charge of kept bytes to `held`, the
    -32006 check. Their attrs fields provide the attributes."""

    budget_bytes: int
    held: HeldBudget | None
    pending_bytes: int
    frame_bytes: int

    @property
    def has_room(self) -> bool:
        """Whether more output may be queued; False means: stop reading the child."""
        return self.pending_bytes < self.budget_bytes

    def _charge(self, size: int) -> None:
        self.frame_bytes += size
        if self.held is not None:
            self.held.charge(size)

    def _credit(self, size: int) -> None:
        self.frame_bytes -= size
        if self.held is not None:
            self.held.credit(size)

    @property
    def first_seq(self) -> int:
        raise NotImplementedError

    def set_caching(self, on: bool) -> None:
        """Whether records just queued are worth keeping in memory for a reader (an owner
        is attached); the in-memory outbox holds everything in memory anyway."""

    def check_replay(self, since_seq: int) -> None:
        """Raise -32006 if output after *since_seq* is no longer held (-1: never raises)."""
        first = self.first_seq
        if since_seq >= 0 and since_seq + 1 < first:
            raise ReplayUnavailable(
                f"output after seq {since_seq} is no longer held; oldest held is {first}",
                {"first_seq": first})


@attrs.define(eq=False)
class Outbox(_Budgets):
    budget_bytes: int
    held: HeldBudget | None = None  # the server-wide budget; None: this outbox alone
    pending: collections.deque[Held] = attrs.field(factory=collections.deque)
    pending_bytes: int = 0
    sent: collections.deque[Held] = attrs.field(factory=collections.deque)
    sent_stamps: collections.deque[int] = attrs.field(factory=collections.deque)
    sent_bytes: int = 0
    next_seq: int = 0
    frame_bytes: int = 0  # bytes of every frame held (pending and sent): what `held` counts
    # Every held output (sent, then pending) in seq order: contiguous seqs, so `output(seq)`
    # is an index. The same `Held` objects as in the two queues: it costs a pointer each.
    outputs: collections.deque[Held] = attrs.field(factory=collections.deque)

    def push(self, held: Held) -> None:
        if held.seq is not None and (not self.outputs or held.seq > self.last_seq):
            self.outputs.append(held)  # a rewind pushes again what is already indexed
        self.pending.append(held)
        self.pending_bytes += held.size
        self._charge(len(held.frame))

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
            if self.held is not None and self.held.full:  # replay goes before anything else
                self.held.reclaim()
        else:
            self._credit(len(held.frame))
        return held

    def _remember(self, held: Held) -> None:
        """Keep *held* (already charged) among the recently sent."""
        self.sent.append(held)
        self.sent_stamps.append(self.held.stamp() if self.held is not None else 0)
        self.sent_bytes += held.size
        if self.held is not None:
            self.held.replaying.add(self)
        while self.sent_bytes > self.budget_bytes and len(self.sent) > 1:
            self.forget_oldest_sent()

    def forget_oldest_sent(self) -> None:
        held = self.sent.popleft()
        if self.outputs and self.outputs[0] is held:  # the oldest sent is the oldest held
            self.outputs.popleft()
        self.sent_stamps.popleft()
        self.sent_bytes -= held.size
        if not self.sent and self.held is not None:
            self.held.replaying.discard(self)
        self._credit(len(held.frame))

    def forget_sent(self) -> int:
        """Drop the recently sent output kept for replay; return the raw bytes it counted."""
        freed = self.sent_bytes
        while self.sent:
            self.forget_oldest_sent()
        return freed

    def clear(self) -> None:
        """Let go of everything held (the session is forgotten): its bytes leave `held`."""
        self.forget_sent()
        self.pending.clear()
        self.outputs.clear()
        self.pending_bytes = 0
        self._credit(self.frame_bytes)

    @property
    def first_seq(self) -> int:
        """The oldest seq still held (sent or pending), or `next_seq` if none is."""
        first = self.outputs[0].seq if self.outputs else None
        return self.next_seq if first is None else first

    @property
    def last_seq(self) -> int:
        """The newest seq held, or -1 if none is."""
        last = self.outputs[-1].seq if self.outputs else None
        return -1 if last is None else last

    def output(self, seq: int) -> Held | None:
        """The held output with this *seq* (sent or pending), or None if it is not held."""
        first = self.first_seq
        if first <= seq < first + len(self.outputs):
            return self.outputs[seq - first]
        return None

    def rewind(self, since_seq: int, tail: Iterable[Held]) -> None:
        """Queue, for a new owner: every held output with seq > *since_seq*, then *tail*.

        Queued control notifications are dropped: the caller's *tail* states the current
        situation (paused, completed) instead.
        """
        outputs = [h for h in (*self.sent, *self.pending) if h.is_output]
        self.sent.clear()
        self.sent_stamps.clear()
        self.sent_bytes = 0
        self.pending.clear()
        self.pending_bytes = 0
        if self.held is not None:
            self.held.replaying.discard(self)
        self._credit(self.frame_bytes)  # charged again below, frame by frame
        for held in outputs:
            if held.seq is not None and held.seq <= since_seq:
                self._charge(len(held.frame))
                self._remember(held)  # the client has it: keep it only for a later replay
            else:
                self.push(held)
        for held in tail:
            self.push(held)

    async def put(self, held: Held) -> None:
        """`push`, as the session's collector calls it (the spooled outbox may wait here)."""
        self.push(held)


SPOOL_RETRY_S = 1.0  # a spool write that failed (disk full...) is tried again this often
CACHE_BYTES = 256 * 1024  # frames just queued kept in memory, for a reader keeping up


def _compact(values: array.array[int], skip: int) -> tuple[array.array[int], int]:
    """Drop the first *skip* entries once they are many (amortized O(1) per entry)."""
    if skip > 1024 and skip * 2 > len(values):
        del values[:skip]
        return values, 0
    return values, skip


@attrs.define(eq=False)
class SpoolOutbox(_Budgets):
    """`Outbox`'s contract (same methods, same budgets, PROTOCOL.md section 8), with output
    frames on disk (`ccx.spool.Spool`) and only an index in memory.

    Output seqs are contiguous: seq `first + i` is at `offsets[i]` in the spool, its length
    up to the next offset (or the spool's end), `raws[i]` the raw bytes it carries. Output
    `[first, cursor)` has been delivered (kept for replay), `[cursor, end)` not yet. Control
    notifications (started, paused, resumed, completed) stay in memory, each queued before
    the output seq that followed it. Memory per session: 16 bytes per held frame (two
    `array('q')` entries), the controls, and up to `CACHE_BYTES` of frames just queued
    (contiguous from the delivery point: what a reader that keeps up reads next, without a
    `pread`; none while no owner is attached: `set_caching`). Only those in-memory bytes are
    charged to the `HeldBudget` (PROTOCOL.md section 6: spooled output does not count), so
    this outbox never holds replay in memory for it to reclaim.
    """

    budget_bytes: int
    held: HeldBudget | None
    spool: Spool
    first: int = 0  # oldest held output seq
    cursor: int = 0  # next output seq to deliver
    end: int = 0  # the seq the next output will carry (== next_seq)
    offsets: array.array[int] = attrs.field(factory=lambda: array.array("q"))
    raws: array.array[int] = attrs.field(factory=lambda: array.array("q"))
    _skip: int = 0  # entries of offsets/raws before `first`, not yet compacted away
    pending_bytes: int = 0
    sent_bytes: int = 0
    frame_bytes: int = 0  # bytes kept in memory: controls and cache (what `held` counts)
    controls: collections.deque[tuple[int, Held]] = attrs.field(factory=collections.deque)
    cache: collections.deque[bytes] = attrs.field(factory=collections.deque)
    cache_first: int = 0  # seq of cache[0]
    cache_bytes: int = 0
    caching: bool = True  # False while nobody is attached: records stay on disk only

    @property
    def next_seq(self) -> int:
        return self.end

    def take_seq(self) -> int:
        """The seq of the output being queued: it is taken by `put` (retried as is)."""
        return self.end

    def push(self, held: Held) -> None:
        """Queue *held*; `OSError` (nothing queued) if an output cannot be spooled."""
        if held.seq is None:
            self.controls.append((self.end, held))
            self._charge(len(held.frame))
            if held.method == "process.completed":
                self.spool.seal()  # no output follows it
            return
        assert held.seq == self.end, (held.seq, self.end)
        offset = self.spool.append(held.frame)
        self.offsets.append(offset)
        self.raws.append(held.size)
        self.pending_bytes += held.size
        self.end += 1
        if self.caching and self.cache_bytes + len(held.frame) <= CACHE_BYTES and (
                (not self.cache and held.seq == self.cursor)
                or (self.cache and held.seq == self.cache_first + len(self.cache))):
            if not self.cache:
                self.cache_first = held.seq
            self.cache.append(held.frame)
            self.cache_bytes += len(held.frame)
            self._charge(len(held.frame))

    def set_caching(self, on: bool) -> None:
        """Off: let go of the cached records (they are on disk) and cache no more until a
        reader is attached again; then the cache starts again at the delivery point."""
        self.caching = on
        if not on:
            while self.cache:
                self._credit(len(self.cache.popleft()))
            self.cache_bytes = 0

    async def put(self, held: Held) -> None:
        """`push`, waiting (the collector stops reading: the child blocks) while the spool
        cannot be written; the failure is logged once by the spool directory."""
        while True:
            try:
                self.push(held)
                return
            except OSError:
                if self.spool.closed:
                    return  # the session is forgotten: nobody can read it any more
                await trio.sleep(SPOOL_RETRY_S)

    def _index(self, seq: int) -> int:
        return self._skip + seq - self.first

    def _frame(self, seq: int) -> bytes:
        if self.cache and self.cache_first <= seq < self.cache_first + len(self.cache):
            return self.cache[seq - self.cache_first]
        i = self._index(seq)
        offset = self.offsets[i]
        stop = self.offsets[i + 1] if seq + 1 < self.end else self.spool.end
        return self.spool.read(offset, stop - offset)

    def _output_held(self, seq: int) -> Held:
        return Held("process.output", self._frame(seq), seq, self.raws[self._index(seq)])

    def head(self) -> Held | None:
        if self.controls and self.controls[0][0] <= self.cursor:
            return self.controls[0][1]
        if self.cursor < self.end:
            return self._output_held(self.cursor)
        return None

    def delivered(self) -> Held:
        """The head went out: controls are let go, output is kept among the recently sent."""
        if self.controls and self.controls[0][0] <= self.cursor:
            held = self.controls.popleft()[1]
            self._credit(len(held.frame))
            return held
        seq = self.cursor
        size = self.raws[self._index(seq)]
        self.cursor += 1
        self.pending_bytes -= size
        self.sent_bytes += size
        while self.cache and self.cache_first <= seq:
            frame = self.cache.popleft()
            self.cache_first += 1
            self.cache_bytes -= len(frame)
            self._credit(len(frame))
        while self.sent_bytes > self.budget_bytes and self.cursor - self.first > 1:
            self.forget_oldest_sent()
        if self.cursor == self.end and self.spool.sealed:
            self.spool.idle()  # an ended session that holds nothing unsent keeps no fd
        return Held("process.output", b"", seq, size)

    def forget_oldest_sent(self) -> None:
        self.sent_bytes -= self.raws[self._skip]
        self.first += 1
        self._skip += 1
        self.spool.release_before(
            self.offsets[self._skip] if self.first < self.end else self.spool.end)
        self.offsets, _ = _compact(self.offsets, self._skip)
        self.raws, self._skip = _compact(self.raws, self._skip)

    def forget_sent(self) -> int:
        freed = self.sent_bytes
        while self.cursor > self.first:
            self.forget_oldest_sent()
        return freed

    def clear(self) -> None:
        """Let go of everything held (the session is forgotten): the spool is deleted."""
        self.spool.close()
        self.controls.clear()
        self.cache.clear()
        self.cache_bytes = 0
        self.offsets, self.raws, self._skip = array.array("q"), array.array("q"), 0
        self.first = self.cursor = self.end
        self.pending_bytes = self.sent_bytes = 0
        self._credit(self.frame_bytes)

    @property
    def first_seq(self) -> int:
        return self.first

    @property
    def last_seq(self) -> int:
        return self.end - 1 if self.end > self.first else -1

    def output(self, seq: int) -> Held | None:
        if self.first <= seq < self.end:
            return self._output_held(seq)
        return None

    def rewind(self, since_seq: int, tail: Iterable[Held]) -> None:
        """Queue, for a new owner: every held output with seq > *since_seq*, then *tail*
        (queued control notifications are dropped, as in `Outbox.rewind`)."""
        for _, held in self.controls:
            self._credit(len(held.frame))
        self.controls.clear()
        self.cursor = min(max(since_seq + 1, self.first), self.end)
        start, split = self._skip, self._index(self.cursor)
        self.sent_bytes = sum(self.raws[start:split])
        self.pending_bytes = sum(self.raws[split:])
        while self.sent_bytes > self.budget_bytes and self.cursor - self.first > 1:
            self.forget_oldest_sent()
        for held in tail:
            self.push(held)


def _check_spooled() -> None:
    """The same contract from disk: budgets, eviction, rewind, -32006, files deleted."""
    import os
    import tempfile

    from ccx.spool import SpoolDir

    with tempfile.TemporaryDirectory() as base:
        os.chmod(base, 0o700)
        directory = SpoolDir.open(base, node=None, incarnation="check")
        assert directory is not None
        budget = HeldBudget(limit_bytes=1 << 20)
        box = SpoolOutbox(10, budget, directory.spool("s", 10))
        box.spool.segment_bytes = 8  # a new segment every two frames
        box.push(Held("process.started", b"{}"))
        for n in range(4):
            box.push(Held("process.output", b"%d234" % n, box.take_seq()))
        assert not box.has_room and box.head() == Held("process.started", b"{}")
        for _ in range(4):
            box.delivered()  # started, then seqs 0, 1, 2: seq 0 is evicted
        assert (box.first_seq, box.sent_bytes, box.pending_bytes) == (1, 8, 4)
        assert box.output(1) == Held("process.output", b"1234", 1, 4) and box.output(0) is None
        try:
            box.check_replay(-1)
            box.check_replay(0)
        except ReplayUnavailable as exc:
            raise AssertionError("seq 1 is held: a replay after 0 works") from exc
        box.rewind(1, [Held("process.completed", b"{}")])
        assert [box.head(), box.delivered()][0] == Held("process.output", b"2234", 2, 4)
        assert box.delivered().seq == 3 and box.head() == Held("process.completed", b"{}")
        assert box.first_seq == 2 and len(box.spool.starts) == 1, box.spool.starts
        box.clear()
        assert budget.held_bytes == 0 and os.listdir(directory.path) == ["lock"]
        directory.close()


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
        box.forget_oldest_sent()
        box.check_replay(0)
    except ReplayUnavailable as exc:
        assert exc.data == {"first_seq": 2}, exc.data
    else:
        raise AssertionError("seq 1 is gone: replay after 0 must fail")
    assert box.output(1) is None and box.output(3) is box.pending[0]
    box.rewind(2, [Held("process.completed", b"{}")])
    assert [h.seq for h in box.pending] == [3, None] and [h.seq for h in box.sent] == [2]
    assert [h.seq for h in box.outputs] == [2, 3] and box.output(2) is box.sent[0]
    budget = HeldBudget(limit_bytes=64)
    first, second = Outbox(100, budget), Outbox(100, budget)
    for box in (first, second, first):
        box.push(Held("process.output", b"x" * 20, box.take_seq()))
        box.delivered()  # 60 bytes held, all of it sent output kept for replay
    assert budget.held_bytes == 60 and not budget.full
    woken: list[str] = []
    second.push(Held("process.output", b"y" * 20, second.take_seq()))  # 80: reclaim to 56
    assert budget.held_bytes == 40 and [h.seq for h in first.sent] == [1], first.sent
    assert not second.sent, "the oldest sent output goes first, whichever session sent it"
    first.push(Held("process.output", b"z" * 30, first.take_seq()))  # 70: replay goes
    assert budget.held_bytes == 50 and not first.sent
    first.push(Held("process.output", b"z" * 30, first.take_seq()))  # unsent: never dropped
    assert budget.full and budget.held_bytes == 80
    budget.wait_for_room(lambda: woken.append("first"))
    first.delivered()  # sent output now: forgotten at once while the budget is full
    assert woken == ["first"] and budget.held_bytes == 50, budget
    first.clear()
    second.clear()
    assert budget.held_bytes == 0
    _check_spooled()
    print("ccx.outbox: PASS")

