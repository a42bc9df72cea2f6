"""The session registry: limits, spawning (after `ccx.launch`'s policy), lookup, drain,
shutdown of all (and the SIGKILL of all on a second signal).

Inputs: `Settings`, validated `ExecuteParams`, and the `Owner` (connection) asking.
Outputs: running `Session`s whose tasks live in the manager's nursery (so a session is not
torn down by the task that asked for it), lookups by id, and ended sessions kept for
`CCX_RETENTION` seconds. The MCP output buffers of sessions started over MCP live here too
(`mcp_buffers`), not in one MCP connection, so a lingering session's unread output outlives
the connection that started it; a buffer is forgotten with its session.

Memory bounds (PROTOCOL.md section 6, docs/security.md): the manager owns `held`, the
`HeldBudget` of CCX_MAX_HELD_BYTES that every session's outbox and every MCP buffer charges
with the bytes it keeps. When it is full, sent replay output is forgotten (oldest first),
then `execute` gets -32003 and sessions with unsent output are throttled. Sessions that hold
unsent output count against CCX_MAX_SESSIONS (and per connection) as running ones do, so
sessions that end with output nobody read cannot pile up; at most MAX_ENDED_KEPT other ended
sessions are remembered, and their replay is capped by CCX_ENDED_REPLAY_BYTES.
Size (over 400 lines): the registry's life cycle (execute, attach, watch, release,
retention, drain, shutdown) works on one map of sessions and one nursery; the launch policy
is `ccx.launch`, each session's supervision `ccx.session`.
Docs: https://trio.readthedocs.io/en/stable/reference-core.html#nurseries-and-spawning
"""

from __future__ import annotations

import collections
import secrets
import time
import uuid
from collections.abc import Iterator

import attrs
import structlog
import trio

from ccx.cluster import Cluster
from ccx.config import Settings
from ccx.crash_record import GroupRecord, StateFile
from ccx.descendants import SESSION_ENV, adopted_by_session
from ccx.errors import (
    InvalidParams,
    LimitReached,
    NodeDraining,
    SessionNotFound,
    SpawnFailed,
)
from ccx.events import Detached
from ccx.launch import LaunchPolicy
from ccx.log import get_logger
from ccx.mcp_buffer import OutputBuffer
from ccx.metrics import Metrics
from ccx.outbox import HeldBudget
from ccx.owner import Owner, OwnerGone
from ccx.params import ExecuteParams
from ccx.process import Group, StopStep, spawn, stop_group
from ccx.procfs import shared_snapshot
from ccx.session import Session, SessionOptions
from ccx.spool import SpoolDir
from ccx.watch import Watcher

log = get_logger("ccx.manager")

MAX_ENDED_KEPT = 1000  # ended sessions remembered at most, whatever CCX_RETENTION says
SWEEP_MIN_S = 0.1  # retention sweeps: at least this far apart...
SWEEP_MAX_S = 60.0  # ...and at most this far (an expired session lingers this long at worst)
DETACH_NOTICE_TIMEOUT_S = 10.0  # how long we try to tell a connection it lost a session


