"""One supervised session: a nursery owning the process group, pumps, a channel and a sender.

Inputs: a spawned `Group`, its `SessionOptions`, and an `Owner` that delivers notifications.
Outputs: `process.started/output/paused/resumed/completed` notifications in order, with one
`seq` counter; control (`pause`, `resume`, `cancel`, `write_input`) through a state table,
PAUSE and RESUME acting on the whole tree (group and escaped descendants, `ccx.tree`);
`attach`/`detach` of owners with replay (PROTOCOL.md section 8); `info()` for `status`;
`resize` of a PTY session (PROTOCOL.md section 9). For watchers (PROTOCOL.md section 11,
`ccx.watch`): `news` (an event set whenever something is queued), `held_output(seq)`, the
log of recent `process.paused`/`resumed` (`control_at`), and the registry `watchers`.

Back-pressure: each pump reads at most `CHUNK_BYTES` and awaits `send()` on a channel of
`CHANNEL_CHUNKS` slots; the collector turns chunks into notifications in the `Outbox` and
stops taking from the channel while the outbox holds `replay_bytes` of unsent output; the
deliverer awaits the owner's (WebSocket) send. A slow or absent client stalls delivery, the
outbox fills, the channel fills, the pumps stop reading, the pipe fills, the child blocks in
write(2). Notifications are encoded once, by the collector, to the UTF-8 JSON that goes on
the wire; the outbox holds those bytes, and its budgets count the raw output bytes they carry
(PROTOCOL.md section 8).

Memory per session: with a `spool` (the server's `ccx.spool.SpoolDir`, the default), the
two `replay_bytes` budgets of raw output (unsent, recently sent) are on disk
(`SpoolOutbox`): memory holds an index, control notifications and up to
`outbox.CACHE_BYTES` of frames just queued, plus the channel (`CHANNEL_CHUNKS` x
`CHUNK_BYTES`); a spool that cannot be written makes the collector wait (the child blocks).
Without one, the budgets are held encoded in memory (up to six times larger for text of
control characters). Nothing is dropped either way. Server-wide, the encoded bytes of
every session count against one `HeldBudget` (CCX_MAX_HELD_BYTES): while it is full (after
sent output was forgotten), a session with unsent output also stops taking from the channel,
until bytes are let go anywhere (`HeldBudget.wait_for_room` wakes it: no polling). A session
whose output has all been delivered may still queue one frame, so a client that reads keeps
its session moving. An ended session keeps its unsent output until it is read or forgotten
(`forget()`, at the end of CCX_RETENTION), and `holds_unsent` makes it count against the
session limits meanwhile. A PTY
session has one pump, on the terminal's master (stream "pty", counted as stdout); the master
reports EIO once no process holds the slave: that is its EOF.
Docs: https://trio.readthedocs.io/en/stable/reference-core.html#using-channels-to-pass-values-between-tasks
      https://docs.python.org/3/library/codecs.html#codecs.getincrementaldecoder
"""

from __future__ import annotations

import base64
import codecs
import collections
import enum
import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import attrs
import structlog
import trio

from ccx.descendants import Tracker, signal_procs, still_alive
from ccx.errors import InvalidState
from ccx.log import get_logger
from ccx.outbox import Held, HeldBudget, Outbox, SpoolOutbox
from ccx.owner import Owner as Owner  # re-exported: ccx.api and older imports
from ccx.owner import OwnerGone as OwnerGone
from ccx.process import (
    Grace,
    Group,
    StopStep,
    live_members,
    signal_members,
    signal_name,
    stop_group,
)
from ccx.protocol import encode_utf8, notification
from ccx.spool import SpoolDir
from ccx.tree import pause_tree, refresh, resume_tree, stop_arrivals

log = get_logger("ccx.session")

CHUNK_BYTES = 64 * 1024  # most raw bytes one process.output carries (PROTOCOL.md section 3)
UTF8_CARRY_BYTES = 3  # an incremental decoder holds back at most 3 bytes of a split character
CHANNEL_CHUNKS = 8  # channel slots: 8 x 64 KiB = 512 KiB in flight per session, at most
DRAIN_MAX_READS = 64  # after the group is gone, read what the pipe still holds, not more
LATE_ROUNDS_MAX = 20  # kill-and-rescan rounds for escapees born during the kill path
# A client's CANCEL repeated at least this long after its first one means "force it now":
# SIGKILL without waiting out the grace. Sooner, it is taken for a duplicate (a retry).
REPEAT_CANCEL_FORCES_S = 1.0
# process.paused/resumed kept for watchers (with the seq they came before); older ones are
# dropped, and a watcher that far behind skips them (only PAUSE/RESUME requests make them).
CONTROL_LOG_MAX = 1024


