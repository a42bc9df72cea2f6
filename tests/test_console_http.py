"""The console's server side without a browser: its routes, headers, the token carried as a
WebSocket subprotocol, and the same-origin rule (issue #19; docs/protocol-notes.md).

Rules: in-process servers on 127.0.0.1, port 0; raw HTTP bytes where a header must be exact;
a deadline on every exchange.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import trio
import trio_websocket
from conftest import http_exchange, http_get

from ccx.config import Settings
from ccx.transport.policy import origin_ok, same_origin

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def bearer(token: str) -> str:
    return "ccx.bearer." + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


async def handshake(port: int, host: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    lines = ["GET /ws HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join([*lines, "", ""])).encode()
    with trio.fail_after(10):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                assert chunk, f"closed without an answer: {data!r}"
                data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    found = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    return int(head[0].split()[1]), found


async def test_root_redirects_and_index_has_csp(server: Any) -> None:
    status, headers, _ = await http_get(server.port, "/")
    assert status == 302 and headers["location"] == "/ui/"
    status, headers, body = await http_get(server.port, "/ui/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    policy = headers["content-security-policy"]
    assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy
    assert "'unsafe-eval'" not in policy and "frame-ancestors 'none'" in policy
    nonce = policy.split("'nonce-", 1)[1].split("'", 1)[0]
    assert f'nonce="{nonce}"'.encode() in body and b"{{nonce}}" not in body
    assert headers["x-content-type-options"] == "nosniff"
    _, again, _ = await http_get(server.port, "/ui/")
    assert again["content-security-policy"] != policy  # a fresh nonce per response


@pytest.mark.parametrize(("target", "status", "content_type"), [
    ("/ui/app.js", 200, "text/javascript"),
    ("/ui/style.css", 200, "text/css"),
    ("/ui/vendor/xterm/xterm.mjs", 200, "text/javascript"),
    ("/ui/vendor/xterm/xterm.css", 200, "text/css"),
    ("/ui/__init__.py", 404, None),
    ("/ui/../server.py", 404, None),
    ("/ui/vendor/../app.js", 404, None),
    ("/ui//etc/passwd", 404, None),
    ("/ui/nope.js", 404, None),
])
async def test_static_files(server: Any, target: str, status: int,
                            content_type: str | None) -> None:
    got, headers, body = await http_get(server.port, target)
    assert got == status, (target, body[:200])
    if content_type:
        assert headers["content-type"].startswith(content_type) and body
        assert "content-security-policy" in headers


async def test_meta_says_whether_a_token_is_needed(start_server: Any) -> None:
    open_server = await start_server()
    status, _, body = await http_get(open_server.port, "/ui/meta.json")
    assert status == 200 and json.loads(body)["token_required"] is False
    closed = await start_server(token="tok")
    status, _, body = await http_get(closed.port, "/ui/meta.json")  # no token needed for it
    assert status == 200 and json.loads(body)["token_required"] is True
    assert b"tok" not in body.replace(b"token_required", b"")
    status, _, _ = await http_get(closed.port, "/ui/", method="POST")
    assert status == 405


async def test_token_as_subprotocol_selects_only_ccx(start_server: Any) -> None:
    server = await start_server(token="tok")
    host = f"127.0.0.1:{server.port}"
    status, headers = await handshake(server.port, host, {
        "Sec-WebSocket-Protocol": f"{bearer('tok')}, ccx"})
    assert status == 101 and headers["sec-websocket-protocol"] == "ccx"
    for offered in ("ccx", f"{bearer('wrong')}, ccx", "ccx.bearer.!!!, ccx",
                    f"{bearer('tok')[:-2]}, ccx"):
        status, _ = await handshake(server.port, host, {"Sec-WebSocket-Protocol": offered})
        assert status == 401, offered


async def test_subprotocol_token_works_end_to_end(start_server: Any,
                                                  nursery: trio.Nursery) -> None:
    server = await start_server(token="tok")
    ws = await trio_websocket.connect_websocket(nursery, "127.0.0.1", server.port, "/ws",
                                                use_ssl=False,
                                                subprotocols=[bearer("tok"), "ccx"])
    assert ws.subprotocol == "ccx"
    await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
    assert json.loads(await ws.get_message())["result"]["pong"] is True
    await ws.aclose()


async def test_same_origin_page_is_accepted_other_origins_refused(start_server: Any) -> None:
    """The console's origin is the server's own, whatever its name (here one allowed by
    CCX_ALLOWED_HOSTS on a loopback bind, as a reverse proxy's would be)."""
    server = await start_server(allowed_hosts=("console.example",))
    host = f"console.example:{server.port}"
    status, _ = await handshake(server.port, host, {"Origin": f"http://{host}"})
    assert status == 101
    status, _ = await handshake(server.port, host, {"Origin": f"https://{host}"})
    assert status == 101  # behind a TLS-terminating proxy
    for origin in ("http://evil.example", f"http://console.example:{server.port + 1}",
                   f"http://{host}.evil.example", f"http://evil.example/{host}"):
        status, _ = await handshake(server.port, host, {"Origin": origin})
        assert status == 403, origin


def test_same_origin_rule() -> None:
    settings = Settings()
    assert same_origin("http://box:8003", "box:8003")
    assert same_origin("HTTPS://Box:8003", "box:8003")
    assert not same_origin("http://box:8003", "box:8004")
    assert not same_origin("http://box:8003", None)
    assert not same_origin("http://a@box:8003", "a@box:8003")  # a malformed Host
    assert origin_ok(settings, "http://10.0.0.5:8003", "10.0.0.5:8003")
    assert not origin_ok(settings, "http://10.0.0.5:8003", "10.0.0.6:8003")
    assert not origin_ok(settings, "http://10.0.0.5:8003")


async def test_console_page_needs_no_token_but_its_socket_does(start_server: Any) -> None:
    server = await start_server(token="tok")
    status, _, _ = await http_get(server.port, "/ui/app.js")
    assert status == 200
    status, _, _ = await http_exchange(server.port, (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
        f"Origin: http://127.0.0.1:{server.port}\r\n\r\n").encode())
    assert status == 401
