"""Per-session output buffers for MCP mode: read by byte offset, throttle when full, never trim.

Inputs: raw output bytes of one session per stream (`append`, which waits while the stream
holds `capacity_bytes` unread), its completion, and reads from a byte offset per stream.
Outputs: `Slice`s of held bytes cut at a UTF-8 character boundary, waits for new output, and
`Tail`, the bounded tail (with a count of bytes omitted) that the blocking `execute` returns.

Reading from offset N acknowledges every byte before N: those bytes are released, which makes
room and lets a throttled child go on. Bytes at or after N stay held until a later read moves
past them, so a read whose answer was lost can simply be repeated. Nothing is dropped that the
reader has not acknowledged: a full, unread stream blocks `append`, which blocks the session's
deliverer, its outbox, its pumps and finally the child's write(2) (DESIGN.md, back-pressure).

A buffer has an `owner`, the MCP connection whose session delivers into it (and reads it);
`last_seq` is the `seq` of the last output it took, which is where a new owner re-attaches the
session from (`SessionManager.attach`), so a hand-over neither loses nor repeats a byte. An
append on behalf of a connection that is no longer the owner fails with `OwnerGone`.

Memory: each stream holds at most `capacity_bytes` plus one chunk (an append waits only while
the stream is full); the bytes held are charged to the server's `HeldBudget`
(CCX_MAX_HELD_BYTES), credited when a read releases them or the buffer is closed. An append
never waits for that budget: delivery into the buffer is what frees the session's outbox, so
waiting there could deadlock; the budget throttles the session's collector instead.
Docs: ../shared/PROTOCOL.md section 7; https://trio.readthedocs.io/en/stable/reference-core.html#trio.Event
"""

from __future__ import annotations

import attrs
import trio

from ccx.errors import InvalidParams
from ccx.outbox import HeldBudget
from ccx.owner import OwnerGone

STREAMS = ("stdout", "stderr")
UTF8_MAX_CHAR_BYTES = 4


