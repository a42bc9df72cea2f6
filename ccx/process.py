"""Spawn, signal and reap process groups. No networking, no JSON.

Inputs: argv, the resolved executable, cwd, env, stdin mode or a terminal size, kill grace.
Outputs: a running `Group` (own session and group, pgid == pid) with its pipes, or with the
master side of a pseudo-terminal whose slave is the child's controlling terminal (set up by
`ccx.pty`); `stop_group` (the one kill path: SIGTERM, SIGCONT, grace, SIGKILL, wait until
empty) and the `StopStep` it reached, with a `Grace` its caller can shorten while it runs;
`stop_procs` (the same timeline, for what a dead server left running); group inspection
through `ccx.procfs`; the child-subreaper switch.

A PTY group is the whole *session* the child leads, not only its process group: a job-control
shell (`sh -i`) puts each pipeline in a process group of its own, inside the same session and on
the same terminal, so those are members too (signalled with one `killpg` per process group).

Group inspection cost: Linux has no "members of group G" query, so a full answer is a scan
of every process on the host (`ccx.procfs.scan`, ~10 us per process). The waits
(`wait_group_empty` after a signal, `wait_group_stopped` for PAUSE) poll, so they first look
only at the pids last seen in the group (a live, running one among them answers "not yet" for
free) and run a full scan only to confirm "empty" / "all stopped" (unless `killpg(pgid, 0)`
already says the group is gone). That scan is `ccx.procfs.shared_snapshot`: the waits of
sessions that end together (a shutdown of 1,000) share one scan instead of running one each,
and on a big host it runs in a worker thread.
Size (over 400 lines): spawning and the one kill escalation (`stop_group`, `stop_procs`,
`Grace`, `StopStep`) share the group model and its waits; /proc reading is `ccx.procfs`,
terminals are `ccx.pty`.
Docs: https://trio.readthedocs.io/en/stable/reference-io.html#spawning-subprocesses
      https://man7.org/linux/man-pages/man2/kill.2.html
      https://man7.org/linux/man-pages/man2/PR_SET_CHILD_SUBREAPER.2const.html
      https://man7.org/linux/man-pages/man5/proc_pid_stat.5.html
"""

from __future__ import annotations

import ctypes
import enum
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Protocol

import attrs
import trio

from ccx.descendants import reap_adopted, signal_procs, still_alive
from ccx.log import get_logger
from ccx.procfs import Proc, index, read_proc, scan, shared_snapshot
from ccx.pty import Terminal, spawn_on_terminal

log = get_logger("ccx.process")

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
POLL_FIRST_S = 0.001  # first look at /proc after a signal; processes often die within 1 ms
POLL_MAX_S = 0.05  # later looks back off to this, so a stubborn group costs little CPU
AFTER_KILL_TIMEOUT_S = 10.0  # SIGKILL cannot be ignored; only D-state can outlast this
STOP_SEEN_TIMEOUT_S = 1.0  # how long PAUSE waits to see every member in state T


class StopStep(enum.Enum):
    """How far `stop_group` had to go before the group was empty."""

    ALREADY_EMPTY = "already_empty"
    TERMINATED = "terminated"  # gone after SIGTERM, within the grace
    KILLED = "killed"  # needed SIGKILL
    OUTLIVED = "outlived"  # still not empty AFTER_KILL_TIMEOUT_S after SIGKILL (D state)


@attrs.define(eq=False)
class Grace:
    """The wait between SIGTERM and SIGKILL of one `stop_group`, which can be cut short
    before or while it runs.

    `cap(s)` makes it at most *s* seconds counted from the SIGTERM: a grace already running
    for longer than that ends at once (SIGKILL is due). Server shutdown caps every session's
    grace this way, and a repeated CANCEL ends it (`expire`), so no grace a client asked for
    can hold the server up (PROTOCOL.md 5).
    """

    seconds: float
    _sigterm_at: float | None = None
    _scope: trio.CancelScope | None = None
    _ends_by: float = float("inf")  # a trio time the grace ends at, whenever SIGTERM went

    def cap(self, seconds: float) -> None:
        self.seconds = min(self.seconds, max(seconds, 0.0))
        if self._scope is not None and self._sigterm_at is not None:
            self._scope.deadline = min(self._scope.deadline, self._sigterm_at + self.seconds)

    def end_by(self, deadline: float) -> None:
        """End the grace at trio time *deadline* at the latest, however late the SIGTERM
        goes out (a shutdown of many sessions: SIGKILL is due at shutdown + CCX_KILL_GRACE
        for all of them, PROTOCOL.md 5)."""
        self._ends_by = min(self._ends_by, deadline)
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, deadline)

    def expire(self) -> None:
        """SIGKILL now (or at once after the SIGTERM, if that is still to come)."""
        self.cap(0.0)

    @contextmanager
    def running(self) -> Iterator[trio.CancelScope]:
        """The grace itself: a scope whose deadline `cap` can move earlier while it runs."""
        self._sigterm_at = trio.current_time()
        with trio.move_on_at(min(self._sigterm_at + self.seconds, self._ends_by)) as scope:
            self._scope = scope
            try:
                yield scope
            finally:
                self._scope = None


