"""Find a session's escaped descendants: processes that left its group but descend from it.

A child that double-forks and calls setsid (a classic daemon) is no longer in the session's
process group, so `killpg` cannot reach it. On Linux ccx still finds it two ways:
- the process tree: every process whose parent chain leads to a group member or to a
  descendant seen earlier (polled while the session runs, and once more when it ends);
- adoption: ccx is a child subreaper, so an orphaned descendant is re-parented to the server;
  a server child that is no session leader and whose environment carries `CCX_SESSION_ID`
  (set for every session's child, inherited by its descendants) belongs to that session.
Each process is recorded as (pid, start time), the start time (field 22 of /proc/PID/stat)
telling a process from a later one that reuses its pid; signals go through a pidfd opened
after that check, so a recycled pid is never hit.
No networking, no JSON. Linux /proc only (read through `ccx.procfs`); elsewhere nothing is found.

Inputs: /proc snapshots (`ccx.procfs.snapshot`).  Outputs: `Tracker` (per session; `known`
holds each process as its last scan saw it, state included, which `ccx.tree` reads to pause
the whole tree), `adopted_by_session`, `session_marker`, `signal_procs`, `still_alive`,
`reap_adopted` (the one place adopted zombies are reaped).
Docs: https://man7.org/linux/man-pages/man5/proc_pid_environ.5.html
      https://man7.org/linux/man-pages/man2/pidfd_open.2.html
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Mapping

import attrs

from ccx.procfs import Proc, current, environ_value, index

SESSION_ENV = "CCX_SESSION_ID"  # set in every session's environment; descendants inherit it


def session_marker(pid: int) -> str | None:
    """The `CCX_SESSION_ID` a process was started with (its initial environment), if any."""
    return environ_value(pid, SESSION_ENV)


@attrs.define(eq=False)
class Tracker:
    """Every descendant of one session seen so far, by pid (start time kept with it)."""

    session_id: str
    pgid: int
    whole_session: bool = False  # a PTY session: every group of the session is a member
    known: dict[int, Proc] = attrs.field(factory=dict)

    def is_member(self, proc: Proc) -> bool:
        """In the session's group (or, on a terminal, in its session): `killpg` reaches it."""
        return proc.pgid == self.pgid or (self.whole_session and proc.sid == self.pgid)

    def update(self, procs: Mapping[int, Proc], adopted: Iterable[Proc] = ()) -> None:
        """Add what *procs* shows descending from the group, the known ones, or *adopted*
        (server children carrying this session's marker); forget the dead. Costs the size
        of the session's tree, not of *procs* (`ccx.procfs.index`: once per snapshot)."""
        found = index(procs)
        roots = list(found.by_pgid.get(self.pgid, ()))
        if self.whole_session:
            roots += found.by_sid.get(self.pgid, ())
        roots += self._still_known(procs)
        roots += adopted
        children = found.children
        alive: dict[int, Proc] = {}
        stack = list(roots)
        while stack:
            proc = stack.pop()
            if proc.pid in alive:
                continue
            alive[proc.pid] = proc
            stack.extend(children.get(proc.pid, ()))
        self.known = {pid: p for pid, p in alive.items() if p.state != "Z"}

    def _still_known(self, procs: Mapping[int, Proc]) -> list[Proc]:
        """The known processes still alive, as they are now: from *procs*, or, for one that
        *procs* lacks, from /proc itself. *procs* may be older than what the tracker knows (a
        periodic scan and a PAUSE's scan run in worker threads side by side on a big host);
        forgetting a known escapee would leave it out of RESUME, stopped for good."""
        alive = []
        for proc in self.known.values():
            now = procs.get(proc.pid)
            if now is None:  # dead, or born after *procs* was taken
                now = current(proc)
            if now is not None and now.start == proc.start and now.state != "Z":
                alive.append(now)  # its state from this scan: ccx.tree reads it
        return alive

    def escapees(self) -> list[Proc]:
        """Known descendants outside the session's group: what `killpg` would miss."""
        return sorted((p for p in self.known.values() if not self.is_member(p)),
                      key=lambda p: p.pid)


