"""Reliability: clients that vanish without a word, and connection churn.

- Half-open: the peer disappears with no FIN and no RST (network gone). A `ccx serve` runs in
  a private network namespace (`unshare --net`, root only); a client in the same namespace
  starts sessions, then the namespace's loopback goes down. TCP_USER_TIMEOUT (streaming
  session: data stays unacknowledged) and keepalive (idle session) must drop the connection
  and cancel its sessions.
- Churn: 200 connections open and close (some abruptly, some with a session) while other
  sessions stream; the server's fd count, trio task count and RSS stay flat.
Rules as in tests/conftest.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
from conftest import PY, group_pids, http_get, py, wait_for
from relhelp import RawWs, Serve, fd_count, rss_kib

# A bare client: handshake, one execute, print the pgid, then never read again.
NS_CLIENT = r"""
import base64, json, os, re, socket, sys, time
port, command = int(sys.argv[1]), json.loads(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
data = b""
while b"\r\n\r\n" not in data:  # the 101 first: frames sent with the head may be lost
    data += s.recv(65536)
payload = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "execute",
                      "params": {"command": command}}).encode()
mask = os.urandom(4)
head = bytes([0x81, 0x80 | len(payload)]) if len(payload) < 126 else \
    bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big")
s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
while not re.search(rb'"pgid":(\d+)', data):
    data += s.recv(65536)
