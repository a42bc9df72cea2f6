"""Reliability: silence, huge lines, bursts of children, clients that vanish with a reset.

Rules (as in tests/conftest.py): 127.0.0.1, port 0, real children, real signals, a deadline
on every test (pytest-timeout), every server fixture asserts that no group it started is left
alive. The long variants (a child silent for 120 s) run with --soak or CCX_SOAK=1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
from typing import Any

import pytest
import trio
import trio_websocket
from conftest import RawClient, group_pids, py, wait_for
from relhelp import RawWs

# 10 bytes, characters of 1, 2, 3 and 4 bytes: every 64 KiB chunk boundary splits some of them.
PATTERN = "aé€😀".encode()
LINE_BYTES = 50 * 1024 * 1024
LINE_CHILD = py(
    "import sys\n"
    f"block = {PATTERN!r} * 104857\n"  # 1 MiB minus 6 bytes, so blocks straddle chunks too
    f"total, out = {LINE_BYTES}, sys.stdout.buffer\n"
    "while total > 0:\n"
    "    piece = block[:total]; out.write(piece); total -= len(piece)\n"
    "out.flush()\n"
)


def expected_line_sha256() -> str:
    block = PATTERN * 104857
    digest, total = hashlib.sha256(), LINE_BYTES
    while total > 0:
        piece = block[:total]
        digest.update(piece)
        total -= len(piece)
    return digest.hexdigest()


async def _stream_hash(client: RawClient, session_id: str) -> tuple[str, int, dict[str, Any]]:
    """sha256 of the session's stdout as received, the number of chunks, and completion."""
    digest, chunks, seq = hashlib.sha256(), 0, 0
    while True:
        message = await client.receive()
        if message.get("params", {}).get("session_id") != session_id:
            continue
        params = message["params"]
        if message["method"] == "process.output":
            assert params["seq"] == seq, (params["seq"], seq)
            seq += 1
            if params.get("encoding") == "base64":
                raw = base64.b64decode(params["data"])
                assert len(raw) <= 64 * 1024
            else:
                raw = params["data"].encode("utf-8")
            digest.update(raw)
            chunks += 1
        elif message["method"] == "process.completed":
            return digest.hexdigest(), chunks, params


@pytest.mark.parametrize("encoding", ["utf-8", "base64"])
async def test_single_50_mib_line_arrives_complete(client: RawClient, encoding: str) -> None:
    """A 50 MiB line with no newline is chunked, never dropped, never stalls; in utf-8 mode
    no character split across chunks is damaged (the sha256 covers every byte)."""
    started = await client.execute(LINE_CHILD, encoding=encoding)
    with trio.fail_after(90):
        sha, chunks, completed = await _stream_hash(client, started["session_id"])
    assert completed["status"] == "exited" and completed["exit_code"] == 0, completed
    assert completed["stdout_bytes"] == LINE_BYTES
    assert chunks >= LINE_BYTES // (64 * 1024)
    assert sha == expected_line_sha256()


async def _silent_child_survives(start_server: Any, silent_s: float) -> None:
    # Every timer short (server pings, TCP keepalive and user timeout, descendant scans): if
    # any idle timer existed (on pings, pongs, output or requests), it would fire many times
    # over during the silence. The client sends nothing but pongs. (RawWs, because
    # trio-websocket's client can crash answering a ping while it closes.)
    server = await start_server(ws_ping_interval=0.1, tcp_keepalive=1, tcp_user_timeout=1,
                                track_interval=0.05)
    raw = await RawWs.connect(server.port)
    code = (f"import sys, time; print('before', flush=True); time.sleep({silent_s}); "
            "print('after', flush=True); print('err', file=sys.stderr)")
    reply = await raw.request("execute", {"command": py(code)})
    sid = reply["result"]["session_id"]
    text = {"stdout": "", "stderr": ""}
    with trio.fail_after(silent_s + 30):
        while True:
            message = json.loads(await raw.receive())
            params = message.get("params", {})
            if message.get("method") == "process.output" and params["session_id"] == sid:
                text[params["stream"]] += params["data"]
            elif message.get("method") == "process.completed" and params["session_id"] == sid:
                completed = params
                break
    await raw.aclose()
    assert text == {"stdout": "before\nafter\n", "stderr": "err\n"}, text
    assert completed["status"] == "exited" and completed["exit_code"] == 0, completed
    assert completed["duration_s"] >= silent_s


async def test_silent_child_is_not_killed(start_server: Any) -> None:
    await _silent_child_survives(start_server, silent_s=3)


@pytest.mark.soak
@pytest.mark.timeout(300)
async def test_silent_child_is_not_killed_soak(start_server: Any) -> None:
    await _silent_child_survives(start_server, silent_s=120)


BURST = py(
    "import os, sys, time\n"
    "spawned = 0\n"
    "print('ready', flush=True)\n"
    "while True:\n"  # keeps forking until cancelled: ~200 alive at any time
    "    pid = os.fork()\n"
    "    if pid == 0:\n"
    "        time.sleep(0.05 + (spawned % 20) / 100); os._exit(0)\n"
    "    spawned += 1\n"
    "    if spawned % 200 == 0:\n"
    "        print(spawned, flush=True)\n"
    "    while True:\n"  # reap what ended, without blocking
    "        try:\n"
    "            if os.waitpid(-1, os.WNOHANG)[0] == 0: break\n"
    "        except ChildProcessError: break\n"
    "    if spawned >= 200 and spawned % 200 == 0: time.sleep(0.01)\n"
)