class Watch(Protocol):
    """A watcher of a session (`ccx.watch.Watcher`), as the session sees it."""

    def stop(self) -> None:
        """End the watch: it sends nothing more."""


class State(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLING = "cancelling"
    EXITED = "exited"
    KILLED = "killed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"

    @property
    def ended(self) -> bool:
        return self in ENDED


ENDED = frozenset({State.EXITED, State.KILLED, State.CANCELLED, State.TIMEOUT})

# Control requests allowed in each live state, and the state they lead to. A missing key means
# the request is refused with InvalidState (-32004); CANCEL on an ended session is answered
# before this table is consulted (it returns the final status).
TRANSITIONS: dict[State, dict[str, State]] = {
    State.RUNNING: {"PAUSE": State.PAUSED, "RESUME": State.RUNNING, "CANCEL": State.CANCELLING},
    State.PAUSED: {"PAUSE": State.PAUSED, "RESUME": State.RUNNING, "CANCEL": State.CANCELLING},
    State.CANCELLING: {"CANCEL": State.CANCELLING},
}


@attrs.frozen
class SessionOptions:
    encoding: str = "utf-8"  # or "base64"
    timeout: float | None = None
    kill_grace: float = 5.0
    stdin: bool = False
    linger: float = 0.0  # seconds to keep running without an owner (PROTOCOL.md section 8)
    tag: str | None = None
    replay_bytes: int = 8 * 1024 * 1024  # each of the unsent and the recently-sent budgets


@attrs.frozen
class SessionInfo:
    """What `status` returns (PROTOCOL.md section 2), plus `tag`."""

    session_id: str
    command: list[str]
    pid: int
    pgid: int
    status: str
    started_at: str
    ended_at: str | None
    exit_code: int | None
    signal: str | None
    stdout_bytes: int
    stderr_bytes: int
    tag: str | None
    linger: float  # seconds it survives without a connection (PROTOCOL.md section 8)
    attached: bool  # a live connection receives its notifications
    pty: dict[str, int] | None  # {"cols", "rows"} of a PTY session (PROTOCOL.md section 9)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


@attrs.define(eq=False)
class Session:
    """A running command and everything it owns. `run()` is its whole life, in one nursery."""

    id: str
    group: Group
    options: SessionOptions
    owner: Owner | None
    on_done: Callable[[Session], None] = lambda _: None
    state: State = State.RUNNING
    started_at: float = attrs.field(factory=time.time)
    ended_at: float | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    stop_step: StopStep | None = None
    generation: int = 0  # bumped whenever the owner changes
    _stop_reason: State | None = None  # CANCELLED or TIMEOUT once a stop was asked for
    end_cause: str | None = None  # "drain" or "shutdown": the node ended it (PROTOCOL.md 10)
    _started_monotonic: float = attrs.field(factory=time.monotonic)
    _cancel_requested: trio.Event = attrs.field(factory=trio.Event)
    _done: trio.Event = attrs.field(factory=trio.Event)
    _paused_seen: trio.Event = attrs.field(factory=trio.Event)  # the last PAUSE has settled
    _group_gone: bool = False
    _live_reads: set[trio.CancelScope] = attrs.field(factory=set)
    _control_overflow: collections.deque[str] = attrs.field(factory=collections.deque)
    _stdin_lock: trio.Lock = attrs.field(factory=trio.Lock)
    held: HeldBudget | None = None  # the server's CCX_MAX_HELD_BYTES; None: no such limit
    spool: SpoolDir | None = None  # where held output goes (ccx.spool); None: in memory
    _grace: Grace = attrs.field(init=False)  # SIGTERM to SIGKILL; shortened while it runs
    _client_cancelled_at: float | None = None  # trio time of the first CANCEL by a client
    _outbox: Outbox | SpoolOutbox = attrs.field(init=False)
    tracker: Tracker = attrs.field(init=False)  # descendants, escaped ones included
    _gate_open: bool = False  # closed until the execute/attach response is on its way
    _owner_broken: bool = False  # the owner's connection failed; wait for release or attach
    _collected_all: bool = False  # process.completed is queued; nothing more will be
    _completion: Held | None = None
    _delivering: bool = False
    _send_scope: trio.CancelScope | None = None
    _wake: trio.Event = attrs.field(factory=trio.Event)  # for the deliverer
    _room: trio.Event = attrs.field(factory=trio.Event)  # for the collector
    _scope: trio.CancelScope | None = None
    # Watchers (PROTOCOL.md 11) by connection, and what they wait on: `news` is set (and
    # replaced) whenever a notification is queued. `_controls` holds (before_seq, index,
    # frame) of recent process.paused/resumed: the output seq they came before.
    watchers: dict[Owner, Watch] = attrs.field(factory=dict)
    news: trio.Event = attrs.field(factory=trio.Event)
    _controls: collections.deque[tuple[int, int, bytes]] = attrs.field(
        factory=collections.deque)
    _controls_total: int = 0
    _send: trio.MemorySendChannel[tuple[str, bytes] | str] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[tuple[str, bytes] | str] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        budget = self.options.replay_bytes
        self._outbox = Outbox(budget, self.held) if self.spool is None else \
            SpoolOutbox(budget, self.held, self.spool.spool(self.id, budget))
        self._grace = Grace(self.options.kill_grace)
        self.tracker = Tracker(self.id, self.group.pgid, self.group.whole_session)
        self._send, self._receive = trio.open_memory_channel[tuple[str, bytes] | str](
            CHANNEL_CHUNKS
        )

    # ------------------------------------------------------------------------------ queries

    @property
    def returncode(self) -> int | None:
        return self.group.process.returncode

    @property
    def done(self) -> bool:
        """True once the session task ended: group empty, completion handed over or held."""
        return self._done.is_set()

    @property
    def running(self) -> bool:
        """True while the process group may still have members (what limits count)."""
        return not self._group_gone

    @property
    def next_seq(self) -> int:
        return self._outbox.next_seq

    async def wait_done(self) -> None:
        await self._done.wait()

    def info(self) -> SessionInfo:
        returncode = self.returncode if self.state.ended else None
        return SessionInfo(
            session_id=self.id,
            command=self.group.argv,
            pid=self.group.pid,
            pgid=self.group.pgid,
            status=self.state.value,
            started_at=_iso(self.started_at) or "",
            ended_at=_iso(self.ended_at),
            exit_code=returncode if returncode is not None and returncode >= 0 else None,
            signal=signal_name(returncode),
            stdout_bytes=self.stdout_bytes,
            stderr_bytes=self.stderr_bytes,
            tag=self.options.tag,
            linger=self.options.linger,
            attached=self.owner is not None and not self._owner_broken,
            pty=self.window_size(),
        )

    def window_size(self) -> dict[str, int] | None:
        terminal = self.group.terminal
        return None if terminal is None else {"cols": terminal.cols, "rows": terminal.rows}

    # ------------------------------------------------------------------------------ control

    def _transition(self, request: str) -> State:
        try:
            return TRANSITIONS[self.state][request]
        except KeyError:
            raise InvalidState(
                f"cannot {request} a session that is {self.state.value}",
                {"status": self.state.value},
            ) from None

    async def pause(self) -> State:
        """SIGSTOP to the whole tree (group and escapees, `ccx.tree.pause_tree`); returns
        once every process of it is seen stopped (or the pause's bound was hit, logged).

        A PAUSE that finds the session already paused waits for the pause in progress, if
        any, so its answer makes the same promise.
        **Cancellation**: safe; processes may be left stopped (RESUME or CANCEL wakes them).
        """
        target = self._transition("PAUSE")
        if self.state is target:
            await self._paused_seen.wait()
            return self.state
        self.state = target
        # Kept locally: after a RESUME, a later PAUSE installs its own event, which this
        # (possibly still running) pause must not set.
        seen = self._paused_seen = trio.Event()
        self._post_control("process.paused")
        try:
            settled = await pause_tree(self.group, self.tracker,
                                       wanted=lambda: self.state is State.PAUSED)
        finally:
            seen.set()
        log.info("signal_sent", signals=["SIGSTOP"], pgid=self.group.pgid, session_id=self.id,
                 escapees=[p.pid for p in self.tracker.escapees()] or None, settled=settled)
        return self.state

    def resume(self) -> State:
        """SIGCONT to the whole tree: escapees children-first, then the group
        (`ccx.tree.resume_tree`). Idempotent."""
        target = self._transition("RESUME")
        if self.state is not target:
            self.state = target
            resume_tree(self.group, self.tracker)
            log.info("signal_sent", signals=["SIGCONT"], pgid=self.group.pgid, session_id=self.id,
                     escapees=[p.pid for p in self.tracker.escapees()] or None)
            self._post_control("process.resumed")
        return self.state

    def stop_arrivals(self) -> None:
        """While paused: SIGSTOP whatever of the tree the tracker's last scan saw running (a
        process something outside ccx continued). The manager's periodic scan calls this
        right after updating the tracker."""
        if self.state is State.PAUSED:
            late = stop_arrivals(self.tracker)
            if late:
                log.warning("paused_tree_was_running", pids=[p.pid for p in late],
                            session_id=self.id)

    def cancel(self, *, reason: State = State.CANCELLED, grace: float | None = None,
               by_client: bool = False, cause: str | None = None) -> State:
        """Ask the session to stop (the escalation runs in `run()`); returns the status now.

        *grace* caps the kill grace, also one already running (server shutdown uses it).
        *by_client*: a CANCEL request (native `control` or the MCP `cancel` tool); one that
        comes at least `REPEAT_CANCEL_FORCES_S` after the client's first ends the grace at
        once (SIGKILL). *cause*: "drain" or "shutdown" when the node itself ends the
        session; `process.completed` then says so (`reason`), unless a stop was already
        under way. An ended session returns its final status; otherwise a second cancel
        changes nothing else.
        """
        if grace is not None:
            self._grace.cap(grace)
        if by_client and not self.state.ended:
            now = trio.current_time()
            if self._client_cancelled_at is None:
                self._client_cancelled_at = now
            elif now - self._client_cancelled_at >= REPEAT_CANCEL_FORCES_S:
                self._grace.expire()
                log.info("cancel_forced", session_id=self.id)
        if self.state.ended or self.state is State.CANCELLING:
            return self.state
        self.state = self._transition("CANCEL")
        self._stop_reason = reason
        self.end_cause = cause
        self._cancel_requested.set()
        log.info("cancel_requested", reason=reason.value, session_id=self.id)
        return self.state

    def end_grace_by(self, deadline: float) -> None:
        """SIGKILL is due at trio time *deadline* at the latest (server shutdown)."""
        self._grace.end_by(deadline)

    def kill_now(self) -> None:
        """SIGKILL the whole tree at once, escapees included, and end any grace (a second
        signal during server shutdown). The kill path in `run()` then confirms it is empty."""
        self.cancel(grace=0.0)
        if self._group_gone:
            return
        # A terminal session's groups as the tracker last saw them: no /proc scan per session
        # here (1,000 of them at once); the kill path's own scans confirm it afterwards.
        signal_members(self.group, signal.SIGKILL,
                       session_groups={p.pgid for p in self.tracker.known.values()})
        signal_procs(self.tracker.escapees(), signal.SIGKILL)
        log.info("signal_sent", signals=["SIGKILL"], pgid=self.group.pgid, session_id=self.id,
                 escapees=[p.pid for p in self.tracker.escapees()] or None)

    async def write_input(self, data: bytes, *, eof: bool) -> int:
        """Write *data* to the child's stdin, waiting for the pipe; close it when *eof*. On a
        PTY, write keystrokes to the terminal, and with *eof* its EOF character (^D).

        **Cancellation**: if cancelled mid-write, part of *data* may have been written.
        """
        if self.group.terminal is not None:
            return await self._type(data, eof=eof)
        stdin = self.group.process.stdin
        if stdin is None or not self.options.stdin:
            raise InvalidState("session was started without stdin", {"status": self.state.value})
        async with self._stdin_lock:
            try:
                if data:
                    await stdin.send_all(data)
                if eof:
                    await stdin.aclose()
            except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
                raise InvalidState("stdin is closed", {"status": self.state.value}) from None
        return len(data)

    async def _type(self, data: bytes, *, eof: bool) -> int:
        terminal = self.group.terminal
        assert terminal is not None
        async with self._stdin_lock:
            try:
                if data:
                    await terminal.master.send_all(data)
                if eof:
                    await terminal.master.send_all(terminal.eof_char())
            except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
                raise InvalidState("the terminal is closed", {"status": self.state.value}) \
                    from None
        return len(data)

    def resize(self, cols: int, rows: int) -> dict[str, int]:
        """Set a PTY session's window size; the child gets SIGWINCH (PROTOCOL.md section 9)."""
        terminal = self.group.terminal
        if terminal is None:
            raise InvalidState("session is not on a pty", {"status": self.state.value})
        if self.state.ended:
            raise InvalidState(f"session has ended ({self.state.value})",
                               {"status": self.state.value})
        try:
            terminal.resize(cols, rows)
        except (OSError, trio.ClosedResourceError):
            raise InvalidState("the terminal is closed", {"status": self.state.value}) \
                from None
        log.info("resized", cols=cols, rows=rows, session_id=self.id)
        return {"cols": cols, "rows": rows}

    def announce(self) -> None:
        """The execute (or attach) response went out: notifications may follow it now."""
        self._gate_open = True
        self._poke()

    # ------------------------------------------------------------------------------ owners

    def attach(self, owner: Owner, since_seq: int) -> None:
        """Make *owner* the receiver and queue what it asked to get again (PROTOCOL.md 8).

        The caller checked `check_replay(since_seq)` first. Nothing is sent to *owner* until
        `announce()`; the old owner gets nothing more from here on (an in-flight hand-over is
        abandoned, and re-queued by the rewind).
        """
        self.generation += 1
        if self._send_scope is not None:
            self._send_scope.cancel()
        self.owner = owner
        self._owner_broken = False
        self._gate_open = False
        tail = []
        if self.state is State.PAUSED:
            tail.append(Held("process.paused", encode_utf8(
                notification("process.paused", {"session_id": self.id}))))
        if self._completion is not None:
            tail.append(self._completion)
        self._outbox.rewind(since_seq, tail)
        self._poke()
        self._room_changed()

    def check_replay(self, since_seq: int) -> None:
        self._outbox.check_replay(since_seq)

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
        """Bytes of encoded notifications this session holds in memory (sent and unsent)."""
        return self._outbox.frame_bytes

    def forget(self) -> None:
        """The manager forgets this session (retention over): stop it, let go of its output."""
        self.abandon()
        for watcher in list(self.watchers.values()):
            watcher.stop()
        if self.held is not None:
            self.held.stop_waiting(self._room_changed)
        self._outbox.clear()

    def detach(self) -> None:
        """The owner is gone: keep running and hold output for a later `attach`."""
        self.generation += 1
        self.owner = None
        self._owner_broken = False
        self._poke()

    @property
    def delivering(self) -> bool:
        return self._delivering

    # ------------------------------------------------------------------------------ life

    async def run(self) -> None:
        """Supervise the group until it is empty and `process.completed` is delivered (or,
        with no owner to take them, held with the unsent output for a later `attach`).

        **Cancellation**: cancelling this task still runs the shielded kill path, so the
        group is empty when it returns. `abandon()` cancels it once nobody can attach.
        """
        structlog.contextvars.unbind_contextvars("request_id", "method")  # this task's copy
        with structlog.contextvars.bound_contextvars(session_id=self.id):
            try:
                async with trio.open_nursery() as nursery:
                    self._scope = nursery.cancel_scope
                    for stream, name in self._outputs():
                        nursery.start_soon(self._pump, stream, name, self._send.clone())
                    nursery.start_soon(self._collect)
                    nursery.start_soon(self.deliver)
                    try:
                        await self._supervise()
                    finally:
                        await self._finish()
            finally:
                with trio.CancelScope(shield=True):
                    for resource in self._streams():
                        await resource.aclose()
                self._done.set()
                self.on_done(self)

    def _outputs(self) -> list[tuple[trio.abc.ReceiveStream, str]]:
        """The streams the pumps read, with their `stream` names on the wire."""
        if self.group.terminal is not None:
            return [(self.group.terminal.master, "pty")]
        process = self.group.process
        assert process.stdout is not None and process.stderr is not None
        return [(process.stdout, "stdout"), (process.stderr, "stderr")]

    def _streams(self) -> list[trio.abc.AsyncResource]:
        """Every fd the session holds, closed when it ends."""
        process = self.group.process
        streams: list[trio.abc.AsyncResource | None] = [
            process.stdin, process.stdout, process.stderr,
            self.group.terminal.master if self.group.terminal is not None else None,
        ]
        return [stream for stream in streams if stream is not None]

    def abandon(self) -> None:
        """Stop waiting for an owner: the session is being forgotten or the server stops."""
        if self._scope is not None:
            self._scope.cancel()

    async def _supervise(self) -> None:
        """Return when the leader exits, a stop is requested, or the timeout passes."""
        deadline = (
            trio.current_time() + self.options.timeout
            if self.options.timeout is not None
            else float("inf")
        )
        with trio.move_on_at(deadline):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._cancel_when_requested, nursery.cancel_scope)
                await self.group.process.wait()
                nursery.cancel_scope.cancel()
        if self.group.process.returncode is None and self._stop_reason is None:
            self.cancel(reason=State.TIMEOUT)
            log.info("timeout", timeout_s=self.options.timeout)
        if self._stop_reason is None:  # the leader ended by itself: its status is final now
            self._decide()

    async def _cancel_when_requested(self, scope: trio.CancelScope) -> None:
        await self._cancel_requested.wait()
        scope.cancel()

    def _decide(self) -> None:
        if self.state.ended:
            return
        returncode = self.group.process.returncode
        if self._stop_reason is not None:
            self.state = self._stop_reason
        elif returncode is not None and returncode < 0:
            self.state = State.KILLED
        else:
            self.state = State.EXITED
        self.ended_at = time.time()

    async def _finish(self) -> None:
        """The one exit path: empty the group, decide the status, let the pumps drain."""
        with trio.CancelScope(shield=True):
            if self._stop_reason is None and not self.state.ended:
                self._stop_reason = State.CANCELLED  # cancelled from outside (shutdown, bug)
            await self.refresh_descendants()  # a last look while the tree is still intact
            self.stop_step = await stop_group(self.group, grace=self._grace,
                                              escapees=self.tracker.escapees())
            await self._stop_late_escapees()
            self._decide()
            self._group_gone = True
            for scope in list(self._live_reads):
                scope.cancel()
            self._send.close()

    async def refresh_descendants(self) -> None:
        """Scan /proc now for this session's descendants (see `ccx.descendants`)."""
        await refresh(self.tracker)

    async def _stop_late_escapees(self) -> None:
        """Kill what the kill path could not know of: a member that daemonized during the
        grace (its orphan carries our marker), or a child an escapee forked after the last
        scan. Scan and kill again until a scan finds no one new: killed processes fork no
        more, so this converges; one that outlives SIGKILL (D state) is not waited for twice.
        """
        killed: set[tuple[int, int]] = set()
        for _ in range(LATE_ROUNDS_MAX):
            await self.refresh_descendants()
            late = self.tracker.escapees()
            if not {(p.pid, p.start) for p in late} - killed:
                break
            log.warning("late_escapees", pids=[p.pid for p in late], pgid=self.group.pgid)
            await stop_group(self.group, grace=0, escapees=late)
            killed |= {(p.pid, p.start) for p in late}
        survivors = still_alive(self.tracker.escapees())
        if survivors:
            log.error("escapees_survived", pids=[p.pid for p in survivors])

    # ------------------------------------------------------------------------------ output

    async def _pump(
        self,
        stream: trio.abc.ReceiveStream,
        name: str,
        send: trio.MemorySendChannel[tuple[str, bytes] | str],
    ) -> None:
        """Move bytes from one pipe into the channel until EOF, or until the group is gone."""
        max_bytes = CHUNK_BYTES
        if self.options.encoding == "utf-8":  # room for the bytes the decoder carries over
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
            if self._group_gone:
                scope.cancel()
            try:
                return bytes(await stream.receive_some(max_bytes))
            except trio.BrokenResourceError:  # EIO on a PTY master: no slave is open any more
                return b""
            finally:
                self._live_reads.discard(scope)
        return None

    def _count(self, name: str, size: int) -> None:
        if name in ("stdout", "pty"):  # a terminal merges both; PROTOCOL.md counts it here
            self.stdout_bytes += size
        else:
            self.stderr_bytes += size

    def _post_control(self, method: str) -> None:
        """Queue process.paused/resumed behind the output already read; never blocks."""
        try:
            self._send.send_nowait(method)
        except trio.WouldBlock:
            self._control_overflow.append(method)  # channel full: the collector wakes soon
        except trio.ClosedResourceError:
            pass

    def _poke(self) -> None:
        self._wake.set()
        if self.watchers:  # a watcher takes `news` only once registered: none, none waits
            self.news.set()
            self.news = trio.Event()

    def _room_changed(self) -> None:
        self._room.set()

    def _queue(self, method: str, params: dict[str, object]) -> None:
        message = notification(method, {"session_id": self.id, **params})
        frame = encode_utf8(message)
        if method in ("process.paused", "process.resumed"):
            self._log_control(frame)
        self._outbox.push(Held(method, frame))
        self._poke()

    def _log_control(self, frame: bytes) -> None:
        """Keep a paused/resumed frame for watchers, before the next output seq; forget
        those before the oldest held output (a watcher there has lagged anyway)."""
        self._controls.append((self._outbox.next_seq, self._controls_total, frame))
        self._controls_total += 1
        first = self._outbox.first_seq
        while self._controls and (len(self._controls) > CONTROL_LOG_MAX
                                  or self._controls[0][0] < first):
            self._controls.popleft()

    # ------------------------------------------------------------------------------ watchers

    @property
    def controls_total(self) -> int:
        """The index the next paused/resumed notification will have in the control log."""
        return self._controls_total

    def control_at(self, index: int) -> tuple[int, int, bytes] | None:
        """The first logged paused/resumed with index >= *index*, as (before_seq, index,
        frame), or None if there is none yet."""
        if not self._controls or index > self._controls[-1][1]:
            return None
        oldest = self._controls[0][1]
        return self._controls[max(index - oldest, 0)]

    def held_output(self, seq: int) -> bytes | None:
        """The frame of output *seq* while it is held (sent or not), else None."""
        held = self._outbox.output(seq)
        return None if held is None else held.frame

    @property
    def first_seq(self) -> int:
        """The oldest output seq still held (`next_seq` when none is)."""
        return self._outbox.first_seq

    @property
    def completion(self) -> bytes | None:
        """The process.completed frame once it is queued (after every output)."""
        return None if self._completion is None else self._completion.frame

    def paused_frame(self) -> bytes:
        return encode_utf8(notification("process.paused", {"session_id": self.id}))

    async def _collect(self) -> None:
        """Turn channel items into notifications in the outbox; `seq` is assigned here only."""
        decoders = {
            name: codecs.getincrementaldecoder("utf-8")(errors="replace")
            for _, name in self._outputs()
        }
        self._queue("process.started", {
            "pid": self.group.pid, "pgid": self.group.pgid, "command": self.group.argv,
        })
        async with self._receive:
            async for item in self._receive:
                if isinstance(item, str):
                    self._queue(item, {})
                else:
                    await self._output(item[0], item[1], decoders[item[0]])
                while self._control_overflow:
                    self._queue(self._control_overflow.popleft(), {})
        for name, decoder in decoders.items():
            await self._output(name, b"", decoder, final=True)
        completion = self._completion_params()
        self._completion = Held("process.completed",
                                encode_utf8(notification("process.completed", completion)))
        self._outbox.push(self._completion)
        self._collected_all = True
        self._poke()
        log.info("completed", status=self.state.value, exit_code=completion["exit_code"],
                 signal=completion["signal"], stdout_bytes=self.stdout_bytes,
                 stderr_bytes=self.stderr_bytes,
                 stop_step=self.stop_step.value if self.stop_step else None)

    async def _output(
        self, name: str, data: bytes, decoder: codecs.IncrementalDecoder, *, final: bool = False
    ) -> None:
        # Back-pressure: unsent output is at this session's budget, or the server's held
        # bytes are (CCX_MAX_HELD_BYTES): then a session that still has unsent output waits
        # for it to be read, or for any session to let go of bytes.
        while not self._outbox.has_room or (
                self.held is not None and self.held.full and self._outbox.pending_bytes):
            if self._outbox.has_room and self.held is not None:
                self.held.wait_for_room(self._room_changed)
            await self._room.wait()
            self._room = trio.Event()
        params: dict[str, object] = {"session_id": self.id, "stream": name}
        if self.options.encoding == "base64":
            if not data:
                return
            params["data"] = base64.b64encode(data).decode("ascii")
            params["encoding"] = "base64"
        else:
            text = decoder.decode(data, final=final)
            if not text:
                return
            params["data"] = text
        seq = params["seq"] = self._outbox.take_seq()
        frame = encode_utf8(notification("process.output", params))  # once; held as sent
        await self._outbox.put(Held("process.output", frame, seq, raw_bytes=len(data)))
        self._poke()

    def _completion_params(self) -> dict[str, object]:
        info = self.info()
        params: dict[str, object] = {
            "session_id": self.id,
            "status": info.status,
            "exit_code": info.exit_code,
            "signal": info.signal,
            "duration_s": round(time.monotonic() - self._started_monotonic, 6),
            "stdout_bytes": self.stdout_bytes,
            "stderr_bytes": self.stderr_bytes,
        }
        if self.end_cause is not None and info.status == State.CANCELLED.value:
            params["reason"] = self.end_cause
        return params

    async def deliver(self) -> None:
        """Send held notifications, in order, to whoever owns the session now.

        Returns once everything up to `process.completed` went out, or once the session has
        ended with nobody to send to (the rest stays held for `attach`, which restarts this).
        **Cancellation**: a hand-over to the owner is cancel-safe (the connection's writer
        takes whole messages); an abandoned one stays at the head of the outbox.
        """
        self._delivering = True
        try:
            while True:
                held, owner = self._outbox.head(), self.owner
                if held is None or owner is None or self._owner_broken or not self._gate_open:
                    if self._collected_all and (held is None or owner is None
                                                or self._owner_broken):
                        return
                    await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                generation = self.generation
                with trio.CancelScope() as scope:
                    self._send_scope = scope
                    try:
                        await owner.send_frame(held.frame)
                    except OwnerGone:
                        if generation == self.generation:
                            self._owner_broken = True  # its connection's release decides
                        continue
                    finally:
                        self._send_scope = None
                if generation == self.generation and not scope.cancelled_caught:
                    self._outbox.delivered()
                    self._room_changed()
        finally:
            self._delivering = False


