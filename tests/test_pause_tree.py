"""PAUSE, RESUME and CANCEL reach the session's whole *tree* (PROTOCOL.md section 2): its
process group plus every descendant that left it (setsid), as Claude Code's Bash tool does.

Rules as in tests/conftest.py. The tree is observed from outside, independently of ccx's
tracker: every process on the host whose initial environment carries the session's
`CCX_SESSION_ID` (the children here never clear it). /proc is read *after* the `paused`
answer: that answer promises every process of the tree is stopped, so reading then does not
race ccx. The one bounded wait (`QUIET_WINDOW_S`) checks that nothing happens; no assert
depends on how fast the machine is.
Linux only (/proc, setsid).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import RawClient, completion, py, start_ready, wait_for

from ccx.descendants import Tracker
from ccx.process import become_subreaper
from ccx.procfs import snapshot

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")

QUIET_WINDOW_S = 1.0  # after the paused answer: a running loop would tick 5 times in it
STOPPED = ("T", "t")
NOT_RUNNING = ("T", "t", "Z", "X")  # a zombie whose stopped parent has not reaped it is fine
PTY = {"cols": 80, "rows": 24}


def tick_loop(log: Path) -> list[str]:
    """A leader whose shell loop runs in a session of its own (util-linux `setsid -w` forks,
    since ccx's child already leads its group): one tick to stdout and one line to *log*
    every 0.2 s, each through a `sleep` child."""
    return ["setsid", "-w", "sh", "-c",
            f"while :; do echo tick; echo tick >> '{log}'; sleep 0.2; done"]


def stat_of(pid: int) -> tuple[str, int, int] | None:
    """(state, session id, start time) of *pid*, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[3]), int(fields[19])


