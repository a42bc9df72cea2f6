"""Unbounded MCP-over-HTTP sessions (security finding 4): 4,000 `initialize` calls were all
kept for CCX_MCP_HTTP_IDLE (1 h) and each was logged on its own at shutdown. Now at most
CCX_MCP_HTTP_MAX_SESSIONS are kept (beyond it the longest idle one is ended; 503 if none is
idle) and shutdown ends them with one log line.

Rules: in-process servers on 127.0.0.1, port 0; raw HTTP exchanges with deadlines.
"""

from __future__ import annotations

import trio
from structlog.testing import capture_logs

from ccx.config import Settings
from ccx.server import Server
from ccx.transport.mcp_http import _post_raw

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "t", "version": "1"}}}
PING = {"jsonrpc": "2.0", "id": 2, "method": "ping"}


async def _initialize(port: int) -> str:
    with trio.fail_after(10):
        head, body = await _post_raw(port, INIT)
    assert head.startswith("HTTP/1.1 200"), (head, body)
    return head.lower().split("mcp-session-id: ", 1)[1].split("\r\n", 1)[0]


async def _ping_status(port: int, session_id: str) -> int:
    with trio.fail_after(10):
        head, _ = await _post_raw(port, PING, f"Mcp-Session-Id: {session_id}",
                                  "MCP-Protocol-Version: 2025-06-18")
    return int(head.split()[1])


async def test_sessions_beyond_the_cap_evict_the_longest_idle(tmp_path: object) -> None:
    settings = Settings(port=0, kill_grace=1.0, mcp_http_max_sessions=5,
                        state_dir=str(tmp_path))
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(Server(settings).run)
        port = server.port or 0
        ids = [await _initialize(port) for _ in range(5)]
        assert await _ping_status(port, ids[0]) == 200  # ids[0] is now the most recently seen
        more = [await _initialize(port) for _ in range(7)]
        assert len(server.mcp_http.sessions) == 5  # before the fix: 12
        assert await _ping_status(port, more[-1]) == 200
        assert await _ping_status(port, ids[1]) == 404  # the longest idle went first
        with capture_logs() as logs:
            server.stop()
            with trio.fail_after(10):
                while server.mcp_http.sessions:
                    await trio.sleep(0.01)
        ended = [e for e in logs if e["event"] == "mcp_session_ended"]
        assert ended == [], ended  # one summary line instead of one per session
        summary = [e for e in logs if e["event"] == "mcp_sessions_ended"]
        assert summary and summary[0]["count"] == 5, logs


async def _open_get_stream(port: int, session_id: str) -> trio.SocketStream:
    """A standalone SSE stream (GET /mcp) held open: its session is busy while it lasts."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all((f"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nMcp-Session-Id: {session_id}"
                           "\r\nMCP-Protocol-Version: 2025-06-18\r\n"
                           "Accept: text/event-stream\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        assert chunk, data
        data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data
    return stream


async def test_no_room_when_every_session_is_busy(tmp_path: object) -> None:
    settings = Settings(port=0, kill_grace=1.0, mcp_http_max_sessions=2,
                        state_dir=str(tmp_path))
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(Server(settings).run)
        port = server.port or 0
        ids = [await _initialize(port) for _ in range(2)]
        with trio.fail_after(10):
            streams = [await _open_get_stream(port, i) for i in ids]
            while not all(s.busy for s in server.mcp_http.sessions.values()):
                await trio.sleep(0.01)
            head, _ = await _post_raw(port, INIT)
        assert head.startswith("HTTP/1.1 503"), head
        assert "retry-after: 1" in head.lower(), head
        assert set(server.mcp_http.sessions) == set(ids)  # nobody busy was ended
        for stream in streams:
            await stream.aclose()
        server.stop()
