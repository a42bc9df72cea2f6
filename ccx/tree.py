"""Pause and resume a session's whole tree: its process group and the descendants that left it.

The *tree* (PROTOCOL.md section 2) is the session's group (on a terminal: its whole session,
see `ccx.process`) plus every descendant that left it (setsid, setpgid, daemonizing), as
`ccx.descendants.Tracker` finds them. `killpg` reaches only the group; Claude Code runs each
Bash tool command in a session of its own, so the escapees get their signals one by one,
through a pidfd opened after a (pid, start time) check (`signal_procs`): never a recycled pid.

Order: stop top-down, continue bottom-up. PAUSE stops the group first (on a terminal the
leader's process group before the others: `pause_group`), then the escapees, parents before
children; RESUME continues the escapees, children before parents, then the group. So no
parent runs while a child of it is still stopped: a parent that waits with WUNTRACED (a
job-control shell, `bash -i` run by an agent) would see the stop, mark the job "Stopped" and
take the terminal back; once SIGCONT has continued the child, wait() no longer reports it.

Re-scan rule: a descendant may be born between a /proc snapshot and the SIGSTOP of its
parent (a fork in flight, a child that setsid'd a moment before). So once the group is seen
stopped, PAUSE scans (a fresh snapshot through the tracker), stops whatever of the tree it
finds running, waits to see it stopped, and scans again, until a scan finds nothing running. Stopped
processes cannot fork, so each round can only find what the previous one's targets made
before they stopped: it converges. It is bounded (`PAUSE_ROUNDS_MAX`, `PAUSE_TIMEOUT_S`; a
process in uninterruptible sleep stops only when it leaves it) and logs when the bound is hit.
While paused, the periodic tracker calls `stop_arrivals`: anything of the tree seen running
(something outside ccx sent it SIGCONT) is stopped again.

Limit: a process that leaves the group, clears its environment (no `CCX_SESSION_ID`) and loses
its parent, all between two scans, is no longer recognisable as the session's; only a cgroup
per session would hold it.
Inputs: a `Group` and its session's `Tracker`.
Outputs: `pause_tree` (True once every process of the tree was seen stopped), `resume_tree`,
`stop_arrivals`.
Docs: https://man7.org/linux/man-pages/man7/signal.7.html (stop and continue)
      https://man7.org/linux/man-pages/man2/waitpid.2.html (WUNTRACED, WCONTINUED)
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Mapping

import trio

from ccx.descendants import Tracker, adopted_by_session, signal_procs
from ccx.log import get_logger
from ccx.process import POLL_FIRST_S, POLL_MAX_S, Group, pause_group, signal_members
from ccx.procfs import Proc, current, read_proc, run_scan, snapshot

log = get_logger("ccx.tree")

STOPPED = frozenset({"T", "t"})  # stopped by a signal, or by a tracer
GONE = frozenset({"Z", "X"})
PAUSE_ROUNDS_MAX = 20  # re-scans after the first stop; each finds one generation of forks
PAUSE_TIMEOUT_S = 3.0  # the whole PAUSE; only a process stuck in D state should reach it


async def refresh(tracker: Tracker) -> None:
    """Update *tracker* from a fresh /proc snapshot (tree and subreaper adoptions).

    **Cancellation**: safe; the tracker keeps what it knew.
    """
    procs = await run_scan(snapshot)
    tracker.update(procs, adopted_by_session(procs).get(tracker.session_id, []))


def _depth(proc: Proc, known: Mapping[int, Proc]) -> int:
    """How many of *proc*'s ancestors are in *known* (the tree)."""
    depth, pid, seen = 0, proc.ppid, {proc.pid}
    while pid in known and pid not in seen:
        seen.add(pid)
        depth += 1
        pid = known[pid].ppid
    return depth


def top_down(procs: Iterable[Proc], tracker: Tracker) -> list[Proc]:
    """*procs* ordered parents before children (as the tracker knows the tree)."""
    return sorted(procs, key=lambda p: _depth(p, tracker.known))


def running(tracker: Tracker) -> list[Proc]:
    """Processes of the tree that the tracker's last scan saw not stopped."""
    return [p for p in tracker.known.values() if p.state not in STOPPED | GONE]


async def _wait_stopped(procs: Iterable[Proc], wanted: Callable[[], bool]) -> None:
    """Wait until each of *procs* is stopped or gone (a pid now naming another process
    counts as gone), or *wanted* says False. No deadline of its own: `pause_tree` bounds it."""
    waiting = list(procs)
    delay = POLL_FIRST_S
    while wanted():
        later = []
        for proc in waiting:
            now = current(proc)
            if now is not None and now.state not in STOPPED | GONE:
                later.append(proc)
        if not later:
            return
        waiting = later
        await trio.sleep(delay)
        delay = min(delay * 2, POLL_MAX_S)


