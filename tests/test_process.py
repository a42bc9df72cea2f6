"""ccx.process: the group waits look at known pids first, yet a member they have not seen yet
(forked after the last full scan) still keeps the group from being "empty" or "stopped"."""

from __future__ import annotations

import os
import signal

import pytest
import trio
from conftest import PY

from ccx.process import (
    Group,
    group_members,
    live_members,
    spawn,
    stop_group,
    wait_group_empty,
    wait_group_stopped,
)

# The leader forks a TERM-proof child after a while, then exits: the child is never among
# the pids a scan before the fork saw.
LATE_CHILD = (
    "import os, signal, sys, time\n"
    "time.sleep(0.3)\n"
    "if os.fork() == 0:\n"
    "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "    os.close(1); os.close(2)\n"
    "    time.sleep(30)\n"
    "    os._exit(0)\n"
    "time.sleep(float(sys.argv[1]))\n"
)


@pytest.fixture(params=["inline", "thread"], autouse=True)
def scan_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full scans run inline on a small host and in a worker thread on a big one: both."""
    if request.param == "thread":
        monkeypatch.setattr("ccx.procfs.SCAN_INLINE_MAX", -1)


async def start(leader_s: float) -> Group:
    group = await spawn([PY, "-c", LATE_CHILD, str(leader_s)], executable=PY, cwd=None,
                        env=os.environ, stdin=False)
    assert [m.pid for m in live_members(group)] == [group.pid]  # known: the leader only
    await trio.sleep(0.6)  # the child exists now, unseen
    return group


async def close(group: Group) -> None:
    assert await stop_group(group, grace=0.2) is not None
    # zombies may stay: this test process is not a subreaper, and PID 1 may not reap them
    assert not live_members(group) and all(m.state == "Z" for m in group_members(group.pgid))
    for stream in (group.process.stdout, group.process.stderr):
        assert stream is not None
        await stream.aclose()


async def test_unseen_member_keeps_the_group_from_being_empty() -> None:
    group = await start(leader_s=0)
    await group.process.wait()
    with trio.move_on_after(1.0) as waited:
        await wait_group_empty(group)
    assert waited.cancelled_caught, "the group was called empty with a live member in it"
    await close(group)


async def test_unseen_running_member_keeps_pause_from_being_seen() -> None:
    group = await start(leader_s=30)
    os.kill(group.pid, signal.SIGSTOP)  # the leader alone: its child keeps running
    assert not await wait_group_stopped(group, timeout=0.5)
    os.killpg(group.pgid, signal.SIGSTOP)
    assert await wait_group_stopped(group, timeout=2.0)
    await close(group)