def new_incarnation() -> str:
    """A name for this start of the server: the start second in base 36, then 6 random hex
    digits (no '.', never the same twice in practice, and roughly ordered by start time)."""
    seconds, digits = int(time.time()), ""
    while seconds:
        seconds, digit = divmod(seconds, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[digit] + digits
    return f"{digits or '0'}{secrets.token_hex(3)}"


async def _close_pipes(group: Group) -> None:
    with trio.CancelScope(shield=True):
        for stream in (group.process.stdin, group.process.stdout, group.process.stderr):
            if stream is not None:
                await stream.aclose()


@attrs.define(eq=False)
class SessionManager:
    """Owns every session; the API layer asks it to start, find and stop them."""

    settings: Settings
    _nursery: trio.Nursery | None = None
    _sessions: dict[str, Session] = attrs.field(factory=dict)
    _accepting: bool = True
    _changed: trio.Event = attrs.field(factory=trio.Event)  # set by `_notify`
    incarnation: str = attrs.field(factory=new_incarnation)  # new on every start
    draining: bool = False  # PROTOCOL.md 10: execute refused with -32007 meanwhile
    _drain_deadline: trio.CancelScope | None = None  # a pending drain timeout
    _drain_for_good: bool = False  # SIGTERM's drain: the node is going away, no undo
    state: StateFile = attrs.field(factory=lambda: StateFile(""))  # the crash record
    spool: SpoolDir | None = None  # held output on disk (ccx.spool); None: in memory
    started_total: int = 0
    spawn_failures_total: int = 0
    metrics: Metrics = attrs.field(factory=Metrics)
    _forgotten_bytes: collections.Counter[str] = attrs.field(factory=collections.Counter)
    # session id -> its MCP output buffer (ccx.mcp), whichever MCP connection reads it now
    mcp_buffers: dict[str, OutputBuffer] = attrs.field(factory=dict)
    # bytes of output held in memory by every session and MCP buffer (CCX_MAX_HELD_BYTES)
    held: HeldBudget = attrs.field(
        default=attrs.Factory(lambda self: HeldBudget(self.settings.max_held_bytes),
                              takes_self=True))
    # the allow-list, env policy and shell rule that turn execute params into a Launch
    policy: LaunchPolicy = attrs.field(
        default=attrs.Factory(lambda self: LaunchPolicy(self.settings), takes_self=True))
    # the other nodes and the connections to them (PROTOCOL.md 10; ccx.cluster)
    cluster: Cluster = attrs.field(
        default=attrs.Factory(lambda self: Cluster(self.settings, self.incarnation),
                              takes_self=True))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host session tasks until cancelled; cancelling it still empties every group."""
        self.state = StateFile.open(self.settings.state_dir, node=self.settings.node_name,
                                    incarnation=self.incarnation)
        base = self.settings.spool_base
        if base is not None:
            self.spool = SpoolDir.open(base, node=self.settings.node_name,
                                       incarnation=self.incarnation)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.cluster.run)
                if self.settings.track_interval > 0:
                    nursery.start_soon(self._track_descendants)
                nursery.start_soon(self._sweep_expired)
                task_status.started()
                await trio.sleep_forever()
        finally:  # every group is empty now (each session ran its shielded kill path)...
            if not any(s.stop_step is StopStep.OUTLIVED for s in self._sessions.values()):
                self.state.remove()  # ...unless one outlived SIGKILL: the record keeps it
            if self.spool is not None:
                self.spool.close()

    def _record(self) -> None:
        """Rewrite the crash record: every group that may still have members, including
        one that outlived SIGKILL (D state), so the next start tries again."""
        self.state.write(
            GroupRecord(s.id, s.group.pgid, s.group.start or 0,
                        tuple((p.pid, p.start) for p in s.tracker.escapees()))
            for s in self._sessions.values()
            if s.running or s.stop_step is StopStep.OUTLIVED
        )

    async def _track_descendants(self) -> None:
        """Every `track_interval` s, one /proc scan updates each running session's tracker,
        so a descendant that escapes the group is known before its parent chain breaks, and
        stops what it finds running in a paused session's tree."""
        while True:
            await trio.sleep(self.settings.track_interval)
            running = self.running()
            if not running:
                continue
            procs = await shared_snapshot()
            adopted = adopted_by_session(procs)
            for session in running:
                session.tracker.update(procs, adopted.get(session.id, []))
                session.stop_arrivals()  # a paused tree stays stopped (ccx.tree)
            if self._accepting:  # during shutdown: see _on_done
                self._record()  # escapees are part of it

    # ------------------------------------------------------------------------------ lookups

    def live(self) -> list[Session]:
        """Sessions not yet settled (process alive, or completion not yet handed over to an
        attached owner); a settled session's task lives on only to deliver to later owners."""
        return [s for s in self._sessions.values() if not s.done]

    def running(self) -> list[Session]:
        """Sessions whose process group may still have members."""
        return [s for s in self._sessions.values() if s.running]

    def counted(self) -> list[Session]:
        """What the session limits count: running sessions, and ended ones that still hold
        output no client has received (so a client cannot pile up unread output)."""
        return [s for s in self._sessions.values() if s.running or self._holds_unread(s)]

    def _holds_unread(self, session: Session) -> bool:
        """Output no client has received: in the outbox, or in an MCP buffer, unread."""
        buffer = self.mcp_buffers.get(session.id)
        return session.output.holds_unsent or (buffer is not None and buffer.holds_unread)

    def owned_by(self, owner: Owner) -> list[Session]:
        return [s for s in self._sessions.values() if s.owner is owner and not s.done]

    def all(self, tag: str | None = None) -> Iterator[Session]:
        self._forget_expired()
        return iter([s for s in self._sessions.values() if tag is None or s.options.tag == tag])

    def get(self, session_id: object) -> Session:
        self._forget_expired()
        session = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None:
            raise SessionNotFound(f"unknown session: {session_id}", {"session_id": session_id})
        return session

    def find(self, session_id: str) -> Session | None:
        """The session with this id while it is held (no error, no retention sweep)."""
        return self._sessions.get(session_id)

    def _forget_expired(self) -> None:
        """Drop ended sessions older than CCX_RETENTION (and the oldest beyond the cap)."""
        now = time.time()
        ended = sorted((s.ended_at, s.id, self._holds_unread(s)) for s in self._sessions.values()
                       if s.ended_at is not None and not s.running)
        # Unsent output is never dropped before its retention ends; sessions holding it are
        # few (they count against CCX_MAX_SESSIONS), so the cap concerns the others only.
        overflow = sum(not unsent for _, _, unsent in ended) - MAX_ENDED_KEPT
        for ended_at, sid, unsent in ended:
            expired = now - ended_at > self.settings.retention
            if expired or (overflow > 0 and not unsent):
                overflow -= not unsent
                session = self._sessions.pop(sid)
                self._forgotten_bytes.update(stdout=session.stdout_bytes,
                                             stderr=session.stderr_bytes)
                session.forget()
                buffer = self.mcp_buffers.pop(sid, None)
                if buffer is not None:
                    buffer.close()
        self._cap_ended_replay()

    def _cap_ended_replay(self) -> None:
        """Keep ended sessions' sent output for replay within CCX_ENDED_REPLAY_BYTES, the
        newest first: without it 1000 ended sessions could hold 1000 x CCX_REPLAY_BYTES."""
        budget = self.settings.ended_replay_bytes
        ended = sorted((s for s in self._sessions.values()
                        if s.ended_at is not None and not s.running and s.output.replay_bytes_held),
                       key=lambda s: s.ended_at or 0.0, reverse=True)
        for session in ended:
            held = session.output.replay_bytes_held
            if held <= budget:
                budget -= held
            else:
                session.output.forget_replay()
                log.debug("replay_forgotten", session_id=session.id, bytes=held)

    @property
    def id_prefix(self) -> str:
        """What starts every id this server hands out (sessions, `Mcp-Session-Id`):
        `<node>.<incarnation>.` with CCX_NODE_NAME set, else nothing (PROTOCOL.md 10)."""
        node = self.settings.node_name
        return f"{node}.{self.incarnation}." if node else ""

    def _new_id(self) -> str:
        """A fresh session id: random hex after `id_prefix`."""
        return self.id_prefix + uuid.uuid4().hex

    def busy(self) -> list[Session]:
        """Sessions a drain waits for: the process runs, or its completion is still owed to
        an attached owner (an ended session that waits for an attach is not one)."""
        return [s for s in self.live() if s.running or s.owner is not None]

    def ready(self) -> str | None:
        """None while new sessions are taken; else why not: "draining", or "full" (execute
        would get -32003 for the whole server: CCX_MAX_SESSIONS or CCX_MAX_HELD_BYTES)."""
        if self.draining or not self._accepting:
            return "draining"
        if len(self.counted()) >= self.settings.max_sessions or self.held.full:
            return "full"
        return None

    def output_bytes(self) -> dict[str, int]:
        """Bytes read from every session's stdout/stderr since start (forgotten ones too)."""
        totals = collections.Counter(self._forgotten_bytes)
        for session in self._sessions.values():
            totals.update(stdout=session.stdout_bytes, stderr=session.stderr_bytes)
        return {"stdout": totals["stdout"], "stderr": totals["stderr"]}

    # ------------------------------------------------------------------------------ policy

    def _check_limits(self, owner: Owner | None) -> None:
        if self.draining:
            raise NodeDraining("node draining", {"node": self.settings.node_name})
        if not self._accepting:
            raise LimitReached("server is shutting down")
        live = self.counted()
        if len(live) >= self.settings.max_sessions:
            raise LimitReached(f"session limit reached ({self.settings.max_sessions} per server)",
                               {"limit": self.settings.max_sessions, "scope": "server"})
        per_connection = self.settings.max_sessions_per_connection
        if owner is not None and sum(s.owner is owner for s in live) >= per_connection:
            raise LimitReached(f"session limit reached ({per_connection} per connection)",
                               {"limit": per_connection, "scope": "connection"})
        if self.held.full:
            limit = self.settings.max_held_bytes
            raise LimitReached(f"output held in memory is at its limit ({limit} bytes, "
                               "CCX_MAX_HELD_BYTES) until clients read it",
                               {"limit": limit, "scope": "held_bytes"})

    # ------------------------------------------------------------------------------ life

    async def execute(self, params: ExecuteParams, owner: Owner | None) -> Session:
        """Check policy and limits, spawn the group, start its session task.

        The session sends nothing until `Session.announce()` (after the execute response).
        """
        if self.draining:  # before any other check: a draining node answers -32007 alone
            self._check_limits(owner)
        if params.timeout is not None and params.timeout <= 0:
            raise InvalidParams("Invalid params: timeout must be positive")
        if params.kill_grace is not None and params.kill_grace < 0:
            raise InvalidParams("Invalid params: kill_grace must not be negative")
        if params.kill_grace is not None and params.kill_grace > self.settings.max_kill_grace:
            raise InvalidParams(f"Invalid params: kill_grace must be at most "
                                f"{self.settings.max_kill_grace:g} s (CCX_MAX_KILL_GRACE)",
                                {"max_kill_grace": self.settings.max_kill_grace})
        if params.linger < 0:
            raise InvalidParams("Invalid params: linger must not be negative")
        try:
            launch = self.policy.resolve(params)
        except SpawnFailed:  # no such executable or cwd: a spawn failure for operators too
            self.spawn_failures_total += 1
            raise
        self._check_limits(owner)
        assert self._nursery is not None, "SessionManager.run() is not running"
        session_id = self._new_id()
        # The marker lets the subreaper recognise this session's orphans (ccx.descendants).
        env = {**launch.env, SESSION_ENV: session_id}
        try:
            group = await spawn(launch.argv, executable=launch.executable, cwd=launch.cwd,
                                env=env, stdin=params.stdin and params.pty is None,
                                pty=None if params.pty is None
                                else (params.pty.cols, params.pty.rows))
        except OSError as exc:
            self.spawn_failures_total += 1
            log.warning("spawn_failed", command=launch.argv, error=str(exc))
            raise SpawnFailed(f"cannot start {launch.argv[0]}: {exc.strerror or exc}",
                              {"executable": launch.executable, "errno": exc.errno}) from None
        try:
            options = SessionOptions(
                encoding=params.encoding,
                timeout=params.timeout,
                kill_grace=self.settings.kill_grace if params.kill_grace is None
                else params.kill_grace,
                stdin=params.stdin or params.pty is not None,
                linger=min(params.linger, self.settings.max_linger),
                tag=params.tag,
                replay_bytes=self.settings.replay_bytes,
            )
            session = Session.create(session_id, group, options, owner, on_done=self._on_done,
                                     held=self.held, spool=self.spool)
            # Shutdown (or a drain) may have begun while the process was starting: it
            # cancelled only the sessions it saw; the nursery may even be closed by now.
            if not self._accepting or self.draining:
                self._check_limits(owner)
            # No checkpoint between spawn and here: the group cannot be orphaned by
            # cancellation.
            self._nursery.start_soon(self._run_session, session)
        except BaseException as exc:  # a group nobody supervises must not survive
            log.warning("spawned_but_not_supervised", pgid=group.pgid, error=repr(exc))
            await stop_group(group, grace=0)  # shielded: finishes even when cancelled
            await _close_pipes(group)
            if isinstance(exc, RuntimeError):  # "Nursery is closed to new arrivals"
                raise LimitReached("server is shutting down") from None
            raise
        self._sessions[session.id] = session
        self._record()  # on disk before the client hears of it
        self.started_total += 1
        with structlog.contextvars.bound_contextvars(session_id=session.id):
            log.info("spawned", command=launch.argv, executable=launch.executable,
                     pid=group.pid, pgid=group.pgid, cwd=launch.cwd)
        return session

    async def _run_session(self, session: Session) -> None:
        try:
            await session.run()
        except Exception:  # a bug in one session must not take the server down
            log.exception("session_crashed", session_id=session.id)
        else:
            return
        # Its deliverer went down with it: one more, so that what it holds still reaches an
        # owner that attaches (until it is forgotten), as it would have without the bug.
        try:
            with structlog.contextvars.bound_contextvars(session_id=session.id):
                await session.output.deliver()
        except Exception:
            log.exception("session_delivery_crashed", session_id=session.id)

    def _on_done(self, session: Session) -> None:
        outlived = session.stop_step is StopStep.OUTLIVED
        if outlived:
            log.error("outlived_group_kept_in_record", session_id=session.id,
                      pgid=session.group.pgid)
        # During shutdown the record is not rewritten per ended session (N ends would write
        # N records of up to N groups); it is removed at the end, and a record a crash leaves
        # behind that names groups already gone costs the next start only a look at /proc.
        # A group that outlived SIGKILL is written at once all the same.
        if self._accepting or outlived:
            self._record()
        if self._accepting:
            self._forget_expired()  # the cap on ended sessions holds at once
        self._notify()

    def _notify(self) -> None:
        """Wake whoever waits for the session set to change (`_changes`: drain, shutdown)."""
        self._changed.set()
        self._changed = trio.Event()

    async def _sweep_expired(self) -> None:
        """Forget ended sessions once CCX_RETENTION has passed, even if nobody looks them up:
        each holds up to `replay_bytes` of output for replay."""
        while True:
            await trio.sleep(min(max(self.settings.retention / 2, SWEEP_MIN_S), SWEEP_MAX_S))
            self._forget_expired()

    def release(self, owner: Owner) -> None:
        """The owner's connection closed: end its watches (PROTOCOL.md 11), detach its
        sessions; cancel those without linger (PROTOCOL.md 5); start the linger clock of the
        others."""
        self.cluster.release(owner)  # its links to other nodes close: the same, there
        for watched in self._sessions.values():
            for registry in (watched.output.watchers, watched.output.lagging):
                watcher = registry.pop(owner, None)
                if watcher is not None:
                    watcher.stop()
        self._notify()  # a drain or shutdown waiting for this owner's sessions looks again
        for session in [s for s in self._sessions.values() if s.owner is owner]:
            session.detach()  # done ones too: they hold nothing for a closed connection
            if session.options.linger > 0 and not session.state.ended:
                log.info("detached", session_id=session.id, linger_s=session.options.linger)
                assert self._nursery is not None
                self._nursery.start_soon(self._linger, session, session.generation)
            else:
                session.cancel()

    async def _linger(self, session: Session, generation: int) -> None:
        await trio.sleep(session.options.linger)
        if session.generation == generation and session.owner is None:
            log.info("linger_expired", session_id=session.id)
            session.cancel()

    def attach(self, session_id: object, since_seq: int, owner: Owner) -> Session:
        """Move *session_id* to *owner* and queue its replay (PROTOCOL.md section 8).

        The caller must `announce()` the session once the attach result is sent.
        """
        session = self.get(session_id)
        session.output.check_replay(since_seq)
        previous = session.owner
        session.attach(owner, since_seq)
        assert self._nursery is not None
        if previous is not None and previous is not owner:
            self._nursery.start_soon(self._tell_detached, previous, session.id)
        log.info("attached", session_id=session.id, since_seq=since_seq,
                 next_seq=session.next_seq)
        return session

    def watch(self, session_id: object, since_seq: int, owner: Owner) -> tuple[Session, Watcher]:
        """Subscribe *owner* to a session without moving it (PROTOCOL.md section 11); a
        watch by the same connection replaces its earlier one. At most CCX_MAX_WATCHERS.

        The caller sets `watcher.gate` once the watch result is sent.
        """
        session = self.get(session_id)
        session.output.check_replay(since_seq)
        watchers = session.output.watchers
        for other, lagging in list(watchers.items()):
            if lagging.lagged and other is not owner:  # its place is free at once; its task
                del watchers[other]  # still sends process.lagged when its socket takes it
                session.output.lagging[other] = lagging
        previous = watchers.get(owner)
        limit = self.settings.max_watchers
        if previous is None and len(watchers) >= limit:
            raise LimitReached(f"watcher limit reached ({limit} per session)",
                               {"limit": limit, "scope": "watchers"})
        if previous is not None:
            previous.stop()
        watcher = Watcher.open(session, owner, since_seq)
        watchers[owner] = watcher
        assert self._nursery is not None
        self._nursery.start_soon(watcher.run)
        log.info("watching", session_id=session.id, since_seq=since_seq,
                 next_seq=session.next_seq, watchers=len(watchers))
        return session, watcher

    def unwatch(self, session_id: str, owner: Owner) -> None:
        """End *owner*'s watch of the session, if any (idempotent; an unknown or forgotten
        session is simply not watched)."""
        session = self._sessions.get(session_id)
        watcher = None if session is None else session.output.watchers.pop(owner, None)
        if watcher is not None:
            watcher.stop()

    @staticmethod
    async def _tell_detached(previous: Owner, session_id: str) -> None:
        with trio.move_on_after(DETACH_NOTICE_TIMEOUT_S):
            try:
                await previous.send_event(Detached(session_id))
            except OwnerGone:
                pass

    def kill_all(self) -> None:
        """SIGKILL every group and tracked escapee now, ending every grace (a second signal
        during shutdown, PROTOCOL.md 6); each session's kill path then confirms it."""
        self._accepting = False
        for session in self.running():
            session.kill_now()

    # ------------------------------------------------------------------------------ drain

    def drain(self, *, timeout: float | None = None, undo: bool = False,
              for_good: bool = False) -> dict[str, object]:
        """Start (or with *undo* end) draining: execute is refused with -32007, the rest
        works. With *timeout*, the sessions still busy then are cancelled (`reason`
        "drain"); a later drain with a timeout replaces a pending one, *undo* calls it off.
        *for_good*: the node is going away (SIGTERM); from then on *undo* is refused with
        -32007, `data.stopping` true, and the node stays draining.
        """
        if undo and self._drain_for_good:
            raise NodeDraining("node draining: it is stopping (SIGTERM), the drain cannot be "
                               "undone", {"node": self.settings.node_name, "stopping": True})
        self._drain_for_good = self._drain_for_good or for_good
        if undo:
            self.draining = False
            self._call_off_drain_timeout()
        else:
            self.draining = True
            if timeout is not None:
                self._call_off_drain_timeout()
                assert self._nursery is not None, "SessionManager.run() is not running"
                scope = self._drain_deadline = trio.CancelScope()
                self._nursery.start_soon(self._drain_after, timeout, scope)
        log.info("drain", draining=self.draining, timeout_s=timeout,
                 sessions=len(self.busy()))
        self._notify()
        return {"draining": self.draining, "sessions": len(self.busy())}

    def _call_off_drain_timeout(self) -> None:
        if self._drain_deadline is not None:
            self._drain_deadline.cancel()
            self._drain_deadline = None

    async def _drain_after(self, timeout: float, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(timeout)
            self._drain_deadline = None
            self.cancel_all(cause="drain")

    def cancel_all(self, *, cause: str, grace: float | None = None) -> None:
        """Cancel every live session, saying *cause* in its completion."""
        for session in self.live():
            session.cancel(grace=grace, cause=cause)

    async def _changes(self) -> None:
        """Wait for the next change of the session set (a session started or ended, an
        owner let go: `_notify`)."""
        await self._changed.wait()

    async def wait_idle(self) -> None:
        """Return once no session is busy (`busy()`): what a drain waits for."""
        while self.busy():
            await self._changes()

    async def shutdown(self, *, timeout: float, cause: str = "shutdown") -> None:
        """Refuse new sessions, cancel all (grace capped at the server's, *cause* in their
        completions), wait for them to end and hand over their completions: every session's
        kill path runs at once, in its own task, and the wait wakes on each session's end
        (no polling).

        **Cancellation**: waits at most *timeout*; sessions still running then are cancelled
        from outside, which still runs their shielded kill path.
        """
        self._accepting = False
        self._call_off_drain_timeout()
        self.cancel_all(cause=cause, grace=self.settings.kill_grace)
        # However long the SIGTERMs of many sessions take to go out, SIGKILL is due for
        # every one of them CCX_KILL_GRACE after the shutdown began (PROTOCOL.md 5).
        kill_at = trio.current_time() + self.settings.kill_grace
        for session in self.live():
            session.end_grace_by(kill_at)
        with trio.move_on_after(timeout):
            # A session that has ended with nobody to deliver to waits for an attach that
            # cannot come any more: it does not hold the shutdown up.
            await self.wait_idle()
            for session in self.live():
                session.abandon()
            return
        if any(s.running for s in self.live()):
            log.error("shutdown_timeout", live=[s.id for s in self.live()])
        else:  # every group is gone; some owners did not read their completions in time
            log.warning("completions_undelivered", sessions=[s.id for s in self.live()])
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()


async def _self_check() -> None:
    """Start, look up and end sessions; the limit holds; shutdown leaves no group behind."""
    import sys

    manager = SessionManager(Settings(state_dir="", kill_grace=0.5, max_sessions=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        sleeper = await manager.execute(ExecuteParams([sys.executable, "-c",
                                                       "import time; time.sleep(60)"]), None)
        assert manager.get(sleeper.id) is sleeper and manager.running() == [sleeper]
        try:
            await manager.execute(ExecuteParams(["true"]), None)
        except LimitReached:
            pass
        else:
            raise AssertionError("max_sessions=1 must refuse a second session")
        try:
            manager.get("no-such-session")
        except SessionNotFound:
            pass
        else:
            raise AssertionError("an unknown id must fail")
        await manager.shutdown(timeout=5)
        assert not manager.running() and sleeper.state.value == "cancelled", sleeper.state
        nursery.cancel_scope.cancel()
    print("ccx.manager: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
