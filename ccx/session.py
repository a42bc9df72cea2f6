"""One supervised session: a nursery owning the process group, its output part and the kill path.

Inputs: a spawned `Group`, its `SessionOptions`, and an `Owner` (a sink of `ccx.events`).
Outputs: control (`pause`, `resume`, `cancel`, `write_input`, `resize`) through a state
table, PAUSE and RESUME acting on the whole tree (group and escaped descendants, `ccx.tree`);
the one exit path (`stop_group`'s escalation, then late escapees); the final status and
`Completed` event; `info()` for `status` (PROTOCOL.md section 2); `attach`/`detach` of owners
(PROTOCOL.md section 8), passed to the output part. Everything between the child's pipes and
the owner, pumps to deliverer, is `ccx.output.SessionOutput` (`session.output`), which runs
in this session's nursery: cancelling the session's scope still empties the group first.
A PTY session has one pump, on the terminal's master (stream "pty", counted as stdout); the
master reports EIO once no process holds the slave: that is its EOF.
Size (over 400 lines): the state table, the control requests and the one exit path stay
together (each control request checks the state table and may start the exit path, which
decides the final state); what moves bytes is in `ccx.output`, the policy in `ccx.launch`.
Docs: https://trio.readthedocs.io/en/stable/reference-core.html#cancellation-and-timeouts
      https://trio.readthedocs.io/en/stable/reference-core.html#trio.CancelScope.shield
"""

from __future__ import annotations

import enum
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime

import attrs
import structlog
import trio

from ccx.descendants import Tracker, signal_procs, still_alive
from ccx.errors import InvalidState
from ccx.events import Completed, Paused, Resumed, Started
from ccx.log import get_logger
from ccx.outbox import HeldBudget
from ccx.output import SessionOutput
from ccx.owner import Owner
from ccx.process import (
    Grace,
    Group,
    StopStep,
    live_members,
    signal_members,
    signal_name,
    stop_group,
)
from ccx.spool import SpoolDir
from ccx.tree import pause_tree, refresh, resume_tree, stop_arrivals

log = get_logger("ccx.session")