@attrs.define(eq=False)
class Group:
    """A spawned process and the group it leads (pgid == pid by construction).

    With a `terminal`, the members are every process of the session it leads (sid == pid).
    """

    process: trio.Process
    argv: list[str]
    terminal: Terminal | None = None
    known: frozenset[int] = frozenset()  # pids seen among the members by the last full scan
    start: int | None = None  # the leader's start time (/proc/PID/stat field 22)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def pgid(self) -> int:
        return self.process.pid

    @property
    def whole_session(self) -> bool:
        return self.terminal is not None


def become_subreaper() -> bool:
    """Make this process adopt orphaned descendants, so killed grandchildren can be reaped.

    Returns False where the kernel does not offer it (non-Linux); ccx still works there, but
    zombies of orphaned grandchildren are then left to PID 1.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def resolve_executable(name: str, *, path: str | None, cwd: str | None) -> str | None:
    """The absolute path that exec would run for argv[0] *name*, or None if there is none.

    A name with a slash is taken relative to *cwd*; a bare name is looked up on *path* (the
    child's PATH), exactly as `execvp` would, so the allow-list judges what really runs.
    """
    if "/" in name:
        candidate = os.path.join(cwd or os.getcwd(), name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
        return None
    found = shutil.which(name, path=path if path is not None else os.defpath)
    return os.path.abspath(found) if found else None


async def spawn(
    argv: Sequence[str],
    *,
    executable: str,
    cwd: str | None,
    env: Mapping[str, str],
    stdin: bool,
    pty: tuple[int, int] | None = None,
) -> Group:
    """Start *argv* as the leader of a new session and process group, with piped output, or
    on a new pseudo-terminal of *pty* = (cols, rows).

    `start_new_session` (setsid) rather than `process_group=0`: the child also loses any
    controlling terminal, so job control from our tty cannot reach it (jupyter_client does
    the same). Raises OSError (FileNotFoundError, PermissionError...) when exec fails.
    """
    if pty is not None:
        process, terminal = await spawn_on_terminal(argv, executable=executable, cwd=cwd,
                                                    env=env, size=pty)
        leader = read_proc(process.pid)
        return Group(process, list(argv), terminal,
                     start=leader.start if leader is not None else None)
    process = await trio.lowlevel.open_process(
        list(argv),
        executable=executable,
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    leader = read_proc(process.pid)
    return Group(process, list(argv), start=leader.start if leader is not None else None)


def signal_group(pgid: int, *signals: signal.Signals, whole_session: bool = False,
                 session_groups: Iterable[int] | None = None) -> bool:
    """Send each of *signals* to the whole group (with *whole_session*: to every process
    group of the session *pgid* leads, the leader's last); False if nobody is left to signal.
    *session_groups*: those process groups as a fresh shared snapshot (or the tracker) shows
    them (the kill paths of many sessions at once), instead of a /proc scan of our own.

    The leader's group comes last so that SIGCONT has already continued a job-control
    shell's jobs when the shell wakes: a continued child no longer reports its stop to
    wait(), so the shell does not mark the job stopped and take the terminal back.
    """
    pgrps = [pgid]
    if whole_session:
        if session_groups is None:
            session_groups = [m.pgid for m in scan(sid=pgid)]
        pgrps = sorted(set(session_groups) - {pgid}) + pgrps
    reached = False
    for target in pgrps:
        try:
            for sig in signals:
                os.killpg(target, sig)
            reached = True
        except ProcessLookupError:
            continue
        except PermissionError:  # a member changed credentials (setuid); the rest got it
            log.warning("signal_denied", pgid=target)
            reached = True
    return reached


def signal_members(group: Group, *signals: signal.Signals,
                   session_groups: Iterable[int] | None = None) -> bool:
    """`signal_group` for *group*, reaching its whole session when it runs on a terminal."""
    return signal_group(group.pgid, *signals, whole_session=group.whole_session,
                        session_groups=session_groups)


async def _session_groups(group: Group) -> list[int] | None:
    """A terminal session's process groups, from the shared snapshot (None otherwise)."""
    if not group.whole_session:
        return None
    return [p.pgid for p in index(await shared_snapshot()).by_sid.get(group.pgid, ())]


def group_members(pgid: int, *, whole_session: bool = False) -> list[Proc]:
    """Every process whose process group (with *whole_session*: session) is *pgid*,
    zombies included."""
    if whole_session:
        return list(scan(sid=pgid))
    try:
        os.killpg(pgid, 0)  # cheap answer for the common case: nobody left at all
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    return list(scan(pgid=pgid))


def _alive(group: Group, members: list[Proc]) -> list[Proc]:
    reap_adopted(members, leader=group.pid)
    return [m for m in members if m.state != "Z"]


def live_members(group: Group) -> list[Proc]:
    """Members that still run (zombies count as gone; ours are reaped on the way). A full
    scan (unless the group is gone); the pids found become the group's `known` ones."""
    members = group_members(group.pgid, whole_session=group.whole_session)
    group.known = frozenset(m.pid for m in members)
    return _alive(group, members)


async def scan_live_members(group: Group) -> list[Proc]:
    """`live_members`, from the /proc snapshot that tasks asking at the same time share
    (`ccx.procfs.shared_snapshot`: in a worker thread on a host with many processes), so N
    sessions ending together cost a few scans, not N (reaping stays here)."""
    if not group.whole_session:
        try:
            os.killpg(group.pgid, 0)  # cheap answer for the common case: nobody left at all
        except ProcessLookupError:
            group.known = frozenset()
            return []
        except PermissionError:
            pass
    found = index(await shared_snapshot())
    members = list((found.by_sid if group.whole_session else found.by_pgid).get(group.pgid, ()))
    group.known = frozenset(m.pid for m in members)
    return _alive(group, members)


def known_live_members(group: Group) -> list[Proc]:
    """The live members among the leader and the `known` pids: a few stat reads, no scan.
    Whatever it returns is a member now; an empty answer proves nothing."""
    members = []
    for pid in group.known | {group.pid}:
        proc = read_proc(pid)  # a reused pid is in another group and session
        if proc is not None and (proc.sid if group.whole_session else proc.pgid) == group.pgid:
            members.append(proc)
    return _alive(group, members)


async def wait_group_empty(group: Group, escapees: Sequence[Proc] = ()) -> None:
    """Wait until the leader is reaped and no other member of the group is alive, nor any
    of *escapees* (descendants that left the group).

    "Empty" is always confirmed by `killpg(pgid, 0)` failing or by a full scan.
    **Cancellation**: safe to cancel at any point; nothing is left half-done.
    """
    await group.process.wait()  # a zombie leader still counts as a member: reap it first
    delay = POLL_FIRST_S
    while still_alive(escapees) or known_live_members(group) or await scan_live_members(group):
        await trio.sleep(delay)
        delay = min(delay * 2, POLL_MAX_S)


async def wait_group_stopped(group: Group, timeout: float = STOP_SEEN_TIMEOUT_S, *,
                             leader_group_only: bool = False, confirm: bool = True,
                             wanted: Callable[[], bool] = lambda: True) -> bool:
    """After SIGSTOP: wait until every live member (of the leader's process group only, if
    asked) shows state T; False if *timeout* hit or once *wanted* says False (a RESUME
    came: the members will not stop).

    "All stopped" is confirmed by a full scan (stopped members cannot fork, so the answer
    holds) unless *confirm* is False (the caller scans next anyway); a known member still
    running answers "not yet" without one.
    """
    def running(members: list[Proc]) -> bool:
        return any(m.state not in ("T", "t") for m in members
                   if not leader_group_only or m.pgid == group.pgid)

    delay = POLL_FIRST_S
    with trio.move_on_after(timeout):
        while running(known_live_members(group)) or (
                confirm and running(await scan_live_members(group))):
            if not wanted():
                return False
            await trio.sleep(delay)
            delay = min(delay * 2, POLL_MAX_S)
        return True
    return False


async def pause_group(group: Group, *, wanted: Callable[[], bool] = lambda: True,
                      confirm: bool = True) -> bool:
    """SIGSTOP every member; True once all are seen stopped (False after
    `STOP_SEEN_TIMEOUT_S`, or if *wanted* says False before the second signal). Without
    *confirm*, "seen stopped" covers only the members known from the last full scan (the
    caller scans next: `ccx.tree.pause_tree`).

    On a terminal the leader's process group is stopped (and seen stopped) before the
    session's other groups: a job-control shell that saw its foreground job stop would take
    the terminal back, and the job, once resumed, would be stopped again by its first read.
    Descendants that left the group are `ccx.tree`'s (`pause_tree` calls this first).
    **Cancellation**: safe; members may then be left stopped (RESUME or CANCEL wakes them).
    """
    signal_group(group.pgid, signal.SIGSTOP)
    if group.whole_session:
        await wait_group_stopped(group, leader_group_only=True, wanted=wanted)
        if not wanted():  # a RESUME or CANCEL came meanwhile: stop nothing more
            return False
        signal_members(group, signal.SIGSTOP)
    return await wait_group_stopped(group, confirm=confirm, wanted=wanted)


async def stop_group(group: Group, *, grace: float | Grace,
                     escapees: Sequence[Proc] = ()) -> StopStep:
    """Make the group empty. The one kill path: every way a session ends goes through here.

    Timeline (`_escalate`, shared with `stop_procs`): SIGTERM then SIGCONT to the group (TERM
    first, so a stopped member wakes up with the TERM already pending instead of running on
    for a moment; on a terminal every process group of the session gets them), wait up to
    *grace* seconds (a `Grace` can be shortened by its owner while this waits: shutdown's
    cap, a forced cancel) for every member to go, then SIGKILL to the group and wait again,
    up to `AFTER_KILL_TIMEOUT_S` (only an uninterruptible D-state member can outlast it; that
    is logged as an error and returned as `StopStep.OUTLIVED`). Zombies are reaped on the
    way (the leader by trio). *escapees* (descendants that left the group, see
    `ccx.descendants`) get the same signals, one by one, at the same steps, and the wait
    covers them too.

    **Cancellation**: shielded; it always finishes, bounded by grace + AFTER_KILL_TIMEOUT_S.
    Cancelling from outside cannot cut the grace; `Grace.cap` can.
    """
    with trio.CancelScope(shield=True):
        step = await _escalate(_GroupTargets(group, escapees),
                               grace if isinstance(grace, Grace) else Grace(grace))
    return step


async def stop_procs(procs: Sequence[Proc], *, grace: float) -> StopStep:
    """`stop_group`'s timeline for recorded processes that are not our children (what a
    dead server left running, `ccx.crash_record.recover`): each is signalled through a pidfd after
    a (pid, start time) check, never a recycled pid.

    **Cancellation**: shielded, as `stop_group`; bounded by grace + AFTER_KILL_TIMEOUT_S.
    """
    with trio.CancelScope(shield=True):
        step = await _escalate(_ProcTargets(procs), Grace(grace))
    return step


class _Targets(Protocol):
    """What one escalation stops."""

    def alive(self) -> bool:
        """Whether anything is left to stop (zombies count as gone; ours are reaped)."""

    async def signal(self, *signals: signal.Signals) -> None:
        """Send each of *signals* to every target still alive."""

    async def wait_gone(self) -> None:
        """Return once every target is gone. Cancel-safe."""

    def survivors(self) -> dict[str, object]:
        """What is still alive, for the log."""


@attrs.define(eq=False)
class _GroupTargets:
    """A spawned group (on a terminal: its whole session) and its escapees."""

    group: Group
    escapees: Sequence[Proc]

    def alive(self) -> bool:
        self.escapees = still_alive(self.escapees)
        return (self.group.process.returncode is None or bool(live_members(self.group))
                or bool(self.escapees))

    async def signal(self, *signals: signal.Signals) -> None:
        escapees = still_alive(self.escapees)
        signal_members(self.group, *signals, session_groups=await _session_groups(self.group))
        for sig in signals:
            signal_procs(escapees, sig)
        log.info("signal_sent", pgid=self.group.pgid, signals=[s.name for s in signals],
                 escapees=[p.pid for p in escapees] or None)

    async def wait_gone(self) -> None:
        await wait_group_empty(self.group, self.escapees)

    def survivors(self) -> dict[str, object]:
        return {"pgid": self.group.pgid,
                "members": [attrs.asdict(m) for m in live_members(self.group)],
                "escapees": [p.pid for p in still_alive(self.escapees)]}


@attrs.define(eq=False)
class _ProcTargets:
    """Recorded processes, each known by (pid, start time)."""

    procs: Sequence[Proc]

    def alive(self) -> bool:
        return bool(still_alive(self.procs))

    async def signal(self, *signals: signal.Signals) -> None:
        procs = still_alive(self.procs)
        for sig in signals:
            signal_procs(procs, sig)
        log.info("signal_sent", pids=[p.pid for p in procs], signals=[s.name for s in signals])

    async def wait_gone(self) -> None:
        delay = POLL_FIRST_S
        while still_alive(self.procs):
            await trio.sleep(delay)
            delay = min(delay * 2, POLL_MAX_S)

    def survivors(self) -> dict[str, object]:
        return {"pids": [p.pid for p in still_alive(self.procs)]}


async def _escalate(targets: _Targets, grace: Grace) -> StopStep:
    """The timeline of `stop_group`, written once. Callers shield it."""
    if not targets.alive():
        return StopStep.ALREADY_EMPTY
    # No SIGHUP on a terminal, although a closing terminal sends one: pending together with
    # SIGTERM it is delivered first and its default action would pre-empt a TERM handler.
    await targets.signal(signal.SIGTERM, signal.SIGCONT)
    with grace.running():
        await targets.wait_gone()
        return StopStep.TERMINATED
    await targets.signal(signal.SIGKILL)
    with trio.move_on_after(AFTER_KILL_TIMEOUT_S):
        await targets.wait_gone()
        return StopStep.KILLED
    log.error("group_outlived_sigkill", timeout_s=AFTER_KILL_TIMEOUT_S, **targets.survivors())
    return StopStep.OUTLIVED


def signal_name(returncode: int | None) -> str | None:
    """"SIGSEGV" for a returncode of -11; None when the process exited by itself."""
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"SIG{-returncode}"


async def _self_check() -> None:
    tree = "sleep 60 & sleep 60 & trap '' TERM; sleep 60"
    group = await spawn(["sh", "-c", tree], executable="/bin/sh", cwd=None,
                        env=os.environ, stdin=False)
    await trio.sleep(0.2)
    assert len(live_members(group)) >= 3, live_members(group)
    signal_group(group.pgid, signal.SIGSTOP)
    assert await wait_group_stopped(group), "group not seen stopped"
    step = await stop_group(group, grace=0.5)
    assert step is StopStep.KILLED, step  # the TERM-trapping leader needed SIGKILL
    assert not live_members(group) and not group_members(group.pgid), "orphans left"
    for stream in (group.process.stdout, group.process.stderr):
        assert stream is not None
        await stream.aclose()
    await _self_check_terminal()
    await _self_check_escapee()
    print("ccx.process: PASS")


async def _self_check_terminal() -> None:
    code = "stty size; sleep 60 & sleep 60"
    group = await spawn(["sh", "-c", code], executable="/bin/sh", cwd=None, env=os.environ,
                        stdin=False, pty=(100, 30))
    assert group.terminal is not None
    output = b""
    while b"30 100" not in output:
        output += await group.terminal.master.receive_some(1024)
    assert await stop_group(group, grace=1) is StopStep.TERMINATED
    assert not group_members(group.pgid, whole_session=True), "orphans left"
    await group.terminal.master.aclose()


async def _self_check_escapee() -> None:
    """A member that left the group (setsid) is paused, resumed and killed with it: the
    tree-wide pause is `ccx.tree`'s, so its check runs here."""
    from ccx.tree import self_check  # ccx.tree imports this module: import it late

    await self_check()


if __name__ == "__main__":
    become_subreaper()
    trio.run(_self_check)
