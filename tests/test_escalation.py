"""The kill escalation as a table: which `StopStep` each kind of process tree reaches.

Rules: real children (`sys.executable -c`), no mock clock (real processes need real time;
graces are tiny instead), a deadline on every test, and every test checks that nothing it
started is still alive (zombies count as gone: this process need not be a subreaper).
One escalation serves both callers: `stop_group` (a session's group and its escapees) and
`stop_procs` (what a dead server left running, `ccx.crash_record.recover`).
"""

from __future__ import annotations

import json
import os
import types

import pytest
import trio
from conftest import PY

import ccx.process
from ccx.crash_record import StateFile
from ccx.descendants import still_alive
from ccx.manager import SessionManager
from ccx.process import Group, StopStep, live_members, spawn, stop_group, stop_procs
from ccx.procfs import Proc, read_proc

GRACE_S = 0.3  # long enough for a TERM-obeying python to die, short enough to keep tests fast
DEADLINE_S = 15

# argv[1]: the leader (obeys TERM, ignores it, exits at once, or obeys it while a grandchild
# in its group traps it); argv[2]: an escapee (a setsid child) that obeys or traps TERM, or
# none. Each process prints "ready <role> <pid>" once its TERM disposition is set.
TREE = r"""
import os, signal, sys, time
leader, escapee = sys.argv[1], sys.argv[2]

def ready(role):  # one write(2): lines from several processes never interleave
    os.write(1, f"ready {role} {os.getpid()}\n".encode())

def child(role, trap, new_session):
    if os.fork() == 0:
        if new_session:
            os.setsid()
        if trap:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ready(role)
        time.sleep(60)
        os._exit(0)

if escapee != "none":
    child("escapee", escapee == "traps", True)
if leader == "grandchild_traps":
    child("grandchild", True, False)
if leader == "ignores":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
ready("leader")
if leader != "exits":
    time.sleep(60)
"""


async def start(leader: str, escapee: str) -> tuple[Group, list[Proc]]:
    """Spawn the tree; return once every process of it is ready, with the escapees."""
    group = await spawn([PY, "-c", TREE, leader, escapee], executable=PY, cwd=None,
                        env=os.environ, stdin=False)
    expected = 1 + (escapee != "none") + (leader == "grandchild_traps")
    assert group.process.stdout is not None
    text = b""
    while text.count(b"\n") < expected:
        chunk = await group.process.stdout.receive_some(1024)
        assert chunk, text
        text += chunk
    escapees = []
    assert len(text.splitlines()) == expected, text
    for line in text.decode().splitlines():
        _, role, pid = line.split()
        if role == "escapee":
            proc = read_proc(int(pid))
            assert proc is not None
            escapees.append(proc)
    if leader == "exits":
        await group.process.wait()
    return group, escapees


async def close(group: Group, escapees: list[Proc]) -> None:
    assert not live_members(group), "members left"
    assert not still_alive(escapees), "escapees left"
    for stream in (group.process.stdout, group.process.stderr):
        assert stream is not None
        await stream.aclose()


@pytest.mark.parametrize(("leader", "escapee", "expected"), [
    ("obeys", "none", StopStep.TERMINATED),
    ("ignores", "none", StopStep.KILLED),
    ("grandchild_traps", "none", StopStep.KILLED),  # the leader goes on TERM; its child not
    ("exits", "none", StopStep.ALREADY_EMPTY),
    ("obeys", "obeys", StopStep.TERMINATED),
    ("obeys", "traps", StopStep.KILLED),  # only the escapee needed SIGKILL
    ("exits", "traps", StopStep.KILLED),  # the group is empty, its escapee is not
])
async def test_stop_group_reaches(leader: str, escapee: str, expected: StopStep) -> None:
    with trio.fail_after(DEADLINE_S):
        group, escapees = await start(leader, escapee)
        assert await stop_group(group, grace=GRACE_S, escapees=escapees) is expected
        await close(group, escapees)


@pytest.mark.parametrize(("leader", "expected"), [
    ("obeys", StopStep.TERMINATED),
    ("ignores", StopStep.KILLED),
    ("exits", StopStep.ALREADY_EMPTY),
])
async def test_stop_procs_reaches(leader: str, expected: StopStep) -> None:
    """Crash recovery's callers hand over recorded processes, not a group: same table."""
    with trio.fail_after(DEADLINE_S):
        group, _ = await start(leader, "none")
        recorded = [read_proc(group.pid)] if leader != "exits" else []
        procs = [p for p in recorded if p is not None]
        assert await stop_procs(procs, grace=GRACE_S) is expected
        await group.process.wait()  # ours to reap (trio's child)
        await close(group, [])


async def test_a_group_sigkill_does_not_empty_is_outlived(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A D-state member cannot be made on demand: a zero wait after SIGKILL stands in for
    one, so the group is still there when the escalation gives up."""
    monkeypatch.setattr(ccx.process, "AFTER_KILL_TIMEOUT_S", 0.0)
    with trio.fail_after(DEADLINE_S):
        group, _ = await start("ignores", "none")
        assert await stop_group(group, grace=GRACE_S) is StopStep.OUTLIVED
        await group.process.wait()  # SIGKILL did its work after all
        await close(group, [])


def test_an_outlived_group_stays_in_the_crash_record(tmp_path: os.PathLike[str]) -> None:
    """The manager records every running session and every one whose kill path ended
    `OUTLIVED`; ended sessions otherwise leave the record."""
    from ccx.config import Settings

    manager = SessionManager(Settings(state_dir=str(tmp_path)))
    manager.state = StateFile.open(str(tmp_path), node=None, incarnation=manager.incarnation)

    def fake(session_id: str, pgid: int, running: bool, step: StopStep | None) -> object:
        return types.SimpleNamespace(
            id=session_id, group=types.SimpleNamespace(pgid=pgid, start=1),
            tracker=types.SimpleNamespace(escapees=list), running=running, stop_step=step)

    manager._sessions.update({
        "a": fake("a", 101, True, None), "b": fake("b", 102, False, StopStep.OUTLIVED),
        "c": fake("c", 103, False, StopStep.KILLED)})  # type: ignore[dict-item]
    manager._record()
    with open(manager.state.path) as f:
        recorded = {g["session_id"] for g in json.load(f)["groups"]}
    assert recorded == {"a", "b"}
    manager.state.remove()