LATE_ROUNDS_MAX = 20  # kill-and-rescan rounds for escapees born during the kill path
# A client's CANCEL repeated at least this long after its first one means "force it now":
# SIGKILL without waiting out the grace. Sooner, it is taken for a duplicate (a retry).
REPEAT_CANCEL_FORCES_S = 1.0


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
    """One session's settings, resolved by the manager from `execute` params and `Settings`
    (whose fields hold the server defaults: none are restated here)."""

    kill_grace: float  # seconds between SIGTERM and SIGKILL
    replay_bytes: int  # each of the unsent and the recently-sent budgets (PROTOCOL.md 8)
    encoding: str = "utf-8"  # or "base64"
    timeout: float | None = None
    stdin: bool = False
    linger: float = 0.0  # seconds to keep running without an owner (PROTOCOL.md section 8)
    tag: str | None = None


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
    output: SessionOutput  # pumps to deliverer (ccx.output): `create` makes it
    on_done: Callable[[Session], None] = lambda _: None
    state: State = State.RUNNING
    started_at: float = attrs.field(factory=time.time)
    ended_at: float | None = None
    stop_step: StopStep | None = None
    _stop_reason: State | None = None  # CANCELLED or TIMEOUT once a stop was asked for
    end_cause: str | None = None  # "drain" or "shutdown": the node ended it (PROTOCOL.md 10)
    _started_monotonic: float = attrs.field(factory=time.monotonic)
    _cancel_requested: trio.Event = attrs.field(factory=trio.Event)
    _done: trio.Event = attrs.field(factory=trio.Event)
    _paused_seen: trio.Event = attrs.field(factory=trio.Event)  # the last PAUSE has settled
    _group_gone: bool = False
    _stdin_lock: trio.Lock = attrs.field(factory=trio.Lock)
    _grace: Grace = attrs.field(init=False)  # SIGTERM to SIGKILL; shortened while it runs
    _client_cancelled_at: float | None = None  # trio time of the first CANCEL by a client
    tracker: Tracker = attrs.field(init=False)  # descendants, escaped ones included
    _scope: trio.CancelScope | None = None

    @classmethod
    def create(cls, session_id: str, group: Group, options: SessionOptions,
               owner: Owner | None, *, on_done: Callable[[Session], None] = lambda _: None,
               held: HeldBudget | None = None, spool: SpoolDir | None = None) -> Session:
        """A session of *group* whose events go to *owner*; its output charges *held* (the
        server's CCX_MAX_HELD_BYTES) and is spooled under *spool* (None: held in memory)."""
        output = SessionOutput(session_id, options.replay_bytes,
                               text=options.encoding == "utf-8", owner=owner, held=held,
                               spool=spool)
        return cls(session_id, group, options, output, on_done)

    def __attrs_post_init__(self) -> None:
        self._grace = Grace(self.options.kill_grace)
        self.tracker = Tracker(self.id, self.group.pgid, self.group.whole_session)

    # ------------------------------------------------------------------------------ queries

    @property
    def owner(self) -> Owner | None:
        return self.output.owner

    @property
    def generation(self) -> int:
        """Bumped whenever the owner changes."""
        return self.output.generation

    @property
    def stdout_bytes(self) -> int:
        return self.output.stdout_bytes

    @property
    def stderr_bytes(self) -> int:
        return self.output.stderr_bytes

    @property
    def returncode(self) -> int | None:
        return self.group.process.returncode

    @property
    def done(self) -> bool:
        """True once the session has settled: group empty, completion handed over or held
        with nobody to take it (its task lives on for a later `attach` until forgotten)."""
        return self._done.is_set()

    @property
    def running(self) -> bool:
        """True while the process group may still have members (what limits count)."""
        return not self._group_gone

    @property
    def next_seq(self) -> int:
        return self.output.next_seq

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
            attached=self.output.attached,
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
        self.output.post_control(Paused)
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
            self.output.post_control(Resumed)
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

    # ------------------------------------------------------------------------------ owners

    def announce(self) -> None:
        """The execute (or attach) response went out: events may follow it now."""
        self.output.announce()

    def attach(self, owner: Owner, since_seq: int) -> None:
        """Make *owner* the receiver and queue what it asked to get again (PROTOCOL.md 8);
        see `SessionOutput.attach`. The caller checked `output.check_replay` first."""
        self.output.attach(owner, since_seq,
                           paused=self.state is State.PAUSED and self.output.completion is None)

    def detach(self) -> None:
        """The owner is gone: keep running and hold output for a later `attach`."""
        self.output.detach()

    def forget(self) -> None:
        """The manager forgets this session (retention over): stop it, let go of its output."""
        self.abandon()
        self.output.clear()

    # ------------------------------------------------------------------------------ life

    async def run(self) -> None:
        """Supervise the group until it is empty and its output is collected; settle once
        `process.completed` is delivered (or held, with no owner to take it); then go on
        delivering to later owners until the session is forgotten (`abandon()`).

        **Cancellation**: cancelling this task still runs the shielded kill path, so the
        group is empty when it returns.
        """
        structlog.contextvars.unbind_contextvars("request_id", "method")  # this task's copy
        with structlog.contextvars.bound_contextvars(session_id=self.id):
            try:
                async with trio.open_nursery() as nursery:
                    self._scope = nursery.cancel_scope
                    nursery.start_soon(self.output.deliver)  # for the session's whole life
                    await self._supervise_output()
                    await self.output.wait_settled()
                    self._settle()
            finally:
                self._settle()

    async def _supervise_output(self) -> None:
        """Pumps and collector beside the supervision; the one exit path; every fd closed."""
        try:
            async with trio.open_nursery() as nursery:
                outputs = self._outputs()
                for stream, name in outputs:
                    nursery.start_soon(self.output.pump, stream, name, self.output.sender())
                nursery.start_soon(
                    self.output.collect,
                    Started(self.id, self.group.pid, self.group.pgid, self.group.argv),
                    [name for _, name in outputs], self._completed)
                try:
                    await self._supervise()
                finally:
                    await self._finish()
        finally:
            with trio.CancelScope(shield=True):
                for resource in self._streams():
                    await resource.aclose()

    def _settle(self) -> None:
        if not self._done.is_set():
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
            self.output.stop_reading()

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

    def _completed(self) -> Completed:
        """The completion event, once the group is gone and the status decided (logged)."""
        info = self.info()
        log.info("completed", status=info.status, exit_code=info.exit_code,
                 signal=info.signal, stdout_bytes=self.stdout_bytes,
                 stderr_bytes=self.stderr_bytes,
                 stop_step=self.stop_step.value if self.stop_step else None)
        return Completed(
            session_id=self.id,
            status=info.status,
            exit_code=info.exit_code,
            signal=info.signal,
            duration_s=round(time.monotonic() - self._started_monotonic, 6),
            stdout_bytes=self.stdout_bytes,
            stderr_bytes=self.stderr_bytes,
            reason=self.end_cause if info.status == State.CANCELLED.value else None,
        )


def group_alive(session: Session) -> bool:
    """True while any process of the session's group is alive (used by tests and selftest)."""
    return bool(live_members(session.group))


async def _self_check() -> None:
    """One session end to end: started, output in order, PAUSE/RESUME, CANCEL of a tree that
    traps SIGTERM (KILLED step), completed last; nothing left alive."""
    import os
    import sys

    from ccx.events import Output
    from ccx.output import EventLog
    from ccx.process import spawn

    sink = EventLog()

    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True); time.sleep(60)")
    group = await spawn([sys.executable, "-c", code], executable=sys.executable, cwd=None,
                        env=os.environ, stdin=False)
    options = SessionOptions(kill_grace=0.2, replay_bytes=1 << 20)
    session = Session.create("check", group, options, sink)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        session.announce()  # what the execute response's sending does
        with trio.fail_after(5):
            await sink.wait_for(Output)
        assert await session.pause() is State.PAUSED
        assert session.resume() is State.RUNNING
        session.cancel()
        await session.wait_done()
        session.forget()  # the deliverer would wait for a later attach until then
    events = sink.events
    methods = [e.method for e in events]
    assert methods[0] == "process.started" and methods[-1] == "process.completed", methods
    assert {"process.paused", "process.resumed"} <= set(methods), methods
    seqs = [e.seq for e in events if isinstance(e, Output)]
    assert seqs == sorted(seqs), seqs
    assert session.state is State.CANCELLED and session.stop_step is StopStep.KILLED
    assert not group_alive(session), "group left"
    print("ccx.session: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
