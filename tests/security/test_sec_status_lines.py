"""WebSocket handshake refusals carry their reason phrase (security finding 7): the 401 was
`HTTP/1.1 401 ` (wsproto writes no phrase), which some clients and proxies report badly.

Rules: in-process server on 127.0.0.1, port 0; raw handshake bytes; deadlines on all I/O.
"""

from __future__ import annotations

import pytest
import trio
from conftest import ServerFactory

UPGRADE = ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           "Sec-WebSocket-Version: 13\r\n{extra}\r\n")


async def _head(port: int, request: bytes) -> tuple[bytes, bytes]:
    """(status line, rest of the answer) of one exchange."""
    with trio.fail_after(10):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request)
            data = b""
            while True:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
    line, _, rest = data.partition(b"\r\n")
    return line, rest


@pytest.mark.parametrize(("extra", "line"), [
    ("", b"HTTP/1.1 401 Unauthorized"),
    ("Authorization: Bearer wrong\r\n", b"HTTP/1.1 401 Unauthorized"),
    ("Authorization: Bearer tok\r\nOrigin: http://evil.example\r\n", b"HTTP/1.1 403 Forbidden"),
])
async def test_handshake_refusals_have_reason_phrases(start_server: ServerFactory, extra: str,
                                                      line: bytes) -> None:
    server = await start_server(token="tok")
    status, rest = await _head(server.port or 0,
                               UPGRADE.format(port=server.port, extra=extra).encode())
    assert status == line, (status, rest)
    if line.startswith(b"HTTP/1.1 401"):
        assert b"www-authenticate: bearer" in rest.lower(), rest
