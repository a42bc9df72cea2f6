"""Held output spooled to disk (issue 18, PROTOCOL.md section 8 semantics kept): exact replay
across spool segments, attach after the end, a full disk that loses nothing, and crash
leftovers removed at the next start.

Rules: as in conftest (in-process servers on 127.0.0.1:0, real children, deadlines as hang
guards only). The disk-full test mounts a 1 MiB tmpfs (root needed; skipped with a line
saying so otherwise) and unmounts it at the end. The crash test runs real `ccx serve`
processes and SIGKILLs one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import RawClient, join, py, wait_for

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "reliability"))
from relhelp import RawWs, Serve

from ccx.outbox import CACHE_BYTES
from ccx.server import Server
from ccx.spool import MIN_SEGMENT_BYTES

KIB = 1024
# Numbered lines: any lost, repeated or reordered byte shows.
LINES = 40_000  # 8 bytes each: 320,000 bytes
NUMBERED = py(f"import sys\nfor i in range({LINES}): sys.stdout.write('%07d\\n' % i)\n")
EXPECTED = b"".join(b"%07d\n" % i for i in range(LINES))


def spool_files(server: Server) -> list[Path]:
    spool = server.manager.spool
    assert spool is not None, "output is not spooled"
    return [p for p in Path(spool.path).iterdir() if p.name != "lock"]


async def read_some(client: RawClient, sid: str, at_least: int) -> list[dict[str, Any]]:
    """Outputs of *sid* until *at_least* bytes of data came (then stop reading)."""
    got: list[dict[str, Any]] = []
    size = 0
    while size < at_least:
        params = await client.notification("process.output", sid)
        got.append(params)
        size += len(params["data"])
    return got


PART_A = 15_000  # lines written before the child waits for a line on stdin
TWO_PARTS = py("import sys\n"
               f"for i in range({PART_A}):\n"
               "    sys.stdout.write('%07d\\n' % i)\n"
               "    if i % 100 == 99: sys.stdout.flush()\n"
               "sys.stdout.flush(); sys.stdin.readline()\n"
               f"for i in range({PART_A}, {PART_A} + 250_000): sys.stdout.write('%07d\\n' % i)\n")
TWO_PARTS_EXPECTED = b"".join(b"%07d\n" % i for i in range(PART_A + 250_000))


async def test_replay_is_exact_across_spool_segments(start_server: Any, connect: Any) -> None:
    """A client reads the first part (120 kB, many frames), then its connection goes; the
    next attaches from a seq ~30 kB in, so the replay is read back from disk across a
    segment boundary (64 KiB segments); then 2 MB more stream through small budgets, so
    the spool rolls and deletes segments many times. Every byte exactly once, and the spool
    never held more than its budgets and a segment or two."""
    budget = 256 * KIB
    server = await start_server(replay_bytes=budget)
    first = await connect(server)
    sid = (await first.execute(TWO_PARTS, linger=30, stdin=True))["session_id"]
    got = await read_some(first, sid, PART_A * 8)  # all of part A: nothing more exists yet
    await first.ws.aclose()
    sizes = [len(p["data"]) for p in got]
    cut = next(i for i in range(len(got)) if sum(sizes[: i + 1]) > 30_000)
    since = got[cut]["seq"]
    kept = got[: cut + 1]
    second = await connect(server)
    await second.result("attach", {"session_id": sid, "since_seq": since})
    await second.result("input", {"session_id": sid, "data": "\n"})
    outputs, completed = await second.run_to_completion(sid)
    seqs = [p["seq"] for p in kept + outputs]
    assert seqs == list(range(len(seqs))), "a gap or a repeat at the replay point"
    assert join(kept + outputs, "stdout") == TWO_PARTS_EXPECTED
    assert completed["exit_code"] == 0
    spool = server.manager.spool
    assert spool is not None
    # Held: two budgets (each overrun by at most one frame), plus the segment being left.
    bound = 2 * budget + 2 * 64 * KIB + 2 * MIN_SEGMENT_BYTES
    assert spool.peak_disk_bytes <= bound, (spool.peak_disk_bytes, bound)
    assert spool.peak_disk_bytes * 2 < len(TWO_PARTS_EXPECTED), "the spool never rolled"


async def test_attach_after_the_end_replays_from_disk(start_server: Any, connect: Any) -> None:
    """A session that ran to its end while detached: all its output comes from the spool,
    then process.completed; a second attach from -1 replays the same again; once the
    session is forgotten its spool files are gone."""
    server = await start_server(retention=2.0)
    gone = await connect(server)
    sid = (await gone.execute(py("import time, sys; time.sleep(0.5); "
                                 f"sys.stdout.write(''.join('%07d\\n' % i for i in range({LINES})))"),
                              linger=30))["session_id"]
    await gone.ws.aclose()
    await wait_for(lambda: (s := server.manager.find(sid)) is not None and s.state.ended)
    assert spool_files(server), "the held output is not on disk"
    reader = await connect(server)
    for _ in range(2):
        attached = await reader.result("attach", {"session_id": sid, "since_seq": -1})
        outputs, completed = await reader.run_to_completion(sid)
        assert join(outputs, "stdout") == EXPECTED and completed["status"] == "exited"
        assert [p["seq"] for p in outputs] == list(range(attached["next_seq"]))
    await wait_for(lambda: server.manager.find(sid) is None and not spool_files(server),
                   timeout=15)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (mode 0700), unmounted afterwards; skips if mounting is not allowed."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs for the disk-full test (needs root): "
                    f"{done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


async def test_full_disk_blocks_the_child_and_loses_nothing(
        start_server: Any, connect: Any, tiny_disk: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    """The spool's disk fills: the session stops reading (the child blocks in write), one
    error is logged; once room returns, a reader gets every byte exactly."""
    filler = tiny_disk / "filler"
    filler.write_bytes(b"f" * (900 * KIB))
    server = await start_server(spool_dir=str(tiny_disk), replay_bytes=256 * KIB)
    spool = server.manager.spool
    assert spool is not None and spool.path.startswith(str(tiny_disk))
    size = 2 * 1024 * KIB
    code = f"import sys; sys.stdout.buffer.write(b''.join(b'%07d\\n' % i for i in range({size // 8})))"
    gone = await connect(server)
    sid = (await gone.execute(py(code), linger=60))["session_id"]
    await gone.ws.aclose()
    await wait_for(lambda: spool.failing, timeout=20)
    session = server.manager.find(sid)
    assert session is not None
    # The pumps fill the channel behind the blocked collector, then stop: the child blocks.
    with trio.fail_after(60):
        while True:
            stalled = session.stdout_bytes
            await trio.sleep(1.5)  # past a retry (1 s): the spool is still full
            if session.stdout_bytes == stalled:
                break
    assert stalled < size and not session.state.ended and spool.failing
    filler.unlink()  # room again
    reader = await connect(server)
    await reader.result("attach", {"session_id": sid, "since_seq": -1})
    outputs, completed = await reader.run_to_completion(sid)
    assert [p["seq"] for p in outputs] == list(range(len(outputs)))
    assert join(outputs, "stdout") == b"".join(b"%07d\n" % i for i in range(size // 8))
    assert completed["status"] == "exited" and not spool.failing
    logged = capfd.readouterr()
    assert (logged.out + logged.err).count("spool_write_failed") == 1, "one error, not one per try"


async def test_crash_leftovers_are_removed_at_the_next_start(tmp_path: Path) -> None:
    """A SIGKILLed server's spool directory (with a session's held output in it) is removed
    by the next server to start; a live server's directory is left alone."""
    live = Serve(tmp_path, CCX_NODE_NAME="live")
    doomed = Serve(tmp_path, CCX_NODE_NAME="doomed")
    spool_root = tmp_path / "spool"
    try:
        client = await RawWs.connect(doomed.port)
        reply = await client.request("execute", {"command": NUMBERED, "linger": 600})
        assert "result" in reply, reply
        await client.aclose()

        def dirs(node: str) -> list[Path]:
            return [d for d in spool_root.iterdir() if d.name.startswith(f"{node}-")]

        await wait_for(lambda: any(f.name != "lock" for d in dirs("doomed")
                                   for f in d.iterdir()), timeout=15)
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(timeout=10)
        assert dirs("doomed") and dirs("live")
        later = Serve(tmp_path, CCX_NODE_NAME="later")
        try:
            assert not dirs("doomed"), "the dead server's spool is still there"
            assert dirs("live") and dirs("later"), "a live server's spool was touched"
            assert any(e.get("event") == "spool_leftovers_removed" for e in later.events)
        finally:
            later.stop()
    finally:
        live.stop()
        if doomed.proc.poll() is None:
            doomed.proc.kill()
    assert not os.listdir(spool_root), "clean stops leave nothing"


