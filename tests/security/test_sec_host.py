"""DNS rebinding (security finding 6): a page on evil.example whose name is re-pointed at
127.0.0.1 reaches a loopback-bound server with `Host: evil.example`. On a loopback bind only
loopback Host values (and CCX_ALLOWED_HOSTS) are served; the rest get 403 before any token
or origin check, on every path (WebSocket handshakes, /mcp, /metrics, /health).

Rules: in-process servers on 127.0.0.1, port 0; raw HTTP bytes; a deadline on every exchange.
"""

from __future__ import annotations

import pytest
import trio
from conftest import ServerFactory

from ccx.config import Settings
from ccx.transport.policy import host_ok

UPGRADE = ("GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
MCP_INIT = ('{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":'
            '"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}')


def _post_mcp(host: str) -> bytes:
    return (f"POST /mcp HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Accept: application/json, text/event-stream\r\n"
            f"Content-Length: {len(MCP_INIT)}\r\n\r\n{MCP_INIT}").encode()


async def _status(port: int, request: bytes) -> int:
    """Send *request* on a fresh connection; the status code of the answer's head."""
    with trio.fail_after(10):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request)
            data = b""
            while b"\r\n" not in data:
                chunk = await stream.receive_some(4096)
                assert chunk, f"closed without an answer: {data!r}"
                data += chunk
    return int(data.split()[1])


def _get(path: str, host: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example",
                                  "localhost.evil.example:{port}", "[::2]:{port}"])
async def test_foreign_host_is_refused_on_every_path(start_server: ServerFactory,
                                                     host: str) -> None:
    server = await start_server()
    port = server.port or 0
    host = host.format(port=port)
    for request in (UPGRADE.format(host=host).encode(), _post_mcp(host), _get("/metrics", host),
                    _get("/health", host)):
        status = await _status(port, request)
        assert status == 403, (request, status)  # before the fix: 101 / 200


@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}",
                                  "LOCALHOST", "127.0.0.1"])
async def test_loopback_hosts_are_served(start_server: ServerFactory, host: str) -> None:
    server = await start_server()
    port = server.port or 0
    host = host.format(port=port)
    assert await _status(port, UPGRADE.format(host=host).encode()) == 101
    assert await _status(port, _get("/health", host)) == 200
    assert await _status(port, _get("/metrics", host)) == 200
    assert await _status(port, _post_mcp(host)) == 200


async def test_allowed_hosts_extend_the_loopback_names(start_server: ServerFactory) -> None:
    server = await start_server(allowed_hosts=("proxy.example",))
    port = server.port or 0
    assert await _status(port, _get("/health", "proxy.example:8443")) == 200
    assert await _status(port, _get("/health", "other.example")) == 403


def test_host_rule_applies_to_loopback_binds_only() -> None:
    settings = Settings()
    assert host_ok(settings, None, loopback_bind=True)  # HTTP/1.0 without Host
    assert not host_ok(settings, "evil.example", loopback_bind=True)
    assert host_ok(settings, "evil.example", loopback_bind=False)
    assert host_ok(Settings(allowed_hosts=("*",)), "evil.example", loopback_bind=True)
    assert not host_ok(settings, "localhost:notaport", loopback_bind=True)
    assert not host_ok(settings, "[::1]junk", loopback_bind=True)
    assert not host_ok(settings, "user@localhost", loopback_bind=True)
