"""Attack: one client fills server memory with `input` its child never reads (hardening (b)).

Two connections each send 64 one-MiB `input` frames to a `sleep 600` started with stdin: each
request became a task holding its frame (up to 64 in flight per connection), so the server
held ~3 MiB per frame (RSS 248 -> 634 MiB). Fixed by a per-connection input budget
(`CCX_MAX_INPUT_BYTES`, 8 MiB): the reader stops taking `input` frames while the budget is
full, so the client waits, as on a pipe (docs/security.md).

Rules: as in conftest; the server is a real `ccx serve` subprocess and its memory is VmRSS
from /proc; thresholds derive from the configured limits with generous slack. Every request
gets its answer in the end: nothing is dropped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import group_alive, http_get, wait_for

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "reliability"))
from relhelp import CCX, RawWs, Serve, rss_kib

MIB = 1024 * 1024
FRAMES = 64
INPUT_LIMIT = 8 * MIB  # the CCX_MAX_INPUT_BYTES default
PARSED = 3  # a frame in memory: the message, its parsed `data` and the bytes written
SLACK = 64 * MIB


async def pending_input(port: int) -> float:
    """`ccx_input_pending_bytes` from /metrics (-1 if the server has no such gauge)."""
    _, _, body = await http_get(port, "/metrics")
    for line in body.decode().splitlines():
        if line.startswith("ccx_input_pending_bytes "):
            return float(line.split()[1])
    return -1.0


async def test_pending_input_is_bounded_per_connection(tmp_path: Path) -> None:
    server = Serve(tmp_path)
    try:
        owner = await RawWs.connect(server.port)
        started = await owner.request("execute", {"command": ["sleep", "600"], "stdin": True})
        sid = started["result"]["session_id"]
        await trio.sleep(0.5)
        baseline = rss_kib(server.proc.pid)
        data = "a" * (MIB - 200)  # the whole frame stays within CCX_MAX_MESSAGE_BYTES
        floods = [await RawWs.connect(server.port) for _ in range(2)]
        sent = [0, 0]

        async def flood(index: int) -> None:
            for n in range(FRAMES):
                await floods[index].send_json({"jsonrpc": "2.0", "id": n, "method": "input",
                                               "params": {"session_id": sid, "data": data}})
                sent[index] += 1

        async with trio.open_nursery() as nursery:
            for index in range(2):
                nursery.start_soon(flood, index)
            last = None
            with trio.fail_after(60):  # until both floods are stuck (or done)
                while last != (sent[0], sent[1], rss_kib(server.proc.pid) // 4096):
                    last = (sent[0], sent[1], rss_kib(server.proc.pid) // 4096)
                    await trio.sleep(1.0)
            grown = (rss_kib(server.proc.pid) - baseline) * 1024
            pending = await pending_input(server.port)
            print(f"\nframes sent {sent}, RSS +{grown / MIB:.0f} MiB, "
                  f"pending input {pending / MIB:.1f} MiB")
            bound = 2 * PARSED * (INPUT_LIMIT + MIB)  # budget plus the frame being read
            assert grown <= bound + SLACK, f"RSS grew {grown / MIB:.0f} MiB"
            assert 0 <= pending <= 2 * (INPUT_LIMIT + MIB)
            assert sent[0] < FRAMES and sent[1] < FRAMES, "the server read every frame"
            # The wait ends with the session: a CANCEL from any connection fails every
            # pending write (-32004) and the floods go on to their end, each frame answered.
            reply = await owner.request("control", {"session_id": sid, "type": "CANCEL"})
            assert reply["result"]["status"] == "cancelling", reply
            for index in range(2):
                codes = []
                with trio.fail_after(60):
                    while len(codes) < FRAMES:
                        message = json.loads(await floods[index].receive())
                        codes.append(message.get("error", {}).get("code"))
                assert set(codes) == {-32004}, codes
            assert sent == [FRAMES, FRAMES]
    finally:
        server.stop()


async def test_control_is_not_held_behind_pending_input(tmp_path: Path) -> None:
    """Control sent while earlier `input` is still being written is answered at once: the
    budget holds back only `input` frames, never the requests read before them."""
    server = Serve(tmp_path, CCX_MAX_INPUT_BYTES=str(4 * MIB))
    try:
        client = await RawWs.connect(server.port)
        reply = await client.request("execute", {"command": ["sleep", "600"], "stdin": True})
        sid = reply["result"]["session_id"]
        data = "b" * (MIB - 200)
        for n in range(3):  # 3 MiB: within the budget, every write blocked on the pipe
            await client.send_json({"jsonrpc": "2.0", "id": f"in{n}", "method": "input",
                                    "params": {"session_id": sid, "data": data}})
        with trio.fail_after(5):
            reply = await client.request("control", {"session_id": sid, "type": "PAUSE"})
            assert reply["result"]["status"] == "paused", reply
            reply = await client.request("control", {"session_id": sid, "type": "CANCEL"})
            assert reply["result"]["status"] == "cancelling", reply
        with trio.fail_after(30):
            answered = 0
            while answered < 3:
                message = json.loads(await client.receive())
                answered += str(message.get("id", "")).startswith("in")
    finally:
        server.stop()


def test_stdio_stops_reading_input_it_cannot_write(tmp_path: Path) -> None:
    """`ccx mcp` (stdio): `send_input` lines beyond CCX_MAX_INPUT_BYTES stay in the pipe."""
    limit = 2 * MIB
    proc = subprocess.Popen([CCX, "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "CCX_MAX_INPUT_BYTES": str(limit),
                                 "CCX_STATE_DIR": str(tmp_path)})
    assert proc.stdin is not None and proc.stdout is not None
    pgid: int | None = None
    try:
        def call(n: int, method: str, params: dict[str, object]) -> None:
            line = json.dumps({"jsonrpc": "2.0", "id": n, "method": method, "params": params})
            proc.stdin.write(line.encode() + b"\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]

        call(0, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                               "clientInfo": {"name": "t", "version": "0"}})
        proc.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
        call(1, "tools/call", {"name": "start", "arguments": {"command": ["sleep", "600"],
                                                               "stdin": True}})
        proc.stdin.flush()
        sid = None
        while sid is None:
            reply = json.loads(proc.stdout.readline())
            if reply.get("id") == 1:
                sid = reply["result"]["structuredContent"]["session_id"]
                pgid = reply["result"]["structuredContent"]["pid"]  # pgid == pid
        line = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "send_input", "arguments": {"session_id": sid, "data": "c" * (MIB - 200)}}})
        payload = (line + "\n").encode() * 32  # 32 MiB: far more than budget and pipe hold
        os.set_blocking(proc.stdin.fileno(), False)
        written, idle_since = 0, time.monotonic()
        while written < len(payload) and time.monotonic() - idle_since < 2.0:
            try:
                written += os.write(proc.stdin.fileno(), payload[written:written + 65536])
                idle_since = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        print(f"\nstdio accepted {written / MIB:.1f} MiB of send_input")
        # the budget, the line being split, one read and the pipe's own buffer
        assert written <= limit + 3 * MIB, f"{written / MIB:.1f} MiB read"
    finally:
        proc.terminate()  # SIGTERM: the server cancels its sessions, then exits
        proc.wait(timeout=15)
    assert pgid is not None and not group_alive(pgid), "a session outlived `ccx mcp`"


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_a_client_gone_while_its_input_waits_loses_its_sessions(start_server: Any,
                                                                     how: str) -> None:
    """Regression: while the reader waited for input room it read nothing, so the close of a
    client that had flooded `input` went unnoticed until the child read: its session (no
    linger) ran on, ownerless. A hang-up must release the connection's sessions at once."""
    limit = 64 * 1024
    server = await start_server(max_input_bytes=limit)
    client = await RawWs.connect(server.port)
    started = (await client.request("execute", {"command": ["sleep", "600"], "stdin": True}))
    session = server.manager.get(started["result"]["session_id"])
    chunk = "x" * (limit // 2)

    async def flood() -> None:
        for n in range(64):  # 2 MiB: far beyond the budget, the socket buffers and the pipe
            await client.send_json({"jsonrpc": "2.0", "id": 100 + n, "method": "input",
                                    "params": {"session_id": session.id, "data": chunk}})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        # ccx's own state: the connection's budget is full and its reader waits for room.
        await wait_for(lambda: any(c.input.waiting for c in server.connections), timeout=30)
        nursery.cancel_scope.cancel()
    if how == "rst":
        client.reset()
    else:
        client.stream.socket.close()  # an ordinary close: FIN, with unread frames behind it
    with trio.fail_after(15):
        await session.wait_done()
    assert session.state.value == "cancelled", session.state
    assert not group_alive(session.group.pgid)