def utf8_cut(data: bytes) -> int:
    """Length of the longest prefix of *data* that does not end inside a UTF-8 character."""
    for back in range(1, min(UTF8_MAX_CHAR_BYTES, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back for its lead
            continue
        if byte >= 0xF0:
            needed = 4
        elif byte >= 0xE0:
            needed = 3
        elif byte >= 0xC0:
            needed = 2
        else:
            needed = 1
        return len(data) - back if back < needed else len(data)
    return len(data)


@attrs.frozen
class Slice:
    """Bytes of one stream from `offset` up to `next_offset` (exclusive)."""

    data: bytes
    offset: int
    next_offset: int


@attrs.define
class _Stream:
    start: int = 0  # absolute offset of data[0]; everything before it was acknowledged
    data: bytearray = attrs.field(factory=bytearray)

    @property
    def end(self) -> int:
        return self.start + len(self.data)


@attrs.define(eq=False)
class OutputBuffer:
    """Unacknowledged output of one session, per stream, bounded by `capacity_bytes` each."""

    session_id: str
    capacity_bytes: int
    completion: dict[str, object] | None = None  # process.completed params, once it ended
    ended_at: float | None = None  # trio clock time of the completion
    closed: bool = False
    owner: object | None = None  # the MCP connection delivering into it; None: detached
    last_seq: int = -1  # seq of the last process.output appended (-1: none yet)
    held: HeldBudget | None = None  # the server's CCX_MAX_HELD_BYTES budget, charged here too
    _streams: dict[str, _Stream] = attrs.field(factory=lambda: {s: _Stream() for s in STREAMS})
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @property
    def ended(self) -> bool:
        return self.completion is not None

    def end(self, stream: str) -> int:
        return self._streams[stream].end

    def held_bytes(self, stream: str) -> int:
        return len(self._streams[stream].data)

    @property
    def holds_unread(self) -> bool:
        """Some output is held that no read has acknowledged."""
        return any(s.data for s in self._streams.values())

    @property
    def drained(self) -> bool:
        """Ended, and every byte was acknowledged: the buffer may go."""
        return self.ended and not any(s.data for s in self._streams.values())

    def _writable(self, writer: object | None) -> bool:
        return not self.closed and (writer is None or self.owner is writer)

    async def append(self, stream: str, data: bytes, *, seq: int | None = None,
                     writer: object | None = None) -> None:
        """Hold *data* (output number *seq*); first wait while *stream* holds
        `capacity_bytes` unread.

        **Cancellation**: safe; nothing is held if cancelled while waiting.
        Raises `OwnerGone` once the buffer is closed (nobody will read it) or, when *writer*
        is given, once *writer* is no longer the `owner` (detached or taken over).
        """
        held = self._streams[stream]
        while len(held.data) >= self.capacity_bytes and self._writable(writer):
            await self._changed.wait()
        if not self._writable(writer):
            raise OwnerGone(self.session_id)
        held.data += data
        if self.held is not None:
            self.held.charge(len(data))
        if seq is not None:
            self.last_seq = seq
        self._notify()

    def complete(self, params: dict[str, object]) -> None:
        if self.completion is not None:  # delivered again after a hand-over: same facts
            return
        self.completion = params
        self.ended_at = trio.current_time()
        self._notify()

    def hand_over(self, owner: object | None) -> None:
        """Make *owner* the connection that delivers into and reads this buffer (None: the
        session is detached); appends waiting for the previous owner fail."""
        self.owner = owner
        self._notify()

    @property
    def full(self) -> bool:
        """Some stream holds `capacity_bytes` unread: appends wait."""
        return any(len(s.data) >= self.capacity_bytes for s in self._streams.values())

    async def wait_changed(self) -> None:
        """Wait for the next append, completion, read or hand-over. **Cancellation**: safe."""
        await self._changed.wait()

    def first_offset(self, stream: str) -> int:
        """The oldest byte still held: where a reader that lost its offsets resumes."""
        return self._streams[stream].start

    def close(self) -> None:
        """Wake and fail every waiting `append`: nobody will read any more. The bytes held
        are let go."""
        self.closed = True
        for held in self._streams.values():
            if self.held is not None:
                self.held.credit(len(held.data))
            held.start += len(held.data)
            held.data.clear()
        self._notify()

    def read(self, stream: str, offset: int, max_bytes: int, *, whole: bool = False) -> Slice:
        """Acknowledge bytes before *offset* and return up to *max_bytes* from it, ending at a
        character boundary unless *whole* (raw bytes, cut anywhere).

        Raises `InvalidParams` for an offset before the oldest held byte (already read and
        released) or beyond what the session has written.
        """
        held = self._streams[stream]
        if offset < held.start:
            raise InvalidParams(f"{stream} bytes before offset {held.start} were already read "
                                f"and released; read from {held.start}",
                                {"stream": stream, "first_offset": held.start})
        if offset > held.end:
            raise InvalidParams(f"{stream} offset {offset} is beyond the {held.end} bytes "
                                "written so far", {"stream": stream, "end_offset": held.end})
        if offset > held.start:
            del held.data[: offset - held.start]
            if self.held is not None:
                self.held.credit(offset - held.start)
            held.start = offset
            self._notify()  # room: a throttled append may go on
        data = bytes(held.data[:max_bytes])
        # Unless this is the very end, the bytes after it may complete a split character.
        if not whole and not (self.ended and len(data) == len(held.data)):
            cut = utf8_cut(data)
            if cut > 0 or len(data) < UTF8_MAX_CHAR_BYTES:
                data = data[:cut]
        return Slice(data, offset, offset + len(data))

    def has_news(self, offsets: dict[str, int]) -> bool:
        return self.ended or any(self.end(s) > offsets.get(s, 0) for s in STREAMS)

    async def wait_news(self, offsets: dict[str, int]) -> None:
        """Wait until some stream has bytes beyond *offsets*, or the session ended.

        **Cancellation**: safe; callers bound it with their own deadline.
        """
        while not self.has_news(offsets) and not self.closed:
            await self._changed.wait()


@attrs.define
class Tail:
    """The last `limit_bytes` of a stream, and how many bytes before them were omitted."""

    limit_bytes: int
    data: bytearray = attrs.field(factory=bytearray)
    omitted_bytes: int = 0

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        excess = len(self.data) - self.limit_bytes
        if excess > 0:
            del self.data[:excess]
            self.omitted_bytes += excess

    def text(self) -> str:
        """The tail decoded, led by a "[N bytes omitted]" line when anything was cut."""
        data = bytes(self.data)
        omitted = self.omitted_bytes
        if omitted:  # the cut may have split a character: drop its continuation bytes
            lead = 0
            while lead < min(len(data), UTF8_MAX_CHAR_BYTES - 1) and data[lead] & 0xC0 == 0x80:
                lead += 1
            data, omitted = data[lead:], omitted + lead
        text = data.decode("utf-8", errors="replace")
        return f"[{omitted} bytes omitted]\n{text}" if omitted else text


async def _self_check() -> None:
    assert utf8_cut("aé".encode()[:2]) == 1 and utf8_cut("aé".encode()) == 3
    assert utf8_cut("€".encode()[:2]) == 0 and utf8_cut(b"abc") == 3
    buffer = OutputBuffer("s", capacity_bytes=4)
    await buffer.append("stdout", "ab€".encode())  # 5 bytes: over capacity now
    first = buffer.read("stdout", 0, 3)
    assert first.data == b"ab" and first.next_offset == 2, first
    with trio.move_on_after(0.05) as blocked:
        await buffer.append("stdout", b"x")
    assert blocked.cancelled_caught, "a full, unread stream must throttle the writer"
    rest = buffer.read("stdout", 2, 100)
    assert rest.data == "€".encode(), rest
    await buffer.append("stdout", b"x")  # reading released bytes 0-1: room again
    buffer.hand_over(owner := object())
    buffer.read("stdout", 6, 0)  # all read: room again
    await buffer.append("stdout", b"y", seq=7, writer=owner)
    assert buffer.last_seq == 7 and buffer.first_offset("stdout") == 6
    buffer.hand_over(None)
    try:
        await buffer.append("stdout", b"z", writer=owner)
    except OwnerGone:
        pass
    else:
        raise AssertionError("a connection that is no longer the owner must not append")
    tail = Tail(4)
    tail.add(b"0123456789")
    assert tail.text() == "[6 bytes omitted]\n6789", tail.text()
    print("ccx.mcp_buffer: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
