"""A session's output: pumps read the child's pipes, a collector turns reads into typed events
held with `seq` for replay, and one long-lived deliverer hands them to the owner's sink.

Inputs: the child's output streams (pipes, or a PTY master), PAUSE/RESUME taking effect and
the session's start and end (from `ccx.session`, which supervises the process); owners
(`ccx.owner.Owner`, sinks of `ccx.events`) attaching with a `since_seq` (PROTOCOL.md
section 8); watchers reading what is held (PROTOCOL.md 11, `ccx.watch`).
Outputs: `Started`, `Output`, `Paused`, `Resumed`, `Completed` events, in order, each sent to
whoever owns the session then; for watchers: `news` (an event set whenever something is
queued), `held_output(seq)`, the log of recent paused/resumed (`control_at`) and `completion`.

Back-pressure: each pump reads at most `CHUNK_BYTES` and awaits `send()` on a channel of
`CHANNEL_CHUNKS` slots; the collector turns chunks into `Output` events in the `Outbox` and
stops taking from the channel while the outbox holds `replay_bytes` of unsent output; the
deliverer awaits the owner's send (a WebSocket sink waits for its writer; an MCP sink for room
in its buffer). A slow or absent client stalls delivery, the outbox fills, the channel fills,
the pumps stop reading, the pipe fills, the child blocks in write(2). The outbox holds each
event as a compact record (`ccx.events.pack`: output is its payload and one header byte, not
JSON); a sink encodes what it sends, once (`ccx.protocol.encode_event`), and an MCP sink takes
the bytes as they are (no JSON or base64 round trip). Budgets count raw output bytes
(PROTOCOL.md section 8).

Memory per session: with a `spool` (the server's `ccx.spool.SpoolDir`, the default), the
two `replay_bytes` budgets of raw output (unsent, recently sent) are on disk
(`SpoolOutbox`): memory holds an index, control events and up to `outbox.CACHE_BYTES` of
records just queued, plus the channel (`CHANNEL_CHUNKS` x `CHUNK_BYTES`); a spool that
cannot be written makes the collector wait (the child blocks). Without one, the budgets are
held in memory. Nothing is dropped either way. Server-wide, the records of every session
count against one `HeldBudget` (CCX_MAX_HELD_BYTES): while it is full (after sent output was
forgotten), a session with unsent output also stops taking from the channel, until bytes
are let go anywhere (`HeldBudget.wait_for_room` wakes it: no polling). A session whose
output has all been delivered may still queue one record, so a client that reads keeps its
session moving. An ended session keeps its unsent output until it is read or forgotten
(`clear()`, at the end of CCX_RETENTION); `holds_unsent` makes it count against the session
limits meanwhile.
Size (over 400 lines): reading, collecting and delivering share the outbox and its
wake-ups (each step wakes the next when room or output appears); its self-check is long.
Docs: https://trio.readthedocs.io/en/stable/reference-core.html#using-channels-to-pass-values-between-tasks
      https://docs.python.org/3/library/codecs.html#codecs.getincrementaldecoder
"""

from __future__ import annotations

import codecs
import collections
import os
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from ccx.events import Completed, Event, Output, Paused, Resumed, Started, pack, unpack
from ccx.outbox import Held, HeldBudget, Outbox, SpoolOutbox
from ccx.owner import Owner, OwnerGone
from ccx.spool import SpoolDir

CHUNK_BYTES = 64 * 1024  # most raw bytes one process.output carries (PROTOCOL.md section 3)
UTF8_CARRY_BYTES = 3  # an incremental decoder holds back at most 3 bytes of a split character
CHANNEL_CHUNKS = 8  # channel slots: 8 x 64 KiB = 512 KiB in flight per session, at most
DRAIN_MAX_READS = 64  # after the group is gone, read what the pipe still holds, not more
# process.paused/resumed kept for watchers (with the seq they came before); older ones are
# dropped, and a watcher that far behind skips them (only PAUSE/RESUME requests make them).
CONTROL_LOG_MAX = 1024

Item = tuple[str, bytes] | type[Paused] | type[Resumed]  # what the channel carries


