"""Read processes from Linux /proc: the one stat parser and the one host scan ccx has.

Inputs: pids; /proc/PID/stat and /proc/PID/environ.
Outputs: `Proc` (pid, ppid, pgid, sid, state, start) from `read_proc`; `scan` (every process
on the host, optionally only one process group or session) and `snapshot` (the same, by pid);
`current` (a recorded process, if that pid still names it); `environ_value` (a variable of a
process's initial environment); `run_scan`, which runs a scan inline on a small host and in a
worker thread on a big one.

Cost: Linux has no "members of group G" query, so every such answer reads the stat file of
every process on the host (~10 us each, with `os.open`/`os.read`: a third cheaper than
`open()`). The thread hand-off costs ~1 ms on a busy 2-core machine, more than a small host's
whole scan, so `run_scan` uses a thread only past `SCAN_INLINE_MAX` processes (counted by the
last scan). Non-Linux: every read is None and every scan is empty.
Identity: a pid can be reused; (pid, start) names one process for good (start = field 22,
clock ticks after boot).
Docs: https://man7.org/linux/man-pages/man5/proc_pid_stat.5.html
      https://man7.org/linux/man-pages/man5/proc_pid_environ.5.html
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import attrs
import trio

SCAN_INLINE_MAX = 200  # host processes up to which a scan (~10 us each) runs on the loop
STAT_READ_BYTES = 4096  # one read holds the whole stat line (comm is at most 64 bytes)
_host_processes = 0  # processes the last scan went through

T = TypeVar("T")


@attrs.frozen
class Proc:
    """One process as /proc/PID/stat showed it when read."""

    pid: int
    ppid: int
    pgid: int
    state: str  # R, S, D, T, t, Z, X...
    start: int  # clock ticks after boot: (pid, start) names one process for good
    sid: int = 0  # session id


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after comm (field 3, the state, first); None if gone."""
    try:  # os.open/os.read: a third cheaper than open(), and a scan does this per process
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        raw = os.read(fd, STAT_READ_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not raw:
        return None
    # comm may hold spaces and parentheses: the fields start after the last ")".
    return raw[raw.rfind(b")") + 2 :].split()


def _proc(pid: int, fields: list[bytes]) -> Proc:
    return Proc(pid, int(fields[1]), int(fields[2]), fields[0].decode(), int(fields[19]),
                int(fields[3]))


def read_proc(pid: int) -> Proc | None:
    """Process *pid* as /proc shows it now; None if there is none (or no /proc)."""
    fields = _stat_fields(pid)
    return None if fields is None else _proc(pid, fields)


def current(proc: Proc) -> Proc | None:
    """*proc* as it is now, if its pid still names it (same start time); zombies included."""
    now = read_proc(proc.pid)
    return now if now is not None and now.start == proc.start else None


def scan(*, pgid: int | None = None, sid: int | None = None) -> Iterator[Proc]:
    """Every process on the host (only those of process group *pgid* and/or session *sid*,
    if given), zombies included. One pass over /proc; counts the host's processes for
    `run_scan`."""
    global _host_processes
    try:
        pids = [int(entry.name) for entry in os.scandir("/proc") if entry.name.isdigit()]
    except OSError:
        return
    _host_processes = len(pids)
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # Filter on the raw fields: building a Proc for every process would cost more.
        if (pgid is not None and int(fields[2]) != pgid) or (
                sid is not None and int(fields[3]) != sid):
            continue
        yield _proc(pid, fields)


def snapshot() -> dict[int, Proc]:
    """Every process on the host, by pid."""
    return {proc.pid: proc for proc in scan()}


def scan_inline() -> bool:
    """Whether a scan is cheap enough to run on the event loop (see the module docstring)."""
    return _host_processes <= SCAN_INLINE_MAX


async def run_scan(scanner: Callable[[], T]) -> T:
    """`scanner()` (a function that scans /proc), in a worker thread on a host with many
    processes, so a scan never holds the event loop for long.

    **Cancellation**: the thread is waited for (cancel-safe, nothing half-done).
    """
    if scan_inline():
        return scanner()
    return await trio.to_thread.run_sync(scanner)


def environ_value(pid: int, name: str) -> str | None:
    """Variable *name* of the environment process *pid* was started with, if any (later
    `setenv` calls in the process do not show)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:  # rare (adopted orphans only)
            environ = f.read()
    except OSError:
        return None
    prefix = name.encode() + b"="
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode("utf-8", "replace")
    return None


def _self_check() -> None:
    me = read_proc(os.getpid())
    assert me is not None and me.ppid == os.getppid(), me
    assert me.pgid == os.getpgid(0) and me.sid == os.getsid(0) and me.state == "R", me
    assert current(me) == me and current(attrs.evolve(me, start=me.start + 1)) is None
    assert me in scan(pgid=me.pgid) and me.pid in snapshot() and _host_processes >= 1
    assert all(p.sid == me.sid for p in scan(sid=me.sid))
    assert read_proc(-1) is None
    os.environ["CCX_PROCFS_CHECK"] = "x"  # not in the initial environment: not visible
    assert environ_value(os.getpid(), "CCX_PROCFS_CHECK") is None
    assert environ_value(os.getpid(), "PATH") == os.environ.get("PATH")
    assert trio.run(run_scan, snapshot).keys() >= {me.pid}
    print("ccx.procfs: PASS")


if __name__ == "__main__":
    _self_check()
