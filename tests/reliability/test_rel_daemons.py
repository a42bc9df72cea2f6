"""Reliability: children that daemonize (double fork + setsid) do not outlive their session.

`killpg` cannot reach a process that left the group; ccx tracks the session's descendants
(/proc tree, and the `CCX_SESSION_ID` marker on orphans re-parented to the subreaper server)
and stops the escaped ones with the group. Linux only.
Rules as in tests/conftest.py; each test kills its daemon itself if ccx failed to.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from conftest import RawClient, py
from relhelp import start_time

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def daemonizer(*, after: str, keep_stdout: bool = False, clear_env: bool = False) -> list[str]:
    """A child that starts a classic daemon (fork, setsid, fork, first child exits), prints
    the daemon's pid, then runs *after* (Python code)."""
    detach = "" if keep_stdout else (
        "        fd = os.open('/dev/null', os.O_RDWR)\n"
        "        for n in (0, 1, 2): os.dup2(fd, n)\n")
    run = ("        os.execve('/bin/sleep', ['sleep', '300'], {})\n" if clear_env
           else "        time.sleep(300); os._exit(0)\n")
    return py(
        "import os, time\n"
        "r, w = os.pipe()\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"{detach}"
        "        os.write(w, str(os.getpid()).encode()); os.close(w)\n"
        f"{run}"
        "    os._exit(0)\n"
        "os.close(w)\n"
        "pid = os.read(r, 32).decode(); os.wait()\n"
        "print('daemon', pid, flush=True)\n"
        f"{after}\n"
    )


def setsid_child_without_env() -> list[str]:
    """A leader whose child leaves the group (setsid) and drops every environment variable;
    the leader stays alive as its parent."""
    return py(
        "import os, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.setsid(); os.execve('/bin/sleep', ['sleep', '300'], {})\n"
        "time.sleep(0.2)\n"
        "print('daemon', pid, flush=True)\n"
        "time.sleep(300)\n"
    )


@pytest.fixture
def daemons() -> Iterator[list[tuple[int, int | None]]]:
    """(pid, start time) of daemons a test saw; killed at teardown if ccx left them."""
    seen: list[tuple[int, int | None]] = []
    yield seen
    for pid, start in seen:
        if start is not None and start_time(pid) == start:
            os.kill(pid, signal.SIGKILL)


async def daemon_pid(client: RawClient, sid: str,
                     daemons: list[tuple[int, int | None]]) -> tuple[int, int]:
    with trio.fail_after(10):
        text = ""
        while not text.endswith("\n"):
            text += (await client.notification("process.output", sid))["data"]
    assert len(text.split()) >= 2, text
    pid = int(text.split()[1])
    start = start_time(pid)
    daemons.append((pid, start))
    assert start is not None, "daemon not running"
    assert os.getpgid(pid) != os.getpgid(os.getpid())
    return pid, start


def still_running(pid: int, start: int) -> bool:
    if start_time(pid) != start:
        return False
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    return raw[raw.rfind(b")") + 2 :].split()[0] != b"Z"


async def test_daemon_killed_when_session_is_cancelled(client: RawClient, daemons: Any) -> None:
    started = await client.execute(daemonizer(after="time.sleep(300)"))
    sid = started["session_id"]
    pid, start = await daemon_pid(client, sid, daemons)
    assert os.getpgid(pid) != started["pgid"]  # it really escaped the group
    await client.result("control", session_id=sid, type="CANCEL")
    with trio.fail_after(15):
        _, completed = await client.run_to_completion(sid)
    assert completed["status"] == "cancelled"
    assert not still_running(pid, start), "daemon outlived its cancelled session"


async def test_daemon_killed_when_leader_exits_by_itself(client: RawClient,
                                                         daemons: Any) -> None:
    """The leader exits 0 (once the test has seen the daemon: ccx may kill it at once); its
    daemon keeps stdout open. The session still ends (the group is empty), and the daemon
    goes with it."""
    started = await client.execute(daemonizer(after="import sys; sys.stdin.readline()",
                                              keep_stdout=True), stdin=True)
    sid = started["session_id"]
    pid, start = await daemon_pid(client, sid, daemons)
    await client.result("input", session_id=sid, data="exit\n")
    with trio.fail_after(15):
        _, completed = await client.run_to_completion(sid)
    assert completed["status"] == "exited" and completed["exit_code"] == 0, completed
    assert not still_running(pid, start), "daemon outlived its session"


async def test_setsid_child_without_environment_is_found_through_its_parent(
        client: RawClient, daemons: Any) -> None:
    started = await client.execute(setsid_child_without_env())
    sid = started["session_id"]
    pid, start = await daemon_pid(client, sid, daemons)
    await client.result("control", session_id=sid, type="CANCEL")
    with trio.fail_after(15):
        _, completed = await client.run_to_completion(sid)
    assert completed["status"] == "cancelled"
    assert not still_running(pid, start), "setsid child outlived its session"


async def test_daemons_killed_at_server_shutdown(start_server: Any, connect: Any,
                                                 daemons: Any) -> None:
    server = await start_server(kill_grace=0.5)
    client = await connect(server)
    started = await client.execute(daemonizer(after="time.sleep(300)"))
    pid, start = await daemon_pid(client, started["session_id"], daemons)
    server.stop()
    with trio.fail_after(15):
        while server.manager.live():
            await trio.sleep(0.02)
    assert not still_running(pid, start), "daemon outlived the server's shutdown"


async def test_session_gets_its_marker(client: RawClient) -> None:
    stdout, _, _ = await client.run(py("import os; print(os.environ['CCX_SESSION_ID'])"))
    sessions = (await client.result("sessions"))["sessions"]
    assert stdout.decode().strip() == sessions[0]["session_id"]


async def test_daemon_escaping_a_pty_session_is_killed(client: RawClient, daemons: Any) -> None:
    """On a terminal the whole session is the group; a daemon leaves even that."""
    started = await client.execute(daemonizer(after="time.sleep(300)"),
                                   pty={"cols": 80, "rows": 24})
    sid = started["session_id"]
    pid, start = await daemon_pid(client, sid, daemons)
    assert os.getsid(pid) != started["pgid"]
    await client.result("control", session_id=sid, type="CANCEL")
    with trio.fail_after(15):
        _, completed = await client.run_to_completion(sid)
    assert completed["status"] == "cancelled"
    assert not still_running(pid, start), "daemon outlived its cancelled PTY session"