class Watch(Protocol):
    """A watcher of a session (`ccx.watch.Watcher`), as the output sees it."""

    @property
    def lagged(self) -> bool:
        """It has fallen behind what is held: it ends after telling its connection so."""

    def stop(self) -> None:
        """End the watch: it sends nothing more."""


@attrs.define(eq=False)
class SessionOutput:
    """Everything between the child's pipes and the owner's sink, for one session."""

    session_id: str
    replay_bytes: int  # each of the unsent and the recently-sent budgets (PROTOCOL.md 8)
    text: bool  # decode output as UTF-8 text (encoding "utf-8"), else raw bytes (base64)
    owner: Owner | None
    held: HeldBudget | None = None  # the server's CCX_MAX_HELD_BYTES; None: no such limit
    spool: SpoolDir | None = None  # where held output goes (ccx.spool); None: in memory
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    generation: int = 0  # bumped whenever the owner changes
    owner_broken: bool = False  # the owner's connection failed; wait for release or attach
    _outbox: Outbox | SpoolOutbox = attrs.field(init=False)
    _send: trio.MemorySendChannel[Item] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[Item] = attrs.field(init=False)
    _control_overflow: collections.deque[type[Paused] | type[Resumed]] = attrs.field(
        factory=collections.deque)
    _live_reads: set[trio.CancelScope] = attrs.field(factory=set)
    _reading_stopped: bool = False  # the group is gone: abandon reads that would block
    _gate_open: bool = False  # closed until the execute/attach response is on its way
    _completion: Completed | None = None  # queued once set: nothing more will be
    _send_scope: trio.CancelScope | None = None
    _wake: trio.Event = attrs.field(factory=trio.Event)  # for the deliverer
    _room: trio.Event = attrs.field(factory=trio.Event)  # for the collector
    _settled: trio.Event = attrs.field(factory=trio.Event)
    # Watchers (PROTOCOL.md 11) by connection, and what they wait on: `news` is set (and
    # replaced) whenever an event is queued. `_controls` holds (before_seq, index, event)
    # of recent process.paused/resumed: the output seq they came before.
    watchers: dict[Owner, Watch] = attrs.field(factory=dict)
    # watchers that lagged and gave up their place, still telling their connection so
    lagging: dict[Owner, Watch] = attrs.field(factory=dict)
    news: trio.Event = attrs.field(factory=trio.Event)
    _controls: collections.deque[tuple[int, int, Paused | Resumed]] = attrs.field(
        factory=collections.deque)
    _controls_total: int = 0

    def __attrs_post_init__(self) -> None:
        budget = self.replay_bytes
        self._outbox = Outbox(budget, self.held) if self.spool is None else \
            SpoolOutbox(budget, self.held, self.spool.spool(self.session_id, budget))
        self._outbox.set_caching(self.owner is not None)
        self._send, self._receive = trio.open_memory_channel[Item](CHANNEL_CHUNKS)

    # ------------------------------------------------------------------------------ reading

    def sender(self) -> trio.MemorySendChannel[Item]:
        """A pump's end of the channel: take it before starting the pump, so a
        `stop_reading` that comes first still lets the pump read what the pipe holds."""
        return self._send.clone()

    async def pump(self, stream: trio.abc.ReceiveStream, name: str,
                   send: trio.MemorySendChannel[Item]) -> None:
        """Move bytes from one stream into the channel (*send*, from `sender()`) until EOF,
        or until reading stops (`stop_reading`: the group is gone), then what the pipe still
        holds, within bounds."""
        max_bytes = CHUNK_BYTES
        if self.text:  # room for the bytes the decoder carries over
            max_bytes -= UTF8_CARRY_BYTES
        async with send:
            while True:
                data = await self._read_live(stream, max_bytes)
                if data is None:
                    break
                if not data:
                    return
                self._count(name, len(data))
                await send.send((name, data))
            fd = stream.fileno()  # type: ignore[attr-defined]
            for _ in range(DRAIN_MAX_READS):
                try:
                    data = os.read(fd, max_bytes)
                except (BlockingIOError, OSError):
                    return
                if not data:
                    return
                self._count(name, len(data))
                await send.send((name, data))

    async def _read_live(self, stream: trio.abc.ReceiveStream, max_bytes: int) -> bytes | None:
        """One read, abandoned (None) once the group is gone: a daemon may hold the pipe."""
        with trio.CancelScope() as scope:
            self._live_reads.add(scope)
            if self._reading_stopped:
                scope.cancel()
            try:
                return bytes(await stream.receive_some(max_bytes))
            except trio.BrokenResourceError:  # EIO on a PTY master: no slave is open any more
                return b""
            finally:
                self._live_reads.discard(scope)
        return None

    def stop_reading(self) -> None:
        """The group is gone: reads that would block are abandoned (a daemon that escaped may
        hold the pipe open), the pumps take what is left, and the collector ends after them."""
        self._reading_stopped = True
        for scope in list(self._live_reads):
            scope.cancel()
        self._send.close()

    def _count(self, name: str, size: int) -> None:
        if name in ("stdout", "pty"):  # a terminal merges both; PROTOCOL.md counts it here
            self.stdout_bytes += size
        else:
            self.stderr_bytes += size

    def post_control(self, kind: type[Paused] | type[Resumed]) -> None:
        """Queue process.paused/resumed behind the output already read; never blocks."""
        try:
            self._send.send_nowait(kind)
        except trio.WouldBlock:
            self._control_overflow.append(kind)  # channel full: the collector wakes soon
        except trio.ClosedResourceError:
            pass

    # ------------------------------------------------------------------------------ collecting

    async def collect(self, started: Started, streams: list[str],
                      completion: Callable[[], Completed]) -> None:
        """Turn channel items into events in the outbox; `seq` is assigned here only. Ends
        once every pump is done, with *completion*'s event queued last."""
        decoders = {name: codecs.getincrementaldecoder("utf-8")(errors="replace")
                    for name in streams}
        self._queue(started)
        async with self._receive:
            async for item in self._receive:
                if isinstance(item, tuple):
                    await self._output(item[0], item[1], decoders[item[0]])
                else:
                    self._queue(item(self.session_id))
                while self._control_overflow:
                    self._queue(self._control_overflow.popleft()(self.session_id))
        for name, decoder in decoders.items():
            await self._output(name, b"", decoder, final=True)
        self._completion = completion()
        self._queue(self._completion)  # a spooled outbox seals its spool: nothing follows

    def _queue(self, event: Started | Paused | Resumed | Completed) -> None:
        if isinstance(event, Paused | Resumed):
            self._log_control(event)
        self._outbox.push(Held(event.method, pack(event)))
        self._poke()

    async def _output(self, name: str, data: bytes, decoder: codecs.IncrementalDecoder, *,
                      final: bool = False) -> None:
        # Back-pressure: unsent output is at this session's budget, or the server's held
        # bytes are (CCX_MAX_HELD_BYTES): then a session that still has unsent output waits
        # for it to be read, or for any session to let go of bytes.
        while not self._outbox.has_room or (
                self.held is not None and self.held.full and self._outbox.pending_bytes):
            if self._outbox.has_room and self.held is not None:
                self.held.wait_for_room(self._room_changed)
            await self._room.wait()
            self._room = trio.Event()
        payload = decoder.decode(data, final=final).encode("utf-8") if self.text else data
        if not payload:
            return
        seq = self._outbox.take_seq()
        event = Output(self.session_id, name, seq, payload, self.text)
        await self._outbox.put(Held(event.method, pack(event), seq, raw_bytes=len(data)))
        self._poke()

    def _log_control(self, event: Paused | Resumed) -> None:
        """Keep a paused/resumed event for watchers, before the next output seq; forget
        those before the oldest held output (a watcher there has lagged anyway)."""
        self._controls.append((self._outbox.next_seq, self._controls_total, event))
        self._controls_total += 1
        first = self._outbox.first_seq
        while self._controls and (len(self._controls) > CONTROL_LOG_MAX
                                  or self._controls[0][0] < first):
            self._controls.popleft()

    def _poke(self) -> None:
        self._wake.set()
        if self.watchers:  # a watcher takes `news` only once registered: none, none waits
            self.news.set()
            self.news = trio.Event()

    def _room_changed(self) -> None:
        self._room.set()

    # ------------------------------------------------------------------------------ delivering

    async def deliver(self) -> None:
        """Send held events, in order, to whoever owns the session now; for the session's
        whole life, across owners, until the session is forgotten (its task is cancelled).

        Once everything up to `process.completed` went out, or the session has ended with
        nobody to send to, `wait_settled` returns; the rest stays held for a later `attach`.
        **Cancellation**: a hand-over to the owner is cancel-safe (a sink takes whole events);
        an abandoned one stays at the head of the outbox.
        """
        while True:
            held, owner = self._outbox.head(), self.owner
            if held is None or owner is None or self.owner_broken or not self._gate_open:
                if self._completion is not None and (held is None or owner is None
                                                     or self.owner_broken):
                    self._settled.set()
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            generation = self.generation
            with trio.CancelScope() as scope:
                self._send_scope = scope
                try:
                    await owner.send_event(self._event(held))
                except OwnerGone:
                    if generation == self.generation:
                        self.owner_broken = True  # its connection's release decides
                        self._outbox.set_caching(False)  # nobody reads: records on disk
                    continue
                finally:
                    self._send_scope = None
            if generation == self.generation and not scope.cancelled_caught:
                self._outbox.delivered()
                self._room_changed()

    def _event(self, held: Held) -> Event:
        return unpack(self.session_id, held.method, held.frame, held.seq)

    async def wait_settled(self) -> None:
        """Return once the completion is handed over, or held with nobody to take it."""
        await self._settled.wait()

    def announce(self) -> None:
        """The execute (or attach) response went out: events may follow it now."""
        self._gate_open = True
        self._poke()

    def attach(self, owner: Owner, since_seq: int, *, paused: bool) -> None:
        """Make *owner* the receiver and queue what it asked to get again (PROTOCOL.md 8):
        held output after *since_seq*, then process.paused if *paused*, then the completion.

        The caller checked `check_replay(since_seq)` first. Nothing is sent to *owner* until
        `announce()`; the old owner gets nothing more from here on (an in-flight hand-over is
        abandoned, and re-queued by the rewind). The session's one deliverer, waiting since
        it settled or sending to the old owner, goes on with the new one.
        """
        self.generation += 1
        if self._send_scope is not None:
            self._send_scope.cancel()
        self.owner = owner
        self.owner_broken = False
        self._gate_open = False
        self._outbox.set_caching(True)
        tail: list[Paused | Completed] = []
        if paused:
            tail.append(Paused(self.session_id))
        if self._completion is not None:
            tail.append(self._completion)
        self._outbox.rewind(since_seq, [Held(e.method, pack(e)) for e in tail])
        self._poke()
        self._room_changed()

    def detach(self) -> None:
        """The owner is gone: keep running and hold output for a later `attach`."""
        self.generation += 1
        self.owner = None
        self.owner_broken = False
        self._outbox.set_caching(False)  # what it holds waits on disk for a later attach
        self._poke()

    @property
    def attached(self) -> bool:
        """A live connection receives the events."""
        return self.owner is not None and not self.owner_broken

    # ------------------------------------------------------------------------------ holding

    def check_replay(self, since_seq: int) -> None:
        self._outbox.check_replay(since_seq)

    @property
    def next_seq(self) -> int:
        return self._outbox.next_seq

    @property
    def first_seq(self) -> int:
        """The oldest output seq still held (`next_seq` when none is)."""
        return self._outbox.first_seq

    @property
    def replay_bytes_held(self) -> int:
        """Raw bytes of already sent output kept for a later replay."""
        return self._outbox.sent_bytes

    def forget_replay(self) -> int:
        """Drop the sent output kept for replay (unsent output stays); return bytes freed.
        A later `attach` with an older `since_seq` then gets -32006."""
        return self._outbox.forget_sent()

    @property
    def holds_unsent(self) -> bool:
        """Output no client has received is held: the session still counts against limits."""
        return self._outbox.pending_bytes > 0

    @property
    def held_bytes(self) -> int:
        """Bytes of records this session holds in memory (sent and unsent)."""
        return self._outbox.frame_bytes

    def clear(self) -> None:
        """The session is forgotten: end its watches and let go of its output."""
        for watcher in [*self.watchers.values(), *self.lagging.values()]:
            watcher.stop()
        if self.held is not None:
            self.held.stop_waiting(self._room_changed)
        self._outbox.clear()

    # ------------------------------------------------------------------------------ watchers

    @property
    def controls_total(self) -> int:
        """The index the next paused/resumed event will have in the control log."""
        return self._controls_total

    def control_at(self, index: int) -> tuple[int, int, Paused | Resumed] | None:
        """The first logged paused/resumed with index >= *index*, as (before_seq, index,
        event), or None if there is none yet."""
        if not self._controls or index > self._controls[-1][1]:
            return None
        oldest = self._controls[0][1]
        return self._controls[max(index - oldest, 0)]

    def held_output(self, seq: int) -> Output | None:
        """Output *seq* while it is held (sent or not), else None."""
        held = self._outbox.output(seq)
        if held is None:
            return None
        event = self._event(held)
        assert isinstance(event, Output)
        return event

    @property
    def completion(self) -> Completed | None:
        """The process.completed event once it is queued (after every output)."""
        return self._completion


