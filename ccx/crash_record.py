"""Crash record: the process groups a server runs, kept on disk so that the next server to
start can kill what a SIGKILLed (or crashed) one left behind.

Inputs: the state directory (`CCX_STATE_DIR`, by default `$XDG_RUNTIME_DIR/ccx` or
`/tmp/ccx-$UID`), the running sessions (pgid, leader start time, escaped descendants).
Outputs: `server-<node>-<incarnation>.json` in that directory (`<node>` is `-` without
CCX_NODE_NAME; the incarnation is new on every start, so servers sharing the directory, even
as PID 1 of their own PID namespaces, never share a name), replaced atomically (write, fsync,
rename) whenever the set changes and removed on a clean stop; next to it
`server-<node>-<incarnation>.lock`, on which the running server holds an exclusive `flock`
for its whole life. `recover()` at start-up takes the lock of each record it finds: a lock it
can take belongs to a server that is gone (the kernel drops a flock when its holder dies,
whatever PID namespace it ran in), and every recorded process of such a server still alive
is stopped, logged; a record whose lock is held is a live server's and is left alone. A
record without a lock file (written by an older ccx) is judged by its pid and start time.
Identity: a pid alone can be reused, so every process is recorded with its start time (field
22 of /proc/PID/stat); a group whose leader is gone is only touched through members that
still carry the session's `CCX_SESSION_ID` marker. The directory must belong to this user and
be writable by nobody else, or the record is neither written nor trusted.
Docs: https://man7.org/linux/man-pages/man5/proc_pid_stat.5.html
      https://specifications.freedesktop.org/basedir-spec/latest/ (XDG_RUNTIME_DIR)
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import msgspec

from ccx.descendants import session_marker
from ccx.log import get_logger
from ccx.process import stop_procs
from ccx.procfs import Proc, read_proc, snapshot

log = get_logger("ccx.crash_record")

STATE_VERSION = 2


def prepare_dir(path: str) -> bool:
    """Create *path* (0700) if needed; False (logged) if it is not ours alone to trust."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError as exc:
        log.error("state_dir_unusable", path=path, error=str(exc))
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        log.error("state_dir_untrusted", path=path, uid=info.st_uid, mode=oct(info.st_mode),
                  why="must be a directory owned by this user, writable by nobody else")
        return False
    return True


@attrs.frozen
class GroupRecord:
    """One session's process group as the crash record keeps it."""

    session_id: str
    pgid: int
    start: int  # the leader's start time
    escapees: tuple[tuple[int, int], ...] = ()  # (pid, start) of descendants outside the group

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "pgid": self.pgid, "start": self.start,
                "escapees": [list(e) for e in self.escapees]}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> GroupRecord:
        return cls(str(value["session_id"]), int(value["pgid"]), int(value["start"]),
                   tuple((int(p), int(s)) for p, s in value.get("escapees", ())))


