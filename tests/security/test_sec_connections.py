"""Connection exhaustion (security finding 1): one client opening many connections, silent
or idle, must not take `/health` or `execute` away from everyone else.

Rules: a real `ccx serve` subprocess (tests/security/sechelp.py) with a low RLIMIT_NOFILE
(160, as `ulimit -n 160`) and small caps; 127.0.0.1 only; every wait has a deadline and
waits on the server's answers, not on sleeps.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio
import trio_websocket
from conftest import http_get
from sechelp import ccx_serve

TOKEN = "sec-token"
NOFILE = 160
LIMITS = {"CCX_TOKEN": TOKEN, "CCX_MAX_CONNECTIONS": "100", "CCX_MAX_PENDING_HEADS": "20"}


async def _execute_echo(port: int) -> dict[str, object]:
    """Connect with the token, run `echo ok`, return its process.completed params."""
    async with trio_websocket.open_websocket(
            "127.0.0.1", port, "/ws", use_ssl=False,
            extra_headers=[("Authorization", f"Bearer {TOKEN}")]) as ws:
        await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "execute",
                                          "params": {"command": ["echo", "ok"]}}))
        while True:
            message = json.loads(await ws.get_message())
            assert "error" not in message, message
            if message.get("method") == "process.completed":
                return message["params"]  # type: ignore[no-any-return]


async def _raw_upgrade(port: int) -> tuple[trio.SocketStream, int]:
    """An authenticated WebSocket handshake by hand; the stream is left open and idle."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    data = b""
    while b"\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return stream, 0  # closed without an answer
        data += chunk
    return stream, int(data.split()[1])


def _emfile_lines(text: str) -> int:
    return sum(1 for line in text.splitlines()
               if "EMFILE" in line or "Too many open files" in line)


async def test_silent_connections_leave_health_and_execute_working(tmp_path: Path) -> None:
    with ccx_serve(tmp_path, LIMITS, nofile=NOFILE) as served:
        silent = []
        try:
            with trio.fail_after(30):
                for _ in range(170):  # more than the server has descriptors
                    silent.append(await trio.open_tcp_stream("127.0.0.1", served.port))
            with trio.fail_after(3):  # before the fix: ~10 s (accept failed with EMFILE)
                status, _, body = await http_get(served.port, "/health")
            assert status == 200, body
            with trio.fail_after(10):
                completed = await _execute_echo(served.port)
            assert completed["exit_code"] == 0, completed
        finally:
            for stream in silent:
                await stream.aclose()
        assert _emfile_lines(served.log_text()) <= 1, served.log_text()[-2000:]


async def test_unread_heads_are_closed_after_the_deadline(tmp_path: Path) -> None:
    with ccx_serve(tmp_path, {**LIMITS, "CCX_HEAD_TIMEOUT": "1"}) as served:
        streams = []
        for _ in range(5):  # slowloris: a head that never ends
            stream = await trio.open_tcp_stream("127.0.0.1", served.port)
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            streams.append(stream)
        started = trio.current_time()
        with trio.fail_after(6):  # before the fix: 10 s, whatever was configured
            for stream in streams:
                try:
                    assert await stream.receive_some(4096) == b""
                except trio.BrokenResourceError:
                    pass  # a reset is a close too
        assert trio.current_time() - started >= 0.8
        for stream in streams:
            await stream.aclose()


async def test_slowloris_beyond_the_head_cap_does_not_starve_complete_requests(
        tmp_path: Path) -> None:
    with ccx_serve(tmp_path, LIMITS, nofile=NOFILE) as served:  # head deadline: 10 s
        streams = []
        try:
            with trio.fail_after(30):
                for _ in range(170):  # more than the caps and the server's descriptors
                    stream = await trio.open_tcp_stream("127.0.0.1", served.port)
                    await stream.send_all(b"GET /health HTTP/1.1\r\n")
                    streams.append(stream)
            for _ in range(3):
                with trio.fail_after(3):
                    status, _, _ = await http_get(served.port, "/health")
                assert status == 200
        finally:
            for stream in streams:
                await stream.aclose()