def group_alive(session: Session) -> bool:
    """True while any process of the session's group is alive (used by tests and selftest)."""
    return bool(live_members(session.group))


async def _self_check() -> None:
    """One session end to end: started, output in order, PAUSE/RESUME, CANCEL of a tree that
    traps SIGTERM (KILLED step), completed last; nothing left alive."""
    import json
    import sys

    from ccx.process import spawn

    messages: list[dict[str, object]] = []

    class Collector:
        async def send_message(self, message: dict[str, object]) -> None:
            messages.append(message)

        async def send_frame(self, frame: bytes) -> None:
            messages.append(json.loads(frame))

    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True); time.sleep(60)")
    group = await spawn([sys.executable, "-c", code], executable=sys.executable, cwd=None,
                        env=os.environ, stdin=False)
    session = Session("check", group, SessionOptions(kill_grace=0.2), Collector())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        session.announce()  # what the execute response's sending does
        with trio.fail_after(5):
            while not any(m.get("method") == "process.output" for m in messages):
                await trio.sleep(0.01)
        assert await session.pause() is State.PAUSED
        assert session.resume() is State.RUNNING
        session.cancel()
        await session.wait_done()
    methods = [m["method"] for m in messages]
    assert methods[0] == "process.started" and methods[-1] == "process.completed", methods
    assert {"process.paused", "process.resumed"} <= set(methods), methods
    params = [m["params"] for m in messages if isinstance(m.get("params"), dict)]
    seqs = [p["seq"] for p in params if isinstance(p, dict) and "seq" in p]
    assert seqs == sorted(seqs), seqs
    assert session.state is State.CANCELLED and session.stop_step is StopStep.KILLED
    assert not group_alive(session), "group left"
    print("ccx.session: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