async def test_metrics_show_the_spool_on_disk(start_server: Any, connect: Any) -> None:
    """`ccx_spool_bytes` counts held output on disk; `ccx_held_bytes` only what is in memory."""
    from conftest import http_get

    server = await start_server()
    gone = await connect(server)
    sid = (await gone.execute(NUMBERED, linger=30))["session_id"]
    await gone.ws.aclose()
    await wait_for(lambda: (s := server.manager.find(sid)) is not None and s.state.ended)
    _, _, body = await http_get(server.port or 0, "/metrics")
    values = {line.split()[0]: float(line.split()[1]) for line in body.decode().splitlines()
              if line and not line.startswith("#")}
    assert values["ccx_spool_bytes"] >= len(EXPECTED), values
    held = values["ccx_held_bytes"]  # the frames cached for a reader, controls
    assert 0 < held <= CACHE_BYTES + 4 * KIB, held


async def test_a_detached_session_holds_its_output_on_disk_only(start_server: Any,
                                                                  connect: Any) -> None:
    """With nobody attached, the records cached for a reader are let go: memory holds no
    output of a detached session (the held gauge counts only control events), and an attach
    still gets every byte, from disk."""
    server = await start_server()
    gone = await connect(server)
    sid = (await gone.execute(py("import time, sys; time.sleep(0.5); "
                                 f"sys.stdout.write(''.join('%07d\\n' % i for i in range({LINES})))"),
                              linger=30))["session_id"]
    await gone.ws.aclose()
    await wait_for(lambda: (s := server.manager.find(sid)) is not None and s.state.ended
                   and s.owner is None)
    assert server.manager.held.held_bytes < 4 * KIB < CACHE_BYTES, server.manager.held
    reader = await connect(server)
    await reader.result("attach", {"session_id": sid, "since_seq": -1})
    outputs, completed = await reader.run_to_completion(sid)
    assert join(outputs, "stdout") == EXPECTED and completed["status"] == "exited"