print(re.search(rb'"pgid":(\d+)', data).group(1).decode(), flush=True)
time.sleep(300)
"""

can_unshare = sys.platform.startswith("linux") and os.geteuid() == 0 \
    and shutil.which("unshare") is not None and shutil.which("nsenter") is not None \
    and shutil.which("ip") is not None


@pytest.mark.skipif(not can_unshare, reason="needs root, unshare, nsenter and ip (Linux)")
async def test_half_open_connections_are_dropped_and_their_sessions_cancelled(
        tmp_path: Path) -> None:
    server = Serve(tmp_path, prefix=["unshare", "--net", "sh", "-c",
                                     'ip link set lo up && exec "$0" "$@"'],
                   CCX_TCP_USER_TIMEOUT="2", CCX_TCP_KEEPALIVE="1")
    ns = f"--net=/proc/{server.proc.pid}/ns/net"
    clients: list[subprocess.Popen[bytes]] = []
    try:
        streaming = py("import itertools, time\n"
                       "for i in itertools.count(): print('x' * 100, i, flush=True); "
                       "time.sleep(0.001)")
        silent = py("import time; time.sleep(300)")
        groups = []
        for command in (streaming, silent):
            client = subprocess.Popen(["nsenter", ns, PY, "-c", NS_CLIENT, str(server.port),
                                       json.dumps(command)], stdout=subprocess.PIPE)
            clients.append(client)
            assert client.stdout is not None
            groups.append(int(client.stdout.readline()))
        await trio.sleep(1)  # the streaming session fills the client's window
        assert all(group_pids(g) for g in groups)
        # The network vanishes: nothing the server sends is acknowledged, no RST arrives.
        subprocess.run(["nsenter", ns, "ip", "link", "set", "lo", "down"], check=True)
        await wait_for(lambda: all(group_pids(g, zombies=True) == {} for g in groups),
                       timeout=30, interval=0.1)
        assert server.proc.poll() is None, "the server stays up"
    finally:
        for client in clients:
            client.kill()
            client.wait()
        server.stop()
    cancelled = [e for e in server.events
                 if e.get("event") == "completed" and e.get("status") == "cancelled"]
    assert len(cancelled) == 2, server.events
    assert server.proc.returncode == 0


def task_count() -> int:
    count, stack = 0, [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def _churn(server: Any, rounds: int) -> None:
    assert server.port is not None
    for i in range(rounds):
        raw = await RawWs.connect(server.port)
        if i % 4 == 0:  # a session that the closing connection must cancel
            await raw.request("execute", {"command": py("import time; time.sleep(30)")})
        else:
            await raw.request("ping")
        if i % 2:
            raw.reset()
        else:
            await raw.aclose()


async def test_connection_churn_leaks_nothing(start_server: Any, connect: Any,
                                              soak: bool) -> None:
    """200 connections (2000 with --soak) open and close while three sessions stream.

    Ended sessions are kept for replay by design (CCX_RETENTION, at most 1000): a short
    retention keeps that out of the measurement, and so does quieting the server's log
    lines, which pytest would otherwise capture in this very process."""
    server = await start_server(kill_grace=0.5, max_sessions=256, retention=0.2)
    config = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        await _churn_and_measure(server, await connect(server), soak)
    finally:
        structlog.configure(**config)


async def _churn_and_measure(server: Any, reader: Any, soak: bool) -> None:
    stream = py("import itertools, time\n"
                "for i in itertools.count(): print(i, flush=True); time.sleep(0.002)")
    streams = [await reader.execute(stream) for _ in range(3)]
    received = 0

    async def consume() -> None:
        nonlocal received
        while True:
            await reader.receive()
            received += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        rounds = 2000 if soak else 200
        # Warm-up: lazily created things exist from here on (allocator arenas, and trio's
        # deadline heap, which holds each handshake's 10 s timeout until it passes).
        await _churn(server, max(20, rounds // 5))
        await wait_for(lambda: len(server.manager.running()) == 3, timeout=20)
        await trio.sleep(0.2)
        me = os.getpid()
        fds, tasks, rss = fd_count(me), task_count(), rss_kib(me)
        await _churn(server, rounds)
        await wait_for(lambda: len(server.manager.running()) == 3
                       and len(server.connections) == 1, timeout=20)
        await wait_for(lambda: fd_count(me) <= fds, timeout=10)
        await trio.sleep(0.5)  # ended sessions pass their retention and are swept
        assert task_count() <= tasks, (task_count(), tasks)
        assert rss_kib(me) <= rss * 1.10, (rss_kib(me), rss)
        before = received
        await trio.sleep(0.2)
        assert received > before, "the streaming sessions kept streaming"
        nursery.cancel_scope.cancel()
    for started in streams:
        await reader.result("control", session_id=started["session_id"], type="CANCEL")


async def test_connection_churn_against_a_real_server(tmp_path: Path) -> None:
    """The same from outside: /proc/<server pid>/fd and VmRSS of a `ccx serve` process,
    its /metrics connection gauge, after 200 connections came and went."""
    server = Serve(tmp_path, CCX_RETENTION="0.2")
    try:
        reader = await RawWs.connect(server.port)
        for _ in range(2):
            await reader.request("execute", {"command": py(
                "import itertools, time\n"
                "for i in itertools.count(): print(i, flush=True); time.sleep(0.005)")})

        class Fake:
            port = server.port

        await _churn(Fake, 20)
        await trio.sleep(0.5)
        pid = server.proc.pid
        fds, rss = fd_count(pid), rss_kib(pid)
        await _churn(Fake, 200)
        # cancelled sessions finish their kill path, closed sockets are let go
        await wait_for(lambda: fd_count(pid) <= fds, timeout=10)
        _, _, body = await http_get(server.port, "/metrics")
        assert re.search(rb"^ccx_connections 1(\.0)?$", body, re.M), body
        assert rss_kib(pid) <= rss * 1.10, (rss_kib(pid), rss)
        await reader.aclose()
    finally:
        server.stop()


async def _run_sessions(client: Any, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        _, _, completed = await client.run(py("print('x' * 1000)"))
        ids.append(completed["session_id"])
    return ids


async def test_ended_sessions_beyond_the_cap_are_forgotten_without_any_lookup(
        start_server: Any, connect: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: ended sessions (each holding up to CCX_REPLAY_BYTES of recent output for
    replay) were dropped only when someone called `status`/`sessions`/`control`...; a server
    fed nothing but `execute` (every `ccx run`) kept them all, past the 1000-session cap and
    past CCX_RETENTION: memory grew without bound."""
    import ccx.manager

    monkeypatch.setattr(ccx.manager, "MAX_ENDED_KEPT", 3)
    server = await start_server()
    ids = await _run_sessions(await connect(server), 6)
    # find() does no sweep: only the server itself may forget them.
    await wait_for(lambda: [server.manager.find(i) is not None for i in ids]
                   == [False] * 3 + [True] * 3, timeout=2)


async def test_ended_sessions_past_retention_are_forgotten_without_any_lookup(
        start_server: Any, connect: Any) -> None:
    server = await start_server(retention=0.5)
    ids = await _run_sessions(await connect(server), 3)
    await wait_for(lambda: all(server.manager.find(i) is None for i in ids), timeout=5)
