"""Reliability: a server killed with SIGKILL leaves a crash record; the next start stops
every process it recorded that still runs, and nothing else.

Rules as in tests/conftest.py. Real `ccx serve` processes (port 0, port read from the
"listening" log line), a private CCX_STATE_DIR per test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import group_pids, py, wait_for
from relhelp import RawWs, Serve, start_time

from ccx.crash_record import GroupRecord, recover


def running(pid: int, start: int | None) -> bool:
    if start is None or start_time(pid) != start:
        return False
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    return raw[raw.rfind(b")") + 2 :].split()[0] != b"Z"


def reap_if_ours(pids: list[int]) -> None:
    """The test process may be a subreaper (in-process servers made it one): reap orphans."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


DAEMON_AND_TERM_IGNORER = py(
    "import os, signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "r, w = os.pipe()\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        fd = os.open('/dev/null', os.O_RDWR)\n"
    "        for n in (0, 1, 2): os.dup2(fd, n)\n"
    "        os.write(w, str(os.getpid()).encode()); os.close(w); time.sleep(300)\n"
    "    os._exit(0)\n"
    "os.close(w); daemon = os.read(r, 32).decode(); os.wait()\n"
    "child = os.fork()\n"
    "if child == 0: time.sleep(300); os._exit(0)\n"
    "time.sleep(0.5)\n"  # the server's tracker (0.1 s) sees the daemon before we report it
    "print('pids', daemon, child, flush=True)\n"
    "time.sleep(300)\n"
)


async def test_sigkilled_server_orphans_are_stopped_on_next_start(tmp_path: Path) -> None:
    first = Serve(tmp_path)
    doomed: list[tuple[int, int | None]] = []
    try:
        raw = await RawWs.connect(first.port)
        leaders = []
        for _ in range(2):
            reply = await raw.request("execute", {"command": DAEMON_AND_TERM_IGNORER})
            leaders.append(reply["result"]["pgid"])
        text = ""
        with trio.fail_after(15):
            while text.count("\n") < 2:
                message = json.loads(await raw.receive())
                if message.get("method") == "process.output":
                    text += message["params"]["data"]
        for line in text.splitlines():
            doomed += [(int(p), start_time(int(p))) for p in line.split()[1:]]
        doomed += [(pgid, start_time(pgid)) for pgid in leaders]
        await trio.sleep(0.3)  # a tracker pass writes the daemons into the record
        records = list(tmp_path.glob("server-*.json"))
        assert len(records) == 1, records

        first.proc.kill()  # SIGKILL: no cleanup at all
        first.proc.wait(timeout=10)
        await raw.aclose()
        assert all(running(pid, start) for pid, start in doomed), "the crash left nothing?"

        second = Serve(tmp_path)
        try:
            stopped = [e for e in second.events if e.get("event") == "orphan_group_stopped"]
            assert sorted(e["pgid"] for e in stopped) == sorted(leaders), second.events
            assert all(e["step"] == "killed" for e in stopped)  # they ignored SIGTERM
            reap_if_ours([pid for pid, _ in doomed])
            for pid, start in doomed:
                assert not running(pid, start), f"{pid} survived the recovery"
            for pgid in leaders:
                assert group_pids(pgid) == {}
            # the dead server's record is gone; the new server keeps its own
            assert [p.name for p in tmp_path.glob("server-*.json")] != [records[0].name]
        finally:
            second.stop()
        assert list(tmp_path.glob("server-*.json")) == [], "a clean stop removes the record"
    finally:
        for pid, start in doomed:
            if running(pid, start):
                os.kill(pid, signal.SIGKILL)
        first.stop()


async def test_recovery_never_touches_a_reused_pid_or_a_live_server(tmp_path: Path) -> None:
    """A record naming a live process with another start time (its pid was reused) is not
    acted on; nor is the record of a server that is still running."""
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        start = start_time(bystander.pid)
        assert start is not None
        wrong = GroupRecord("s1", bystander.pid,
                            start - 1, ((bystander.pid, start - 1),))
        dead_server = {"pid": 2**22 - 1, "start": 1}  # no such process
        live_server = {"pid": os.getpid(), "start": start_time(os.getpid())}
        right = GroupRecord("s2", bystander.pid, start)
        for name, server, record in (("server-1-1.json", dead_server, wrong),
                                     ("server-2-1.json", live_server, right)):
            (tmp_path / name).write_text(json.dumps(
                {"version": 1, "server": server, "groups": [record.to_json()]}))
        assert await recover(str(tmp_path), grace=0.5) == 0
        assert bystander.poll() is None, "recovery killed a process it did not start"
        assert [p.name for p in tmp_path.glob("*.json")] == ["server-2-1.json"]
    finally:
        bystander.kill()
        bystander.wait()


async def test_untrusted_state_dir_is_not_used(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # writable by anyone: a record there could name any process
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        record = GroupRecord("s", victim.pid, start_time(victim.pid) or 0)
        (shared / "server-1-1.json").write_text(json.dumps(
            {"version": 1, "server": {"pid": 2**22 - 1, "start": 1},
             "groups": [record.to_json()]}))
        assert await recover(str(shared), grace=0.5) == 0
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("value", [""])
async def test_state_dir_can_be_turned_off(start_server: Any, value: str) -> None:
    server = await start_server(state_dir=value)
    assert not server.manager.state.enabled


async def test_in_process_server_records_and_forgets(start_server: Any, connect: Any,
                                                    tmp_path: Path) -> None:
    server = await start_server(state_dir=str(tmp_path))
    client = await connect(server)
    started = await client.execute(py("import time; time.sleep(30)"))
    body = json.loads(Path(server.manager.state.path).read_text())
    assert [g["pgid"] for g in body["groups"]] == [started["pgid"]]
    assert body["server"]["pid"] == os.getpid()
    await client.result("control", session_id=started["session_id"], type="CANCEL")
    await client.notification("process.completed", started["session_id"])
    await wait_for(lambda: json.loads(Path(server.manager.state.path).read_text())["groups"]
                   == [])


def test_ccx_mcp_over_stdio_recovers_too(tmp_path: Path) -> None:
    """`ccx mcp` (started by an MCP client, perhaps after a SIGKILLed one) runs the same
    recovery before it serves."""
    from relhelp import CCX

    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        record = GroupRecord("s", victim.pid, start_time(victim.pid) or 0)
        (tmp_path / "server-1-1.json").write_text(json.dumps(
            {"version": 1, "server": {"pid": 2**22 - 1, "start": 1},
             "groups": [record.to_json()]}))
        mcp = subprocess.Popen([CCX, "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE,
                               env={**os.environ, "CCX_STATE_DIR": str(tmp_path),
                                    "CCX_LOG_FORMAT": "json", "CCX_KILL_GRACE": "0.5"})
        assert mcp.stderr is not None
        events = []
        for line in mcp.stderr:
            events.append(json.loads(line))
            if events[-1].get("event") == "mcp_stdio_ready":
                break
        assert victim.wait(timeout=5) is not None, "the recorded group was not stopped"
        assert any(e.get("event") == "orphan_group_stopped" and e["pgid"] == victim.pid
                   for e in events), events
        mcp.communicate(b"", timeout=15)  # EOF on stdin ends it
        assert list(tmp_path.glob("server-1-1.json")) == []
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
