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
No networking, no JSON. Linux /proc only; elsewhere every scan is empty.

Inputs: /proc.  Outputs: `snapshot()` (`snapshot_async()` scans in a worker thread on a host
with many processes, and tasks that ask at the same time share one scan: `ccx.coalesce`),
`Tracker` (per session; `known` holds each process as its last scan saw it, state included,
which `ccx.tree` reads to pause the whole tree), `signal_procs`.
Docs: https://man7.org/linux/man-pages/man5/proc_pid_stat.5.html
      https://man7.org/linux/man-pages/man5/proc_pid_environ.5.html
      https://man7.org/linux/man-pages/man2/pidfd_open.2.html
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Mapping

import attrs
import trio

from ccx.coalesce import Coalesced

SESSION_ENV = "CCX_SESSION_ID"  # set in every session's environment; descendants inherit it
SCAN_INLINE_MAX = 200  # host processes up to which a scan (~10 us each) runs on the loop
SCAN_INLINE_SHARED = 8  # ...and whatever the host, a scan that this many tasks wait for
_host_processes = 0  # processes the last snapshot went through


@attrs.frozen
class Proc:
    """One process as /proc/PID/stat shows it."""

    pid: int
    ppid: int
    pgid: int
    state: str
    start: int  # clock ticks after boot: (pid, start) names one process for good
    sid: int = 0  # session id


def read_proc(pid: int) -> Proc | None:
    try:  # os.open/os.read: a third cheaper than open(), and a snapshot does this per process
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not raw:
        return None
    # comm may hold spaces and parentheses: the fields start after the last ")".
    fields = raw[raw.rfind(b")") + 2 :].split()
    return Proc(pid, int(fields[1]), int(fields[2]), fields[0].decode(), int(fields[19]),
                int(fields[3]))


async def snapshot_async() -> dict[int, Proc]:
    """`snapshot()`, in a worker thread on a host with many processes, so a scan never
    holds the event loop for long; tasks that ask at the same time share one scan that
    began after they asked (`ccx.coalesce`). The result is shared: do not change it.

    **Cancellation**: safe (the shared scan itself runs to its end).
    """
    return await _shared_snapshot()


async def _snapshot_off_loop(shared_by: int) -> dict[int, Proc]:
    """Inline on a small host, or when many tasks wait for this one scan (a shutdown of
    many sessions): then the event loop is busy, and a scan in a thread would wait for the
    GIL after each of its thousands of system calls (seconds instead of milliseconds)."""
    if _host_processes <= SCAN_INLINE_MAX or shared_by >= SCAN_INLINE_SHARED:
        return snapshot()
    return await trio.to_thread.run_sync(snapshot)


_shared_snapshot = Coalesced(_snapshot_off_loop)


def snapshot() -> dict[int, Proc]:
    """Every process on the machine, by pid (one pass over /proc)."""
    global _host_processes
    procs: dict[int, Proc] = {}
    try:
        entries = os.scandir("/proc")
    except OSError:
        return procs
    with entries:
        for entry in entries:
            if entry.name.isdigit():
                proc = read_proc(int(entry.name))
                if proc is not None:
                    procs[proc.pid] = proc
    _host_processes = len(procs)
    return procs


_markers: dict[tuple[int, int], str | None] = {}  # (pid, start) -> marker: it never changes


def _cached_marker(proc: Proc) -> str | None:
    """`session_marker` of *proc*, read once per process (its initial environment is fixed;
    the server's children are all its sessions' leaders, read again at every scan else)."""
    key = (proc.pid, proc.start)
    if key not in _markers:
        _markers[key] = session_marker(proc.pid)
    return _markers[key]


def session_marker(pid: int) -> str | None:
    """The `CCX_SESSION_ID` a process was started with (its initial environment), if any."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        return None
    prefix = SESSION_ENV.encode() + b"="
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode("utf-8", "replace")
    return None


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
        of the session's tree, not of *procs* (`index`: built once per snapshot)."""
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
                now = read_proc(proc.pid)
            if now is not None and now.start == proc.start and now.state != "Z":
                alive.append(now)  # its state from this scan: ccx.tree reads it
        return alive

    def escapees(self) -> list[Proc]:
        """Known descendants outside the session's group: what `killpg` would miss."""
        return sorted((p for p in self.known.values() if not self.is_member(p)),
                      key=lambda p: p.pid)


@attrs.define(eq=False)
class Index:
    """One snapshot's processes by parent, by process group and by session; and (computed
    on first use) `adopted_by_session`'s answer for it."""

    procs: Mapping[int, Proc]
    children: dict[int, list[Proc]] = attrs.field(factory=dict)
    by_pgid: dict[int, list[Proc]] = attrs.field(factory=dict)
    by_sid: dict[int, list[Proc]] = attrs.field(factory=dict)
    adopted: dict[str, list[Proc]] | None = None


_recent_indexes: list[Index] = []  # of the latest snapshots, newest last
RECENT_INDEXES = 4  # tasks of one shutdown look at a few snapshots in turn


def index(procs: Mapping[int, Proc]) -> Index:
    """The `Index` of *procs*, built once for each of the latest snapshots: N sessions
    looking at one shared snapshot (`snapshot_async`) cost one pass over it, not N.
    Snapshots are never changed once taken."""
    for found in _recent_indexes:
        if found.procs is procs:
            return found
    found = Index(procs)
    for proc in procs.values():
        found.children.setdefault(proc.ppid, []).append(proc)
        found.by_pgid.setdefault(proc.pgid, []).append(proc)
        found.by_sid.setdefault(proc.sid, []).append(proc)
    _recent_indexes.append(found)
    del _recent_indexes[:-RECENT_INDEXES]
    return found


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
            now = read_proc(proc.pid)  # checked after the pidfd pins the process
            if now is not None and now.start == proc.start:
                signal.pidfd_send_signal(fd, sig)
        except OSError:
            pass
        finally:
            os.close(fd)


def reap_zombies(procs: Iterable[Proc]) -> None:
    """Reap those of *procs* that are zombie children of this process (adopted orphans)."""
    me = os.getpid()
    for proc in procs:
        now = read_proc(proc.pid)
        if now is not None and now.start == proc.start and now.state == "Z" and now.ppid == me:
            try:
                os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:
                pass


def still_alive(procs: Iterable[Proc]) -> list[Proc]:
    """Those of *procs* that still run (zombies count as gone; ours are reaped)."""
    procs = list(procs)
    reap_zombies(procs)
    alive = []
    for proc in procs:
        now = read_proc(proc.pid)
        if now is not None and now.start == proc.start and now.state != "Z":
            alive.append(proc)
    return alive


if __name__ == "__main__":
    import subprocess
    import sys
    import time

    from ccx.process import become_subreaper

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