async def test_burst_of_200_children_cancelled_cleanly(server: Any, client: RawClient) -> None:
    """A child forking 200 short-lived children over and over: CANCEL ends every one of them,
    zombies included, and the completion says cancelled."""
    started = await client.execute(BURST)
    sid, pgid = started["session_id"], started["pgid"]
    with trio.fail_after(20):
        seen = 0
        while seen < 400:  # at least two rounds of 200 children
            params = await client.notification("process.output", sid)
            if params["data"].strip().isdigit():
                seen = int(params["data"].split()[-1])
    assert len(group_pids(pgid)) > 1
    assert (await client.result("control", session_id=sid, type="CANCEL"))["status"] \
        == "cancelling"
    with trio.fail_after(20):
        _, completed = await client.run_to_completion(sid)
    assert completed["status"] == "cancelled", completed
    assert group_pids(pgid, zombies=True) == {}


async def test_tcp_reset_cancels_the_sessions_of_the_connection(server: Any) -> None:
    """A client that vanishes with a RST (no close handshake, no FIN) loses its sessions."""
    assert server.port is not None
    raw = await RawWs.connect(server.port)
    groups = []
    for _ in range(3):
        reply = await raw.request("execute", {
            "command": py("import itertools, time\n"
                          "for i in itertools.count(): print(i, flush=True); time.sleep(0.01)")})
        groups.append(reply["result"]["pgid"])
    await raw.receive()  # output flows
    raw.reset()
    with trio.fail_after(15):  # ccx's own state: each session task ends after its kill path
        for session in list(server.manager.all()):
            await session.wait_done()
    statuses = {s.state.value for s in server.manager.all()}
    assert statuses == {"cancelled"}, statuses
    assert all(group_pids(g, zombies=True) == {} for g in groups)


async def test_execute_racing_shutdown_is_refused_and_leaves_nothing(
        start_server: Any, connect: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: an execute whose spawn was in flight when shutdown began used to start a
    session nobody cancelled (shutdown then hung until its timeout); if the manager's nursery
    had closed meanwhile, the group was left unsupervised. It is refused (-32003) and its
    group is killed."""
    import ccx.manager

    server = await start_server(kill_grace=5.0)
    client = await connect(server)
    real_spawn = ccx.manager.spawn
    spawned = trio.Event()
    pgids: list[int] = []

    async def spawn_then_shutdown(*args: Any, **kwargs: Any) -> Any:
        group = await real_spawn(*args, **kwargs)
        pgids.append(group.pgid)
        spawned.set()
        # The spawn "takes" until shutdown has begun; shielded like the real one, which has
        # no checkpoint once the process exists.
        with trio.CancelScope(shield=True):
            while server.manager._accepting:
                await trio.sleep(0.005)
            await trio.sleep(0.05)  # shutdown gets going meanwhile
        return group

    monkeypatch.setattr(ccx.manager, "spawn", spawn_then_shutdown)
    await client.send({"jsonrpc": "2.0", "id": 1, "method": "execute",
                       "params": {"command": ["sleep", "30"]}})
    await spawned.wait()
    began = trio.current_time()
    server.stop()
    try:  # refused, or the connection closed with 1001 first (PROTOCOL.md section 5)
        reply = await client.response(1)
        assert reply.get("error", {}).get("code") == -32003, reply
    except trio_websocket.ConnectionClosed as exc:
        assert exc.reason.code == 1001
    await wait_for(lambda: group_pids(pgids[0], zombies=True) == {}, timeout=10)
    with trio.fail_after(10):
        while server.manager.live() or server.port is None:
            await trio.sleep(0.01)
    assert trio.current_time() - began < 2, "shutdown waited for a session it never cancelled"


async def test_execute_in_flight_when_server_is_cancelled_leaves_nothing(
        tmp_path: Any, connect: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: cancelling `Server.run` from outside (no orderly stop) while an execute's
    spawn was in flight closed the manager's nursery first; the session could not start
    ("Nursery is closed to new arrivals", answered -32603) and its group ran on unsupervised.
    Found by the fuzz suite (a failing test tears its server down that way)."""
    import ccx.manager
    from ccx.config import Settings
    from ccx.server import Server

    real_spawn = ccx.manager.spawn
    spawned, cancelled = trio.Event(), trio.Event()
    pgids: list[int] = []

    async def spawn_across_cancel(*args: Any, **kwargs: Any) -> Any:
        group = await real_spawn(*args, **kwargs)
        pgids.append(group.pgid)
        spawned.set()
        with trio.CancelScope(shield=True):  # like the real spawn: no checkpoint from here
            await cancelled.wait()
            await trio.sleep(0.1)  # the manager's nursery closes meanwhile
        return group

    monkeypatch.setattr(ccx.manager, "spawn", spawn_across_cancel)
    async with trio.open_nursery() as outer:
        server = await outer.start(Server(Settings(port=0, state_dir=str(tmp_path))).run)
        client = await connect(server)
        await client.send({"jsonrpc": "2.0", "id": 1, "method": "execute",
                           "params": {"command": ["sleep", "30"]}})
        await spawned.wait()
        outer.cancel_scope.cancel()
        cancelled.set()
    try:
        await wait_for(lambda: group_pids(pgids[0], zombies=False) == {}, timeout=5)
    finally:
        if group_pids(pgids[0]):
            os.killpg(pgids[0], signal.SIGKILL)