@attrs.define(eq=False)
class EventLog:
    """A sink that keeps what it is sent, in order (self-checks and tests): an `Owner`."""

    events: list[Event] = attrs.field(factory=list)
    _arrived: trio.Event = attrs.field(factory=trio.Event)

    async def send_frame(self, frame: bytes) -> None:
        raise AssertionError("sessions send events, not frames")

    async def send_event(self, event: Event) -> None:
        self.events.append(event)
        self._arrived.set()
        self._arrived = trio.Event()

    async def wait_for(self, kind: type[Event]) -> Event:
        """The first event of *kind* sent so far, waiting for it if there is none yet."""
        while True:
            arrived = self._arrived
            for event in self.events:
                if isinstance(event, kind):
                    return event
            await arrived.wait()


async def _self_check() -> None:
    """Real pipes: output in order with contiguous seqs, back-pressure stops the pump while
    nobody takes events, a late owner gets the replay, and completion comes last."""
    import sys

    from ccx.process import spawn

    code = "import sys\nfor i in range(2000): sys.stdout.write('%d\\n' % i * 1000)\n"
    group = await spawn([sys.executable, "-c", code], executable=sys.executable, cwd=None,
                        env=dict(os.environ), stdin=False)
    output = SessionOutput("check", replay_bytes=64 * 1024, text=True, owner=None)
    process = group.process
    assert process.stdout is not None and process.stderr is not None
    sink = EventLog()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(output.deliver)
        nursery.start_soon(output.pump, process.stdout, "stdout", output.sender())
        nursery.start_soon(output.pump, process.stderr, "stderr", output.sender())
        nursery.start_soon(output.collect, Started("check", group.pid, group.pgid, group.argv),
                           ["stdout", "stderr"],
                           lambda: Completed("check", "exited", 0, None, 0.0,
                                             output.stdout_bytes, output.stderr_bytes))
        with trio.fail_after(10):
            while output.stdout_bytes < 64 * 1024:  # the outbox budget, then the channel...
                await trio.sleep(0.01)
            await trio.sleep(0.2)
        # ...are full, so reading stops and the child (8.9 MB to write) blocks
        assert output.stdout_bytes < 1024 * 1024 and process.returncode is None
        output.attach(sink, -1, paused=False)
        output.announce()
        await process.wait()
        output.stop_reading()
        await output.wait_settled()
        nursery.cancel_scope.cancel()
    outs = [e for e in sink.events if isinstance(e, Output)]
    # an owner that attaches gets the held output and the completion, not process.started
    assert outs == sink.events[:-1] and isinstance(sink.events[-1], Completed), sink.events[-1]
    assert [e.seq for e in outs] == list(range(len(outs)))
    assert b"".join(e.data for e in outs).count(b"\n") == 2000 * 1000
    assert sink.events[-1].stdout_bytes == output.stdout_bytes == len(b"".join(
        e.data for e in outs))
    print("ccx.output: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