async def test_an_owner_whose_connection_broke_gets_no_cached_records(tmp_path: Path) -> None:
    """The owner's sink fails (its connection broke) while output flows and the session then
    ends before the connection is released: the records cached for that reader are let go
    at once (they are on disk), not kept until an attach or the end of retention."""
    from ccx.events import Completed, Event, Started
    from ccx.outbox import HeldBudget
    from ccx.output import SessionOutput
    from ccx.owner import OwnerGone
    from ccx.spool import SpoolDir

    class Broken:
        async def send_frame(self, frame: bytes) -> None:
            raise OwnerGone("gone")

        async def send_event(self, event: Event) -> None:
            if not isinstance(event, Started):
                raise OwnerGone("gone")

    base = tmp_path / "spool"
    base.mkdir(mode=0o700)
    directory = SpoolDir.open(str(base), node=None, incarnation="t")
    assert directory is not None
    held = HeldBudget(1 << 30)
    output = SessionOutput("s", replay_bytes=1 << 20, text=False, owner=Broken(), held=held,
                           spool=directory)
    read_fd, write_fd = os.pipe()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(output.deliver)
            nursery.start_soon(output.pump, trio.lowlevel.FdStream(read_fd), "stdout",
                               output.sender())
            nursery.start_soon(output.collect, Started("s", 1, 1, ["x"]), ["stdout"],
                               lambda: Completed("s", "exited", 0, None, 0.0,
                                                 output.stdout_bytes, 0))
            output.announce()
            os.write(write_fd, b"a" * 60_000)
            os.close(write_fd)
            output.stop_reading()  # the group is gone: what the pipe holds is still read
            await output.wait_settled()
            assert output.owner_broken and output.holds_unsent
            assert held.held_bytes < 4 * KIB, held  # no cached records, only control events
            nursery.cancel_scope.cancel()
    output.clear()
    directory.close()