def marked(pid: int, session_id: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"CCX_SESSION_ID={session_id}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def tree(session_id: str) -> dict[int, tuple[str, int, int]]:
    """{pid: (state, sid, start)} of every process carrying the session's marker."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and marked(int(entry), session_id):
            stat = stat_of(int(entry))
            if stat is not None:
                found[int(entry)] = stat
    return found


def running(procs: dict[int, tuple[str, int, int]]) -> dict[int, str]:
    return {pid: s[0] for pid, s in procs.items() if s[0] not in NOT_RUNNING}


def survivors(procs: dict[int, tuple[str, int, int]]) -> list[int]:
    """Those of *procs* still alive (same pid and start time, not a zombie)."""
    left = []
    for pid, (_, _, start) in procs.items():
        now = stat_of(pid)
        if now is not None and now[2] == start and now[0] not in ("Z", "X"):
            left.append(pid)
    return left


def lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


async def events_until(client: RawClient, session_id: str, method: str,
                       timeout: float = 10) -> list[tuple[str, dict[str, Any]]]:
    """The session's notifications in arrival order, up to and including the next *method*."""
    events: list[tuple[str, dict[str, Any]]] = []
    with trio.fail_after(timeout):
        while not events or events[-1][0] != method:
            message = await next_notification(client, session_id)
            events.append((message["method"], message["params"]))
    return events


async def next_notification(client: RawClient, session_id: str) -> dict[str, Any]:
    """The session's next notification, buffered ones first; other messages stay buffered."""
    for i, message in enumerate(client.notifications):
        if message.get("params", {}).get("session_id") == session_id:
            return client.notifications.pop(i)
    while True:
        message = await client.receive()
        if isinstance(message, dict) and "method" in message:
            if message.get("params", {}).get("session_id") == session_id:
                return message
            client.notifications.append(message)
        elif isinstance(message, dict):
            client._responses[message.get("id")] = message


def ticks(events: list[tuple[str, dict[str, Any]]]) -> int:
    return sum(p["data"].count("tick") for m, p in events if m == "process.output")


async def pause_resume_cancel(client: RawClient, tmp_path: Path, **params: Any) -> None:
    log = tmp_path / "ticks.log"
    started = await start_ready(client, tick_loop(log), **params)
    sid = started["session_id"]
    await wait_for(lambda: lines(log) >= 1)  # the loop wrote to the log too
    before = tree(sid)
    shells = [pid for pid, s in before.items() if s[1] != started["pgid"]]
    assert shells, f"nothing left the session: {before}"

    assert await client.result("control", session_id=sid, type="PAUSE") == \
        {"session_id": sid, "status": "paused"}
    paused = tree(sid)
    assert set(shells) <= set(paused), (shells, paused)
    assert not running(paused), f"running after the paused answer: {paused}"
    written = lines(log)
    await trio.sleep(QUIET_WINDOW_S)  # nothing may run now; a window, not a race
    assert lines(log) == written, "the setsid'd loop kept running while paused"
    assert not running(tree(sid)), tree(sid)

    assert await client.result("control", session_id=sid, type="RESUME") == \
        {"session_id": sid, "status": "running"}
    until_resumed = await events_until(client, sid, "process.resumed")
    # Output read before RESUME was written before the pause: its stdout echo precedes the
    # log line, so at most one tick more than the log had.
    assert ticks(until_resumed) <= written + 1, (ticks(until_resumed), written)
    after: list[tuple[str, dict[str, Any]]] = []
    while ticks(after) < 2:  # ticks again, from the resumed loop
        after += await events_until(client, sid, "process.output")
    await wait_for(lambda: lines(log) > written)

    await client.result("control", session_id=sid, type="CANCEL")
    assert (await completion(client, sid))["status"] == "cancelled"
    everyone = {**before, **paused, **tree(sid)}
    assert not survivors(everyone), f"left after process.completed: {survivors(everyone)}"


async def test_pause_reaches_a_setsid_loop_on_pipes(client: RawClient, tmp_path: Path) -> None:
    await pause_resume_cancel(client, tmp_path)


async def test_pause_reaches_a_setsid_loop_on_a_pty(client: RawClient, tmp_path: Path) -> None:
    await pause_resume_cancel(client, tmp_path, pty=PTY)


FORKER = py(
    "import os, time\n"
    "def child():\n"
    "    os.setsid()\n"  # leaves the group, as each Bash tool command does
    "    end = time.monotonic() + 0.5\n"
    "    kids = 0\n"
    "    while time.monotonic() < end:\n"
    "        if os.fork() == 0:\n"
    "            time.sleep(0.1); os._exit(0)\n"
    "        kids += 1\n"
    "        time.sleep(0.02)\n"
    "        while kids and os.waitpid(-1, os.WNOHANG)[0]: kids -= 1\n"
    "    while kids: os.wait(); kids -= 1\n"
    "    os._exit(0)\n"
    "print('forking', flush=True)\n"
    "kids = 0\n"
    "while True:\n"
    "    if os.fork() == 0:\n"
    "        child()\n"
    "    kids += 1\n"
    "    time.sleep(0.02)\n"
    "    while kids and os.waitpid(-1, os.WNOHANG)[0]: kids -= 1\n"
)


async def start_forker(client: RawClient, **params: Any) -> tuple[str, int]:
    """Start FORKER; (session id, pgid) once one of its children has left the session."""
    started = await start_ready(client, FORKER, **params)
    sid, pgid = started["session_id"], started["pgid"]
    await wait_for(functools.partial(has_escapee, sid, pgid))
    return sid, pgid


def has_escapee(session_id: str, pgid: int) -> bool:
    return any(s[1] != pgid for s in tree(session_id).values())


@pytest.mark.parametrize("params", [{}, {"pty": PTY}], ids=["pipes", "pty"])
async def test_pause_of_a_forking_loop_leaves_nothing_running(
        client: RawClient, params: dict[str, Any]) -> None:
    """New setsid'd children (which fork in turn) appear all the time; after the paused
    answer none of them runs, whenever it was born."""
    sid, pgid = await start_forker(client, **params)
    for _ in range(3):  # three rounds: each pause lands at another moment of the loop
        assert (await client.result("control", session_id=sid, type="PAUSE"))["status"] == \
            "paused"
        paused = tree(sid)
        assert any(s[1] != pgid for s in paused.values()), paused
        assert not running(paused), f"running after the paused answer: {running(paused)}"
        assert (await client.result("control", session_id=sid, type="RESUME"))["status"] == \
            "running"
    await client.result("control", session_id=sid, type="PAUSE")
    last = tree(sid)
    await client.result("control", session_id=sid, type="CANCEL")
    assert (await completion(client, sid))["status"] == "cancelled"
    assert not survivors(last), survivors(last)
    assert not survivors(tree(sid)), tree(sid)


ESCAPEE = py(
    "import os, signal, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    def bye(*_):\n"
    "        os.write(1, b'escapee got TERM\\n'); os._exit(0)\n"
    "    signal.signal(signal.SIGTERM, bye)\n"
    "    signal.signal(signal.SIGCONT, lambda *_: os.write(1, b'escapee continued\\n'))\n"
    "    os.write(1, f'escapee {os.getpid()}\\n'.encode())\n"
    "    while True: time.sleep(0.05)\n"
    "time.sleep(300)\n"
)


async def escapee_pid(client: RawClient, sid: str) -> int:
    text = ""
    with trio.fail_after(10):
        while "\n" not in text:
            text += (await client.notification("process.output", sid))["data"]
    return int(text.split()[1])


async def test_cancel_wakes_and_ends_a_paused_escapee(client: RawClient) -> None:
    started = await client.execute(ESCAPEE)
    sid = started["session_id"]
    pid = await escapee_pid(client, sid)
    await client.result("control", session_id=sid, type="PAUSE")
    state = stat_of(pid)
    assert state is not None and state[0] in STOPPED, state  # a paused escapee
    await client.result("control", session_id=sid, type="CANCEL")
    events: list[tuple[str, dict[str, Any]]] = []
    while not events or events[-1][0] != "process.completed":
        events += await events_until(client, sid, "process.completed", timeout=15)
    text = "".join(p["data"] for m, p in events if m == "process.output")
    assert "escapee got TERM" in text, text  # woken, and it handled the TERM itself
    assert events[-1][1]["status"] == "cancelled"
    assert survivors({pid: state}) == []


async def test_an_escapee_woken_while_paused_is_stopped_again(client: RawClient) -> None:
    """Something outside ccx continues a paused escapee: the periodic tracker stops it
    again (every CCX_TRACK_INTERVAL, 0.5 s here), so the session stays paused."""
    started = await client.execute(ESCAPEE)
    sid = started["session_id"]
    pid = await escapee_pid(client, sid)
    await client.result("control", session_id=sid, type="PAUSE")
    assert (stat_of(pid) or ("?",))[0] in STOPPED
    os.kill(pid, signal.SIGCONT)
    text = ""
    with trio.fail_after(10):
        while "continued" not in text:  # it ran (its handler wrote this)
            text += (await client.notification("process.output", sid))["data"]
    await wait_for(lambda: (stat_of(pid) or ("?",))[0] in STOPPED, timeout=10)
    assert (await client.result("status", session_id=sid))["status"] == "paused"
    await client.result("control", session_id=sid, type="CANCEL")
    assert (await completion(client, sid))["status"] == "cancelled"
    assert stat_of(pid) is None or stat_of(pid)[0] == "Z"  # type: ignore[index]


def test_tracker_keeps_a_known_escapee_when_given_an_older_snapshot() -> None:
    """Two scans may finish out of order (worker threads on a big host): a snapshot taken
    before an escapee was born must not make the tracker forget it, or RESUME, which
    continues the escapees the tracker knows, would leave it stopped."""
    assert become_subreaper()  # as a server is: the orphaned escapee is ours to reap
    older = snapshot()
    leader = subprocess.Popen(py("import os, time\nif os.fork() == 0:\n    os.setsid()\n"
                                 "print('ready', flush=True)\ntime.sleep(60)"),
                              stdout=subprocess.PIPE, start_new_session=True)
    tracker = Tracker("t", leader.pid)
    try:
        assert leader.stdout is not None
        leader.stdout.readline()
        leader.stdout.readline()  # both printed: the child has left the group
        tracker.update(snapshot())
        escaped = tracker.escapees()
        assert len(escaped) == 1, tracker.known
        tracker.update(older)  # has neither process: the leader is not in it either
        # the same process (pid and start time); its run state may change between reads
        assert [(p.pid, p.start) for p in tracker.escapees()] == \
            [(p.pid, p.start) for p in escaped], tracker.known
    finally:
        tracker.update(snapshot())
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
        for proc in tracker.escapees():  # orphaned now: re-parented to us, the subreaper
            os.kill(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
        leader.stdout.close()  # type: ignore[union-attr]


async def control_together(client: RawClient, sid: str, *kinds: str) -> list[dict[str, Any]]:
    """Send control requests back to back, then read their responses (each frame runs in a
    task of its own on the server, so they overlap)."""
    ids = []
    for kind in kinds:
        client._next_id += 1
        ids.append(client._next_id)
        await client.send({"jsonrpc": "2.0", "id": client._next_id, "method": "control",
                           "params": {"session_id": sid, "type": kind}})
    return [await client.response(i) for i in ids]


async def test_pause_and_resume_sent_together_leave_the_tree_as_the_status_says(
        client: RawClient) -> None:
    """A RESUME that overlaps a PAUSE in progress: once both are answered, no signal of that
    PAUSE is still to come, so the tree is wholly running or wholly stopped, as `status`
    says, whichever request the server handled last."""
    sid, _pgid = await start_forker(client)
    for _ in range(10):
        replies = await control_together(client, sid, "PAUSE", "RESUME")
        assert all("result" in reply for reply in replies), replies
        status = (await client.result("status", session_id=sid))["status"]
        procs = tree(sid)
        if status == "running":
            stopped = {pid: s for pid, s in procs.items() if s[0] in STOPPED}
            assert not stopped, f"stopped in a running session: {stopped}"
        else:
            assert status == "paused" and not running(procs), (status, running(procs))
            await client.result("control", session_id=sid, type="RESUME")
    await client.result("control", session_id=sid, type="CANCEL")
    assert (await completion(client, sid))["status"] == "cancelled"
    assert not survivors(tree(sid)), tree(sid)


async def test_cancel_of_a_running_forking_loop_leaves_nothing(client: RawClient) -> None:
    """Not paused this time: setsid'd children keep forking while CANCEL's kill path runs.
    Whatever they forked after its last look is found by the next (re-scan until none).
    The race is narrow: each round shows it rarely, so there are ten."""
    for _ in range(10):
        sid, _pgid = await start_forker(client)
        await client.result("control", session_id=sid, type="CANCEL")
        assert (await completion(client, sid))["status"] == "cancelled"
        assert not survivors(tree(sid)), f"left after process.completed: {tree(sid)}"
