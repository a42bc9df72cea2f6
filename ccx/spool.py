"""Held output on disk: one append-only spool per session, in segment files, under one
directory per running server; what a crashed server left is removed at the next start.

Inputs: the spool base directory (`CCX_SPOOL_DIR`, by default `<CCX_STATE_DIR>/spool`), this
server's node name and incarnation; encoded frames to append; (offset, length) to read back.
Outputs: `SpoolDir`, the server's own directory `<base>/<node>-<incarnation>/` (`<node>` is
`-` without CCX_NODE_NAME), on whose `lock` file the server holds an exclusive `flock` for
its whole life; `Spool`, one session's frames at growing logical offsets, read back with
`pread`, released from the front (`release_before`) segment by segment, deleted by `close`.

Disk: a spool holds the frames of its held output plus at most one segment's worth of
released bytes (the tail segment is never cut: it is left once full), and one released
segment kept as a spare: the next segment reuses it, since writing over pages already in the
page cache costs a copy, where a new file costs an allocation too (measured ~25 vs ~75 us a
64 KiB frame on ext4 here). Segments are
`segment_bytes` each (a frame never spans two). At most two descriptors per spool: the tail
segment (write) and the segment last read, which is closed when it is released.
Writes and reads are plain `pwrite`/`pread` on the event loop thread: the page cache takes
them (as the crash record's writes); a failed write (ENOSPC, EIO, EACCES...) raises
`OSError`, and the caller retries the same frame at the same offset later (a partial write
leaves bytes past `end`, which the retry overwrites). `SpoolDir` logs the first failure once
(`spool_write_failed`) and the recovery once (`spool_writable_again`), whatever the number of
sessions that hit it.
Crash leftovers: `SpoolDir.open` first removes every sibling directory whose `lock` it can
take (its server is gone: the kernel dropped the flock when it died, in any PID namespace);
a directory whose lock is held belongs to a live server and is left alone. A directory is
created under a `.new-` name and renamed once its lock is held, so a named one always has a
lock; `.new-` leftovers older than `NEW_DIR_STALE_S` are removed too.
Docs: https://man7.org/linux/man-pages/man2/pread.2.html
      https://man7.org/linux/man-pages/man2/flock.2.html
"""

from __future__ import annotations

import bisect
import collections
import errno
import fcntl
import os
import shutil
import tempfile
import time

import attrs

from ccx.crash_record import prepare_dir
from ccx.log import get_logger

log = get_logger("ccx.spool")

LOCK_NAME = "lock"
NEW_PREFIX = ".new-"
NEW_DIR_STALE_S = 60.0  # a `.new-` directory this old was left by a start that died
MIN_SEGMENT_BYTES = 64 * 1024
MAX_SEGMENT_BYTES = 16 * 1024 * 1024