@attrs.define(eq=False)
class StateFile:
    """This server's crash record. Disabled (every call a no-op) when the dir is unusable."""

    directory: str
    enabled: bool = False
    path: str = ""
    incarnation: str = ""
    _lock_fd: int | None = None
    _last: list[dict[str, Any]] | None = None

    @classmethod
    def open(cls, directory: str, *, node: str | None, incarnation: str) -> StateFile:
        """This server's record, named by *node* and *incarnation*, with its lock held."""
        if not directory or not prepare_dir(directory):
            return cls(directory)
        stem = os.path.join(directory, f"server-{node or '-'}-{incarnation}")
        try:
            fd = os.open(stem + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            log.error("state_lock_failed", path=stem + ".lock", error=str(exc))
            return cls(directory)
        return cls(directory, True, stem + ".json", incarnation, fd)

    def write(self, groups: Iterable[GroupRecord]) -> None:
        """Replace the record with *groups* (skipped when nothing changed)."""
        if not self.enabled:
            return
        entries = [g.to_json() for g in groups]
        if entries == self._last:
            return
        me = read_proc(os.getpid())
        body = {"version": STATE_VERSION, "server": {"pid": os.getpid(),
                                                    "start": me.start if me else None,
                                                    "incarnation": self.incarnation},
                "groups": entries}
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(msgspec.json.encode(body))  # 1,000 groups: ~0.3 ms, not ~15 ms
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._last = entries
        except OSError as exc:
            log.error("state_write_failed", path=self.path, error=str(exc))

    def release_lock(self) -> None:
        """Let go of the lock and leave the record: what a crash does (for checks)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove(self) -> None:
        """A clean stop: the record, then its lock file, go (the lock is released last)."""
        if self.enabled:
            for path in (self.path, _lock_path(self.path)):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _lock_path(record_path: str) -> str:
    return record_path.removesuffix(".json") + ".lock"


def _take_lock(record_path: str) -> int | None:
    """The fd of the record's lock, now held by us (its server is gone); None while its
    server holds it. A record without a lock file (an older ccx's) raises FileNotFoundError."""
    fd = os.open(_lock_path(record_path), os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _server_running(server: Mapping[str, Any]) -> bool:
    proc = read_proc(int(server["pid"]))
    return proc is not None and proc.start == server.get("start") and proc.state != "Z"


def _leftovers(record: GroupRecord, procs: Mapping[int, Proc]) -> list[Proc]:
    """The recorded group's processes that still run and are provably the recorded ones."""
    found: list[Proc] = []
    leader = procs.get(record.pgid)
    leader_ours = leader is not None and leader.start == record.start
    for proc in procs.values():
        # Every session leader called setsid: its session id is its pgid, so processes that
        # changed group (setpgid, a PTY shell's jobs) but not session are found too.
        in_session = proc.pgid == record.pgid or proc.sid == record.pgid
        if not in_session or proc.state == "Z" or proc.start < record.start:
            continue
        if leader_ours or session_marker(proc.pid) == record.session_id:
            found.append(proc)
    for pid, start in record.escapees:
        escapee = procs.get(pid)
        if escapee is not None and escapee.start == start and escapee.state != "Z" \
                and escapee not in found:
            found.append(escapee)
    return found


def _read_record(path: str) -> tuple[dict[str, Any], list[GroupRecord]]:
    """(server, groups) of one record; a small file on a local (usually tmpfs) directory."""
    with open(path) as f:
        body = json.load(f)
    return dict(body["server"]), [GroupRecord.from_json(g) for g in body["groups"]]


async def recover(directory: str, *, grace: float) -> int:
    """Stop what servers that died without cleaning up left running; return how many
    groups were stopped. Files of servers still running are left alone.

    Each group's leftovers go through `ccx.process.stop_procs`: the kill path's timeline
    (SIGTERM, SIGCONT, *grace*, SIGKILL) and its `StopStep`, logged as `step`.

    **Cancellation**: each stop is shielded and bounded by *grace* + `AFTER_KILL_TIMEOUT_S`;
    cancelling between them leaves the files of groups not yet handled in place for the next
    start.
    """
    if not directory or not prepare_dir(directory):
        return 0
    stopped = 0
    for name in sorted(os.listdir(directory)):
        if not (name.startswith("server-") and name.endswith(".json")):
            continue
        path = os.path.join(directory, name)
        lock_fd: int | None = None
        try:
            lock_fd = _take_lock(path)
            if lock_fd is None:
                continue  # its server is alive (in this PID namespace or another)
        except FileNotFoundError:
            pass  # no lock file: an older ccx's record, judged by pid and start time
        except OSError as exc:
            log.warning("state_lock_unusable", path=path, error=str(exc))
            continue
        try:
            stopped += await _recover_record(path, lock_fd is not None, grace)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
    return stopped


async def _recover_record(path: str, locked: bool, grace: float) -> int:
    """Stop what the record at *path* lists; remove it (and its lock file). *locked*: we
    hold its lock, so its server is gone; otherwise the recorded pid decides."""
    stopped = 0
    try:
        server, records = _read_record(path)
    except FileNotFoundError:  # another server recovered it meanwhile
        return 0
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("state_file_unreadable", path=path, error=str(exc))
        return 0
    if not locked and _server_running(server):
        return 0
    for record in records:
        leftovers = _leftovers(record, snapshot())
        if not leftovers:
            continue
        step = await stop_procs(leftovers, grace=grace)
        stopped += 1
        log.warning("orphan_group_stopped", pgid=record.pgid, session_id=record.session_id,
                    pids=[p.pid for p in leftovers], step=step.value,
                    dead_server_pid=server.get("pid"),
                    dead_incarnation=server.get("incarnation"))
    for stale in (path, _lock_path(path)):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    log.info("state_file_recovered", path=path, groups=len(records))
    return stopped


def _self_check() -> None:
    """A record left by a dead server: `recover` stops its group (a TERM-trapping child
    too, through SIGKILL) and deletes the file; a running server's record is left alone."""
    import functools
    import subprocess
    import sys
    import tempfile

    import trio

    def recover_now(directory: str) -> int:
        return trio.run(functools.partial(recover, directory, grace=0.2))

    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
           "print('ready', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             start_new_session=True)
    assert child.stdout is not None and child.stdout.readline() == b"ready\n"
    leader = read_proc(child.pid)
    assert leader is not None
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o700)
        record = StateFile.open(directory, node=None, incarnation="check")
        record.write([GroupRecord("check", child.pid, leader.start)])
        assert recover_now(directory) == 0, "a running server's groups (its lock is held)"
        record.release_lock()  # what a crash does: the kernel drops the flock
        assert recover_now(directory) == 1
        assert not os.listdir(directory), "the dead server's record stays"
    child.wait(timeout=5)  # already reaped by the kill path (its status lost: ours, not trio's)
    assert read_proc(child.pid) is None, "the TERM-trapping child survived"
    print("ccx.crash_record: PASS")


if __name__ == "__main__":
    _self_check()