async def test_idle_authenticated_websockets_are_capped(tmp_path: Path) -> None:
    with ccx_serve(tmp_path, LIMITS, nofile=NOFILE) as served:
        idle: list[trio.SocketStream] = []
        statuses: list[int] = []
        async with trio_websocket.open_websocket(
                "127.0.0.1", served.port, "/ws", use_ssl=False,
                extra_headers=[("Authorization", f"Bearer {TOKEN}")]) as first:
            try:
                with trio.fail_after(60):
                    for _ in range(149):
                        stream, status = await _raw_upgrade(served.port)
                        idle.append(stream)
                        statuses.append(status)
                assert statuses.count(101) <= 100, statuses
                assert 503 in statuses, statuses  # beyond the cap: refused, not accepted
                await first.send_message(json.dumps(
                    {"jsonrpc": "2.0", "id": 1, "method": "execute",
                     "params": {"command": ["echo", "ok"]}}))
                with trio.fail_after(10):  # before the fix: -32005 Too many open files
                    while True:
                        message = json.loads(await first.get_message())
                        assert "error" not in message, message
                        if message.get("method") == "process.completed":
                            assert message["params"]["exit_code"] == 0, message
                            break
            finally:
                for stream in idle:
                    await stream.aclose()
        assert _emfile_lines(served.log_text()) <= 1, served.log_text()[-2000:]


async def test_fd_soft_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    with ccx_serve(tmp_path, LIMITS, nofile=(NOFILE, 4096)) as served:
        limits = [e for e in served.log() if e.get("event") == "fd_limit"]
        assert limits and limits[0]["soft"] == 4096, served.log_text()
        # the cap is no longer lowered to half of 160
        assert not any(e.get("event") == "connection_cap_lowered" for e in served.log())


async def test_accept_out_of_descriptors_logs_once_and_recovers(tmp_path: Path) -> None:
    """Sessions use up the descriptors (the connection cap cannot prevent that), so accept
    itself fails with EMFILE: one log line per 10 s, not a traceback every 0.1 s."""
    env = {**LIMITS, "CCX_MAX_SESSIONS": "500", "CCX_MAX_SESSIONS_PER_CONNECTION": "500"}
    with ccx_serve(tmp_path, env, nofile=NOFILE) as served:
        async with trio_websocket.open_websocket(
                "127.0.0.1", served.port, "/ws", use_ssl=False,
                extra_headers=[("Authorization", f"Bearer {TOKEN}")]) as ws:
            with trio.fail_after(60):
                for request_id in range(1, 200):  # until spawning fails for lack of fds
                    await ws.send_message(json.dumps(
                        {"jsonrpc": "2.0", "id": request_id, "method": "execute",
                         "params": {"command": ["sleep", "60"]}}))
                    reply = json.loads(await ws.get_message())
                    if "error" in reply:
                        break
                assert "error" in reply, "descriptors never ran out"
            silent = []
            try:
                with trio.fail_after(10):
                    for _ in range(20):  # wait in the backlog: accept fails with EMFILE
                        silent.append(await trio.open_tcp_stream("127.0.0.1", served.port))
                with trio.fail_after(10):  # watch the log through several retry periods
                    while served.log_text().count("accept_failed") < 1:
                        await trio.sleep(0.05)
                await trio.sleep(1.0)  # ten retry periods: before the fix, ten tracebacks
            finally:
                for stream in silent:
                    await stream.aclose()
        # the connection is gone, its sessions are cancelled: descriptors come back
        with trio.fail_after(15):
            while True:
                try:
                    status, _, _ = await http_get(served.port, "/health")
                except (OSError, AssertionError, trio.TooSlowError):
                    await trio.sleep(0.1)
                    continue
                break
        assert status == 200
        text = served.log_text()
        assert text.count("accept_failed") == 1, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