def segment_size(budget_bytes: int) -> int:
    """Segment size for a session with `budget_bytes` budgets: a quarter of one budget, so a
    spool holds at most about 1/4 budget of released bytes, within sane bounds."""
    return min(max(budget_bytes // 4, MIN_SEGMENT_BYTES), MAX_SEGMENT_BYTES)


def _try_lock(path: str) -> int | None:
    """The fd of *path* with an exclusive flock now held by us, or None if another process
    holds it (or the file is gone)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def tree_bytes(path: str) -> int:
    """Bytes of the files under *path* (their sizes)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def sweep(base: str) -> tuple[int, int]:
    """Remove the spool directories of servers that are gone; return (directories, bytes)."""
    removed = freed = 0
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return 0, 0
    for name in names:
        path = os.path.join(base, name)
        if name.startswith(NEW_PREFIX):
            try:
                stale = time.time() - os.lstat(path).st_mtime > NEW_DIR_STALE_S
            except OSError:
                continue
            if stale:
                freed += tree_bytes(path)
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
            continue
        fd = _try_lock(os.path.join(path, LOCK_NAME))
        if fd is None:
            continue  # a live server's (or not a spool directory)
        try:
            freed += tree_bytes(path)
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        finally:
            os.close(fd)
    if removed:
        log.warning("spool_leftovers_removed", base=base, directories=removed, bytes=freed)
    return removed, freed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@attrs.define(eq=False)
class SpoolDir:
    """This server's spool directory, its lock held; the parent of every session's spool."""

    path: str
    _lock_fd: int | None
    disk_bytes: int = 0  # bytes in every spool's segment files now
    peak_disk_bytes: int = 0
    failing: bool = False  # the last write failed (logged once, until one succeeds)
    _names: int = 0

    @classmethod
    def open(cls, base: str, *, node: str | None, incarnation: str) -> SpoolDir | None:
        """Sweep dead servers' spools from *base*, then make this server's directory. None
        (logged) if *base* is unusable: output is then held in memory."""
        if not base or not prepare_dir(base):
            return None
        sweep(base)
        final = os.path.join(base, f"{node or '-'}-{incarnation}")
        try:
            fresh = tempfile.mkdtemp(prefix=NEW_PREFIX, dir=base)
            fd = os.open(os.path.join(fresh, LOCK_NAME),
                         os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(fresh, final)
        except OSError as exc:
            log.error("spool_dir_unusable", path=base, error=str(exc),
                      why="output will be held in memory")
            return None
        return cls(final, fd)

    def spool(self, name: str, budget_bytes: int) -> Spool:
        """A new, empty spool for one session (files are made on the first append)."""
        self._names += 1
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
        return Spool(self, os.path.join(self.path, f"{self._names}-{safe}"),
                     segment_size(budget_bytes))

    def grew(self, size: int) -> None:
        self.disk_bytes += size
        if self.disk_bytes > self.peak_disk_bytes:
            self.peak_disk_bytes = self.disk_bytes

    def write_failed(self, path: str, exc: OSError) -> None:
        if not self.failing:
            self.failing = True
            log.error("spool_write_failed", path=path, error=str(exc),
                      errno=errno.errorcode.get(exc.errno or 0),
                      why="sessions stop reading their output (children block) until the "
                          "spool can be written again; nothing is lost")

    def write_ok(self) -> None:
        if self.failing:
            self.failing = False
            log.warning("spool_writable_again", path=self.path)

    def close(self) -> None:
        """The server stops: remove the directory, then let go of the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def release_lock(self) -> None:
        """Let go of the lock and leave the files: what a crash does (for checks)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


@attrs.define(eq=False)
class Spool:
    """One session's frames, appended at growing logical offsets, in segment files."""

    owner: SpoolDir
    prefix: str
    segment_bytes: int
    end: int = 0  # logical offset the next frame is written at
    starts: list[int] = attrs.field(factory=list)  # logical start of each live segment
    _paths: collections.deque[str] = attrs.field(factory=collections.deque)
    _first: int = 0  # index (since creation) of starts[0]
    _write_fd: int | None = None  # the tail segment's
    _read_fd: int | None = None
    _read_start: int = -1  # logical start of the segment `_read_fd` is on
    _spare: tuple[str, int] | None = None  # a released segment (path, size), reused next
    sealed: bool = False  # no more appends will come
    closed: bool = False

    def append(self, frame: bytes) -> int:
        """Write *frame* at `end`; return its offset. `OSError` if it cannot be written
        (nothing is counted then: the same frame is to be appended again)."""
        if self.closed:
            raise OSError(errno.EBADF, "spool closed")
        try:
            if self._write_fd is None or self.end - self.starts[-1] >= self.segment_bytes:
                self._roll()
            assert self._write_fd is not None
            offset, at, view = self.end, self.end - self.starts[-1], memoryview(frame)
            while view:
                written = os.pwrite(self._write_fd, view, at)
                view, at = view[written:], at + written
        except OSError as exc:
            self.owner.write_failed(self.prefix, exc)
            raise
        self.end += len(frame)
        self.owner.grew(len(frame))
        if self.owner.failing:
            self.owner.write_ok()
        return offset

    def _roll(self) -> None:
        """Start a new tail segment at `end` (also the first one)."""
        if self.starts and self.end == self.starts[-1] and self._write_fd is not None:
            return  # the tail is empty (a retry after a failed roll's first write)
        if self._spare is not None:  # its pages are in the page cache already: a write
            path, size = self._spare  # over them is a copy, not an allocation (3x cheaper)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            self._spare = None
            self.owner.grew(-size)
        else:
            path = f"{self.prefix}.{self._first + len(self.starts)}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        if self._write_fd is not None:
            os.close(self._write_fd)
        self._write_fd = fd
        self.starts.append(self.end)
        self._paths.append(path)

    def read(self, offset: int, length: int) -> bytes:
        """The *length* bytes written at *offset* (still held: not released)."""
        index = bisect.bisect_right(self.starts, offset) - 1
        start = self.starts[index]
        if index == len(self.starts) - 1 and self._write_fd is not None:
            fd = self._write_fd
        else:
            if self._read_start != start:
                self._close_read()
                self._read_fd = os.open(self._paths[index], os.O_RDONLY | os.O_CLOEXEC)
                self._read_start = start
            assert self._read_fd is not None
            fd = self._read_fd
        data = os.pread(fd, length, offset - start)
        if len(data) != length:
            raise OSError(errno.EIO, f"spool {self.prefix}: short read at {offset}")
        return data

    def _close_read(self) -> None:
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd, self._read_start = None, -1

    def release_before(self, offset: int) -> None:
        """Nothing before *offset* will be read again: delete the segments wholly before it
        (the tail segment stays until a new one is started)."""
        while len(self.starts) > 1 and self.starts[1] <= offset:
            self._unlink_first(self.starts[1] - self.starts[0], keep=True)

    def _unlink_first(self, size: int, *, keep: bool = False) -> None:
        """Let go of the oldest segment: kept as the spare (*keep*, and none is kept yet;
        its bytes still count) or deleted."""
        start = self.starts.pop(0)
        path = self._paths.popleft()
        self._first += 1
        if self._read_start == start:
            self._close_read()
        if keep and self._spare is None and not self.sealed:
            self._spare = (path, size)
            return
        _unlink(path)
        self.owner.grew(-size)

    def _drop_spare(self) -> None:
        if self._spare is not None:
            _unlink(self._spare[0])
            self.owner.grew(-self._spare[1])
            self._spare = None

    def seal(self) -> None:
        """No more appends will come: close the write descriptor (reads reopen as needed)."""
        self.sealed = True
        self._close_write()
        self._drop_spare()

    def _close_write(self) -> None:
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None

    def idle(self) -> None:
        """Close descriptors until the next read or append (an ended spool that holds
        nothing unread keeps no descriptor)."""
        self._close_read()
        self._close_write()

    @property
    def disk_bytes(self) -> int:
        return self.end - self.starts[0] if self.starts else 0

    def close(self) -> None:
        """Delete every segment; appends are refused from now on."""
        self._close_read()
        self._close_write()
        self._drop_spare()
        while self.starts:
            size = (self.starts[1] if len(self.starts) > 1 else self.end) - self.starts[0]
            self._unlink_first(size)
        self.closed = True


def _self_check() -> None:
    """Segments roll and are released; a crashed server's directory is swept, a live one's
    kept; a failing write is reported once and changes nothing."""
    with tempfile.TemporaryDirectory() as base:
        os.chmod(base, 0o700)
        first = SpoolDir.open(base, node=None, incarnation="a")
        assert first is not None
        spool = first.spool("sess/1", 400)
        spool.segment_bytes = 100  # below the minimum, to see segments roll
        offsets = [spool.append(bytes([65 + i]) * 60) for i in range(5)]
        assert offsets == [0, 60, 120, 180, 240] and spool.starts == [0, 120, 240]
        assert spool.read(60, 60) == b"B" * 60 and spool.read(240, 60) == b"E" * 60
        spool.release_before(180)
        assert spool.starts == [120, 240] and first.disk_bytes == 300  # 120: the spare
        assert spool.read(180, 60) == b"D" * 60
        assert [spool.append(b"F" * 60), spool.append(b"G" * 60)] == [300, 360]
        assert spool.starts == [120, 240, 360] and first.disk_bytes == 300
        assert len(os.listdir(first.path)) == 4, "the spare was not reused"  # 3 + lock
        assert spool.read(360, 60) == b"G" * 60 and spool.read(300, 60) == b"F" * 60
        second = SpoolDir.open(base, node="n", incarnation="b")  # first is alive: kept
        assert second is not None and os.path.isdir(first.path)
        first.release_lock()  # a crash
        third = SpoolDir.open(base, node="n", incarnation="c")
        assert third is not None and not os.path.exists(first.path)
        assert sorted(os.listdir(base)) == ["n-b", "n-c"], os.listdir(base)
        other = second.spool("x", 1000)
        other.append(b"x")
        prefix, other.prefix = other.prefix, os.path.join(base, "gone", "x")
        other.segment_bytes = 1  # the next append needs a new segment: it cannot be made
        try:
            other.append(b"y")
        except OSError:
            assert second.failing and other.end == 1
        else:
            raise AssertionError("a segment in a missing directory was made")
        other.prefix = prefix
        assert other.append(b"y") == 1 and not second.failing
        other.close()
        spool.close()
        assert not [n for n in os.listdir(second.path) if n != LOCK_NAME]
        second.close()
        third.close()
        assert not os.listdir(base)
    print("ccx.spool: PASS")


if __name__ == "__main__":
    _self_check()