async def pause_tree(group: Group, tracker: Tracker, *,
                     wanted: Callable[[], bool] = lambda: True) -> bool:
    """SIGSTOP the whole tree; True once a scan found every process of it stopped.

    The group (`pause_group`), then a fresh scan and the escapees top-down, then the re-scan
    rule of the module docstring: the common case (no escapee) costs one scan more than
    `pause_group`. *wanted* is asked before every signal: once it says False (a RESUME or
    CANCEL came meanwhile) nothing more is stopped and the answer is False. False also when a
    bound was hit (logged).
    **Cancellation**: safe; processes may be left stopped (RESUME or CANCEL wakes them).
    """
    rounds = 0
    with trio.move_on_after(PAUSE_TIMEOUT_S):
        # The group first and at once (one killpg, before any scan): it is what runs the
        # agent, and once it is stopped it makes no new escapees. A member stuck in D state
        # makes this return False after its own wait; the scans below see it still running.
        if wanted():  # its own confirming scan would only repeat the snapshot below
            await pause_group(group, wanted=wanted, confirm=False)
        while wanted():
            await refresh(tracker)  # the escapees now, and whatever they forked meanwhile
            stopping = top_down(running(tracker), tracker)
            if not stopping:
                return True
            if rounds == PAUSE_ROUNDS_MAX:
                log.warning("pause_not_settled", pgid=group.pgid, rounds=rounds,
                            running=[p.pid for p in stopping])
                return False
            if rounds:
                log.info("pause_rescan_stops", pgid=group.pgid, round=rounds,
                         pids=[p.pid for p in stopping])
            rounds += 1
            if not wanted():  # asked again after the scan's await: a RESUME may have come
                return False
            signal_procs(stopping, signal.SIGSTOP)
            await _wait_stopped(stopping, wanted)
        return False
    log.warning("pause_timeout", pgid=group.pgid, timeout_s=PAUSE_TIMEOUT_S, rounds=rounds,
                running=[p.pid for p in running(tracker)])
    return False


def resume_tree(group: Group, tracker: Tracker) -> None:
    """SIGCONT to the escapees the tracker knows, children before parents, then the group
    (on a terminal its leader's process group last). While paused nothing of the tree can
    fork, so the tracker's list is complete; pids reused meanwhile are skipped."""
    signal_procs(reversed(top_down(tracker.escapees(), tracker)), signal.SIGCONT)
    signal_members(group, signal.SIGCONT)


def stop_arrivals(tracker: Tracker) -> list[Proc]:
    """SIGSTOP every process of the tree that the tracker's last scan saw running; returns
    them. For a paused session only: the caller checks that it still is."""
    late = top_down(running(tracker), tracker)
    signal_procs(late, signal.SIGSTOP)
    return late


async def self_check() -> None:
    """A leader whose child leaves the group (setsid) and forks: PAUSE stops all three,
    RESUME continues them, the kill path ends them."""
    import os
    import sys

    from ccx.descendants import still_alive
    from ccx.process import become_subreaper, spawn, stop_group

    become_subreaper()
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid(); os.fork()\n"
            "    while True: time.sleep(0.01)\nprint('ready', flush=True); time.sleep(60)")
    group = await spawn([sys.executable, "-c", code], executable=sys.executable, cwd=None,
                        env=os.environ, stdin=False)
    assert group.process.stdout is not None
    await group.process.stdout.receive_some(64)
    tracker = Tracker("self-check", group.pgid)
    while len(tracker.escapees()) < 2:
        await refresh(tracker)
    assert await pause_tree(group, tracker), "tree not seen stopped"
    states = [read_proc(p.pid) for p in [*tracker.known.values()]]
    assert all(s is not None and s.state in STOPPED for s in states), states
    resume_tree(group, tracker)
    await refresh(tracker)
    assert not any(p.state in STOPPED for p in tracker.known.values()), tracker.known
    escapees = tracker.escapees()
    await stop_group(group, grace=1, escapees=escapees)
    assert not still_alive(escapees), "escapees left"
    for stream in (group.process.stdout, group.process.stderr):
        if stream is not None:
            await stream.aclose()
    print("ccx.tree: PASS")


if __name__ == "__main__":
    trio.run(self_check)