_markers: dict[tuple[int, int], str | None] = {}  # (pid, start) -> marker: it never changes


def _cached_marker(proc: Proc) -> str | None:
    """`session_marker` of *proc*, read once per process (its initial environment is fixed;
    the server's children are all its sessions' leaders, read again at every scan else)."""
    key = (proc.pid, proc.start)
    if key not in _markers:
        _markers[key] = session_marker(proc.pid)
    return _markers[key]


def adopted_by_session(procs: Mapping[int, Proc]) -> dict[str, list[Proc]]:
    """Children of this process (the subreaper), grouped by the session marker in their
    environment. Session leaders are among them, under their own session: harmless, since
    a leader is a member of its group anyway. Computed once per snapshot (`index`)."""
    found_index = index(procs)
    if found_index.adopted is not None:
        return found_index.adopted
    found: dict[str, list[Proc]] = {}
    children = [p for p in found_index.children.get(os.getpid(), ()) if p.state != "Z"]
    for proc in children:
        marker = _cached_marker(proc)
        if marker is not None:
            found.setdefault(marker, []).append(proc)
    if len(_markers) > 2 * len(children) + 64:  # forget the processes that are gone
        live = {(p.pid, p.start) for p in children}
        for key in [k for k in _markers if k not in live]:
            del _markers[key]
    found_index.adopted = found
    return found


def signal_procs(procs: Iterable[Proc], sig: signal.Signals) -> None:
    """Send *sig* to each process that is still the one recorded (pid and start time)."""
    for proc in procs:
        try:
            fd = os.pidfd_open(proc.pid)
        except OSError:
            continue  # gone already
        try:
            if current(proc) is not None:  # checked after the pidfd pins the process
                signal.pidfd_send_signal(fd, sig)
        except OSError:
            pass
        finally:
            os.close(fd)


def reap_adopted(procs: Iterable[Proc], *, leader: int | None = None) -> None:
    """Reap those of *procs* (as /proc showed them just now) that are zombie children of
    this process: orphans it adopted as subreaper. Never *leader*: trio waits for that one.
    (A zombie's pid cannot be reused before it is reaped, so the pid is still *proc*.)"""
    me = os.getpid()
    for proc in procs:
        if proc.state == "Z" and proc.ppid == me and proc.pid != leader:
            try:
                os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:
                pass


def still_alive(procs: Iterable[Proc]) -> list[Proc]:
    """Those of *procs* that still run (zombies count as gone; ours are reaped)."""
    procs = list(procs)
    now = [current(proc) for proc in procs]
    reap_adopted(found for found in now if found is not None)
    return [proc for proc, found in zip(procs, now, strict=True)
            if found is not None and found.state != "Z"]


if __name__ == "__main__":
    import subprocess
    import sys
    import time

    from ccx.process import become_subreaper
    from ccx.procfs import snapshot

    assert become_subreaper(), "needs Linux PR_SET_CHILD_SUBREAPER"
    env = {**os.environ, SESSION_ENV: "demo"}
    daemon = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              "        time.sleep(30)\n    os._exit(0)\nos.wait(); time.sleep(30)")
    leader = subprocess.Popen([sys.executable, "-c", daemon], env=env, start_new_session=True)
    time.sleep(0.5)
    tracker = Tracker("demo", leader.pid)
    procs = snapshot()  # the intermediate exited: the daemon is now our child, marked "demo"
    tracker.update(procs, adopted_by_session(procs).get("demo", []))
    escaped = tracker.escapees()
    assert len(escaped) == 1 and session_marker(escaped[0].pid) == "demo", escaped
    signal_procs(escaped, signal.SIGKILL)
    os.killpg(leader.pid, signal.SIGKILL)
    leader.wait()
    time.sleep(0.1)
    assert not still_alive(escaped), "daemon survived"
    print("ccx.descendants: PASS")
