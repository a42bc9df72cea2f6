"""Contract tests: PROTOCOL.md section 1 (transport) and section 4 (errors).

Plain HTTP is spoken over a bare trio TCP stream with hand-written request bytes; WebSocket
handshakes go through trio-websocket, whose `ConnectionRejected` carries the HTTP status.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import pytest
import trio
import trio_websocket
from conftest import (
    RawClient,
    close_code,
    http_get,
    join,
    py,
    wait_for,
)

PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


def assert_error(reply: dict[str, Any], code: int) -> None:
    assert reply.get("jsonrpc") == "2.0", reply
    assert "error" in reply and "result" not in reply, reply
    assert reply["error"]["code"] == code, reply
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"], reply


async def still_usable(client: RawClient) -> None:
    with trio.fail_after(10):
        assert (await client.result("ping"))["pong"] is True


async def rejected(connect: Any, server: Any, path: str = "/ws", **kw: Any) -> int:
    """The HTTP status of a refused handshake (fails if the handshake succeeds).

    `open_websocket` is used here rather than the `connect` fixture: with a caller's nursery,
    trio-websocket raises the rejection inside that nursery instead of to the caller."""
    with trio.fail_after(10), pytest.raises(trio_websocket.ConnectionRejected) as info:
        async with trio_websocket.open_websocket("127.0.0.1", server.port, path,
                                                 use_ssl=False, **kw):
            pass
    return info.value.status_code


# ------------------------------------------------------------------------------ plain HTTP


async def test_health_is_200_json(server: Any, client: RawClient) -> None:
    status, headers, body = await http_get(server.port, "/health")
    assert status == 200
    assert headers["content-type"].split(";")[0].strip() == "application/json"
    health = json.loads(body)
    assert health["status"] == "ok"
    assert isinstance(health["version"], str) and health["version"]
    assert health["sessions"] == 0

    started = await client.execute(py("import time; print('r', flush=True); time.sleep(100)"))
    sid = started["session_id"]
    status, _, body = await http_get(server.port, "/health")
    assert status == 200 and json.loads(body)["sessions"] == 1  # the running count
    await client.result("control", session_id=sid, type="CANCEL")
    with trio.fail_after(10):
        await client.notification("process.completed", sid)
    status, _, body = await http_get(server.port, "/health")
    assert json.loads(body)["sessions"] == 0


async def test_health_counts_running_not_undelivered(server: Any, client: RawClient) -> None:
    """`sessions` is the running count: an exited session whose output its (non-reading)
    client has not taken yet is not running any more."""
    started = await client.execute(["head", "-c", "4000000", "/dev/zero"])
    session = server.manager.get(started["session_id"])
    # ccx's own state for "its group is gone" (the status is final a little earlier, when the
    # leader exits; the kill path's last scan confirms the group empty after that).
    await wait_for(lambda: not session.running)
    assert not session.done, "the test needs output still waiting for the client"
    status, _, body = await http_get(server.port, "/health")
    assert status == 200 and json.loads(body)["sessions"] == 0


async def test_status_lines_carry_reason_phrases(server: Any) -> None:

    for target, line in (("/ws", b"HTTP/1.1 426 Upgrade Required"), ("/nope", b"HTTP/1.1 404 Not Found"),
                         ("/health", b"HTTP/1.1 200 OK")):
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head:
                head += await stream.receive_some(4096)
            await stream.aclose()
        assert head.split(b"\r\n")[0] == line


async def test_health_needs_no_token(start_server: Any) -> None:
    server = await start_server(token="tok")
    status, _, body = await http_get(server.port, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


# "/" is the web console (a documented addition: docs/protocol-notes.md, test_console_http).
@pytest.mark.parametrize("target", ["/nope", "/healthz", "/ws/other", "/wss", "/health/x",
                                    "/uix", "/index.html"])
async def test_unknown_paths_are_404(server: Any, target: str) -> None:
    status, _, _ = await http_get(server.port, target)
    assert status == 404


@pytest.mark.parametrize("target", ["/ws", "/ws/mcp", "/ws?token=x"])
async def test_plain_get_on_websocket_path_is_426(server: Any, target: str) -> None:
    status, _, _ = await http_get(server.port, target)
    assert status == 426


async def test_server_answers_after_garbage_http(server: Any) -> None:
    """A garbage request on one TCP connection does not disturb the server."""
    from conftest import http_exchange

    try:
        await http_exchange(server.port, b"\x00\x01garbage\r\n\r\n")
    except (AssertionError, trio.BrokenResourceError):
        pass  # closing without an answer is fine too
    status, _, _ = await http_get(server.port, "/health")
    assert status == 200


# ------------------------------------------------------------------------------ token


async def test_token_missing_is_401(start_server: Any, connect: Any) -> None:
    server = await start_server(token="tok")
    assert await rejected(connect, server) == 401
    assert await rejected(connect, server, "/ws/mcp") == 401


async def test_token_wrong_is_401(start_server: Any, connect: Any) -> None:
    server = await start_server(token="tok")
    assert await rejected(connect, server, extra_headers=[(b"Authorization", b"Bearer nope")]) \
        == 401
    assert await rejected(connect, server, "/ws?token=nope") == 401
    assert await rejected(connect, server, "/ws?token=") == 401
    assert await rejected(connect, server, "/ws?token=tokx") == 401
    assert await rejected(connect, server, extra_headers=[(b"Authorization", b"Basic tok")]) \
        == 401


async def test_token_bearer_header_accepted(start_server: Any, connect: Any) -> None:
    server = await start_server(token="tok")
    client = await connect(server, extra_headers=[(b"Authorization", b"Bearer tok")])
    await still_usable(client)


async def test_token_query_parameter_accepted(start_server: Any, connect: Any) -> None:
    server = await start_server(token="tok")
    client = await connect(server, "/ws?token=tok")
    await still_usable(client)
    stdout, _, _ = await client.run(["echo", "ok"])
    assert stdout == b"ok\n"


# ------------------------------------------------------------------------------ origin


@pytest.mark.parametrize("origin", [
    "http://evil.example",
    "https://evil.example:443",
    "http://localhost.evil.example",
    "http://127.0.0.1.evil.example",
    "http://evil.example/?http://localhost",
    "null",
])
async def test_foreign_origin_is_403(server: Any, connect: Any, origin: str) -> None:
    assert await rejected(connect, server, extra_headers=[(b"Origin", origin.encode())]) == 403


@pytest.mark.parametrize("origin", [
    "http://localhost",
    "http://localhost:1234",
    "http://127.0.0.1",
    "http://127.0.0.1:8003",
    "http://[::1]",
    "http://[::1]:9000",
])
async def test_loopback_origin_is_allowed(server: Any, connect: Any, origin: str) -> None:
    client = await connect(server, extra_headers=[(b"Origin", origin.encode())])
    await still_usable(client)


async def test_listed_origin_is_allowed(start_server: Any, connect: Any) -> None:
    server = await start_server(allowed_origins=("https://app.example", "http://evil.example"))
    client = await connect(server, extra_headers=[(b"Origin", b"http://evil.example")])
    await still_usable(client)
    client = await connect(server, extra_headers=[(b"Origin", b"https://app.example")])
    await still_usable(client)
    assert await rejected(connect, server, extra_headers=[(b"Origin", b"http://other.example")]) \
        == 403


async def test_star_allows_every_origin(start_server: Any, connect: Any) -> None:
    server = await start_server(allowed_origins=("*",))
    client = await connect(server, extra_headers=[(b"Origin", b"http://evil.example")])
    await still_usable(client)


async def test_no_origin_is_allowed(client: RawClient) -> None:
    await still_usable(client)


async def test_token_checked_with_allowed_origin(start_server: Any, connect: Any) -> None:
    server = await start_server(token="tok")
    assert await rejected(connect, server, extra_headers=[(b"Origin", b"http://localhost")]) \
        == 401


# ------------------------------------------------------------------------------ frame size


def ping_of_size(size: int, pad_char: str = "a") -> str:
    """A valid ping request whose UTF-8 encoding is exactly *size* bytes."""
    base = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": ""}},
                      ensure_ascii=False)
    room = size - len(base.encode())
    width = len(pad_char.encode())
    assert room >= 0 and room % width == 0, (room, width)
    text = base.replace('"pad": ""', '"pad": "' + pad_char * (room // width) + '"')
    assert len(text.encode()) == size
    return text


async def test_frame_over_limit_closes_1009(start_server: Any, connect: Any) -> None:
    server = await start_server(max_message_bytes=1000)
    client = await connect(server)
    await client.send(ping_of_size(1001))
    assert await close_code(client) == 1009


async def test_frame_at_limit_is_accepted(start_server: Any, connect: Any) -> None:
    server = await start_server(max_message_bytes=1000)
    client = await connect(server)
    await client.send(ping_of_size(1000))
    with trio.fail_after(10):
        reply = await client.response(1)
    assert reply["result"]["pong"] is True


async def test_text_frame_over_limit_in_bytes_not_in_characters_closes_1009(
    start_server: Any, connect: Any
) -> None:
    server = await start_server(max_message_bytes=1000)
    client = await connect(server)
    text = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping",
                       "params": {"pad": "€" * 400}}, ensure_ascii=False)
    assert len(text) < 1000 < len(text.encode("utf-8")), (len(text), len(text.encode()))
    await client.send(text)
    assert await close_code(client) == 1009


async def test_binary_frame_over_limit_closes_1009(start_server: Any, connect: Any) -> None:
    server = await start_server(max_message_bytes=1000)
    client = await connect(server)
    await client.send(ping_of_size(2000).encode())
    assert await close_code(client) == 1009


async def test_oversized_frame_does_not_affect_other_connections(
    start_server: Any, connect: Any
) -> None:
    server = await start_server(max_message_bytes=1000)
    good = await connect(server)
    started = await good.execute(py("import time\nfor i in range(30):\n"
                                    "    print(i, flush=True); time.sleep(0.02)\n"))
    bad = await connect(server)
    await bad.send("x" * 5000)
    assert await close_code(bad) == 1009
    outputs, completed = await good.run_to_completion(started["session_id"])
    assert join(outputs, "stdout") == "".join(f"{i}\n" for i in range(30)).encode()
    assert completed["status"] == "exited" and completed["exit_code"] == 0


# ------------------------------------------------------------------------------ /ws/mcp alias


async def test_ws_mcp_alias_speaks_native_methods_without_subprotocol(
    server: Any, connect: Any
) -> None:
    client = await connect(server, "/ws/mcp")
    await still_usable(client)
    info = await client.result("server.info")
    assert info["name"] == "ccx" and info["protocol"] == 1
    stdout, _, completed = await client.run(["echo", "alias"])
    assert stdout == b"alias\n" and completed["status"] == "exited"


# ------------------------------------------------------------------------------ JSON-RPC errors


@pytest.mark.parametrize("text", [
    "{",
    "not json",
    '{"jsonrpc": "2.0", "id": 1, "method": "ping"',
    '[{"jsonrpc": "2.0", "id": 1, "method": "ping"},',
    "{'jsonrpc': '2.0'}",
    "",
])
async def test_malformed_json_is_parse_error_with_null_id(client: RawClient, text: str) -> None:
    await client.send(text)
    with trio.fail_after(10):
        reply = await client.receive()
    assert isinstance(reply, dict), reply
    assert "id" in reply and reply["id"] is None, reply
    assert_error(reply, -32700)
    await still_usable(client)


@pytest.mark.parametrize("message", [
    {"id": 1, "method": "ping"},
    {"jsonrpc": "1.0", "id": 1, "method": "ping"},
    {"jsonrpc": 2.0, "id": 1, "method": "ping"},
    {"jsonrpc": "2.0", "id": 1},
    {"jsonrpc": "2.0", "id": 1, "method": 5},
    {"jsonrpc": "2.0", "id": 1, "method": None},
    {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": "x"},
    {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": 3},
    {"jsonrpc": "2.0", "id": {"a": 1}, "method": "ping"},
    {"jsonrpc": "2.0", "id": [1], "method": "ping"},
    {"jsonrpc": "2.0", "id": True, "method": "ping"},
    1,
    "hello",
    None,
    True,
])
async def test_invalid_request_object_is_32600(client: RawClient, message: Any) -> None:
    await client.send(json.dumps(message))
    with trio.fail_after(10):
        reply = await client.receive()
    assert isinstance(reply, dict), reply
    assert_error(reply, -32600)
    assert "id" in reply
    await still_usable(client)


async def test_unknown_method_is_32601(client: RawClient) -> None:
    reply = await client.request("no.such.method", {})
    assert_error(reply, -32601)
    assert reply["id"] == 1
    reply = await client.request("Ping")  # method names are case-sensitive
    assert_error(reply, -32601)
    await still_usable(client)


async def test_request_ids_are_echoed(client: RawClient) -> None:
    for request_id in ["abc", 0, -5, 2**40, 1.5, ""]:
        await client.send({"jsonrpc": "2.0", "id": request_id, "method": "ping"})
        with trio.fail_after(10):
            reply = await client.receive()
        assert reply["id"] == request_id and reply["result"]["pong"] is True


WRONG_PARAMS = [
    ("execute", {}),
    ("execute", {"command": 5}),
    ("execute", {"command": None}),
    ("execute", {"command": ["echo", 1]}),
    ("execute", {"command": {"argv": ["echo"]}}),
    ("execute", {"command": []}),
    ("execute", {"command": ""}),
    ("execute", {"command": "echo", "timeout": "5"}),
    ("execute", {"command": "echo", "timeout": -1}),
    ("execute", {"command": "echo", "stdin": "yes"}),
    ("execute", {"command": "echo", "shell": "no"}),
    ("execute", {"command": "echo", "cwd": 5}),
    ("execute", {"command": "echo", "env": {"A": 1}}),
    ("execute", {"command": "echo", "env": ["A=1"]}),
    ("execute", {"command": "echo", "encoding": "latin-1"}),
    ("execute", {"command": "echo", "kill_grace": "x"}),
    ("execute", {"command": "echo", "kill_grace": -1}),
    ("execute", {"command": "echo 'unbalanced"}),
    ("control", {"session_id": "$SID", "type": "STOP"}),
    ("control", {"session_id": "$SID", "type": 1}),
    ("control", {"session_id": "$SID"}),
    ("control", {"session_id": 5, "type": "PAUSE"}),
    ("input", {"session_id": "$SID", "data": 5}),
    ("input", {"session_id": "$SID"}),
    ("input", {"session_id": "$SID", "data": "x", "eof": "yes"}),
    ("input", {"session_id": "$SID", "data": "x", "encoding": "rot13"}),
    ("input", {"session_id": "$SID", "data": "!!!not base64!!!", "encoding": "base64"}),
    ("status", {}),
    ("status", {"session_id": 5}),
    ("status", {"session_id": ["$SID"]}),
]


async def test_wrong_params_are_32602_and_change_nothing(client: RawClient) -> None:
    echo = ("import os\nos.write(1, b'ready\\n')\nwhile True:\n    d = os.read(0, 4096)\n"
            "    if not d: break\n    os.write(1, d)\n")
    started = await client.execute(py(echo), stdin=True)
    sid = started["session_id"]
    with trio.fail_after(10):
        await client.notification("process.output", sid)
    problems = []
    for method, params in WRONG_PARAMS:
        params = json.loads(json.dumps(params).replace("$SID", sid))
        reply = await client.request(method, params)
        if reply.get("error", {}).get("code") != -32602:
            problems.append((method, params, reply))
        else:
            assert_error(reply, -32602)
    assert problems == [], problems
    listed = (await client.result("sessions"))["sessions"]
    assert [info["session_id"] for info in listed] == [sid]  # nothing else was started
    await trio.sleep(0.2)
    status = await client.result("status", session_id=sid)
    assert status["status"] == "running" and status["stdout_bytes"] == 6  # no input got in
    await client.result("control", session_id=sid, type="CANCEL")
    with trio.fail_after(10):
        await client.notification("process.completed", sid)


# ------------------------------------------------------------------------------ batches


async def test_batch_is_answered_with_an_array(client: RawClient) -> None:
    await client.send([
        {"jsonrpc": "2.0", "id": "a", "method": "ping"},
        {"jsonrpc": "2.0", "id": "b", "method": "no.such.method"},
        {"jsonrpc": "2.0", "method": "ping"},  # a notification: no reply
        {"jsonrpc": "2.0", "id": "c", "method": "server.info"},
        {"jsonrpc": "2.0", "id": "d", "method": "status", "params": {"session_id": "nope"}},
        5,
    ])
    with trio.fail_after(10):
        reply = await client.receive()
    assert isinstance(reply, list), reply
    assert len(reply) == 5, reply
    by_id: dict[Any, list[dict[str, Any]]] = {}
    for item in reply:
        by_id.setdefault(item.get("id"), []).append(item)
    assert by_id["a"][0]["result"]["pong"] is True
    assert_error(by_id["b"][0], -32601)
    assert by_id["c"][0]["result"]["name"] == "ccx"
    assert_error(by_id["d"][0], -32002)
    assert_error(by_id[None][0], -32600)
    await still_usable(client)


async def test_empty_batch_is_a_single_invalid_request(client: RawClient) -> None:
    await client.send("[]")
    with trio.fail_after(10):
        reply = await client.receive()
    assert isinstance(reply, dict), reply
    assert_error(reply, -32600)
    assert reply["id"] is None
    await still_usable(client)


async def test_batch_of_invalid_items_answers_each(client: RawClient) -> None:
    await client.send("[1, 2, 3]")
    with trio.fail_after(10):
        reply = await client.receive()
    assert isinstance(reply, list) and len(reply) == 3, reply
    for item in reply:
        assert_error(item, -32600)


async def test_batch_of_only_notifications_gets_no_reply(client: RawClient) -> None:
    await client.send([{"jsonrpc": "2.0", "method": "ping"},
                       {"jsonrpc": "2.0", "method": "server.info", "params": {}}])
    await client.send({"jsonrpc": "2.0", "id": "after", "method": "ping"})
    with trio.fail_after(10):
        reply = await client.receive()
    assert isinstance(reply, dict) and reply.get("id") == "after", \
        f"expected nothing for the batch of notifications, got {reply}"


async def test_notification_gets_no_reply(client: RawClient) -> None:
    await client.send({"jsonrpc": "2.0", "method": "ping"})
    await client.send({"jsonrpc": "2.0", "method": "no.such.method"})
    await client.send({"jsonrpc": "2.0", "id": "after", "method": "ping"})
    with trio.fail_after(10):
        reply = await client.receive()
    assert reply.get("id") == "after", reply


async def test_batch_with_execute_and_control(client: RawClient) -> None:
    await client.send([
        {"jsonrpc": "2.0", "id": 1, "method": "execute",
         "params": {"command": py("print('x')")}},
        {"jsonrpc": "2.0", "id": 2, "method": "ping"},
    ])
    with trio.fail_after(10):
        reply = await client.receive()
    assert isinstance(reply, list) and len(reply) == 2
    sid = next(r for r in reply if r["id"] == 1)["result"]["session_id"]
    outputs, completed = await client.run_to_completion(sid)
    assert join(outputs, "stdout") == b"x\n" and completed["status"] == "exited"


# ------------------------------------------------------------------------------ isolation


async def replies_until(client: RawClient, final_id: str) -> list[Any]:
    """Send a ping with id *final_id*; return every non-notification message received before
    its answer (batches included); notifications stay buffered in *client*."""
    await client.send({"jsonrpc": "2.0", "id": final_id, "method": "ping"})
    replies: list[Any] = []
    with trio.fail_after(10):
        while True:
            message = await client.receive()
            if isinstance(message, dict) and "method" in message:
                client.notifications.append(message)
            elif isinstance(message, dict) and message.get("id") == final_id:
                assert message["result"]["pong"] is True
                return replies
            else:
                replies.append(message)


BAD_MESSAGES: list[Any] = [
    "{",
    "[]",
    "[1, {}]",
    '"just a string"',
    {"jsonrpc": "2.0", "id": "u", "method": "nope"},
    {"jsonrpc": "2.0", "id": "p", "method": "execute", "params": {"command": 5}},
    {"jsonrpc": "2.0", "id": "s", "method": "control",
     "params": {"session_id": "nope", "type": "CANCEL"}},
    {"jsonrpc": "2.0", "id": "i", "method": "input", "params": {"session_id": "nope"}},
    {"jsonrpc": "2.0", "id": "r", "result": 5},
    {"jsonrpc": "2.0", "id": "e", "error": {"code": 1, "message": "x"}},
    b'{"jsonrpc": "2.0", "id": "bin", "method": "ping"}',
    b"\xff\xfe binary junk",
]


async def test_bad_messages_never_affect_a_streaming_session(
    start_server: Any, connect: Any
) -> None:
    """Bad messages on the session's own connection, on another connection, and an
    oversized frame on a third: the streaming session loses nothing and ends normally."""
    server = await start_server(max_message_bytes=4096)
    owner = await connect(server)
    code = "import time\nfor i in range(100):\n    print(i, flush=True); time.sleep(0.01)\n"
    started = await owner.execute(py(code))
    sid = started["session_id"]
    other = await connect(server)
    for message in BAD_MESSAGES:
        for client in (owner, other):
            await client.send(message)
    # other owns no session: omitting session_id must not reach the owner's session
    await other.send({"jsonrpc": "2.0", "id": "c", "method": "control",
                      "params": {"type": "CANCEL"}})
    too_big = await connect(server)
    await too_big.send("[" + " " * 10_000 + "]")
    assert await close_code(too_big) == 1009
    for client in (owner, other):
        replies = await replies_until(client, "end")
        errors = [r for r in replies if isinstance(r, dict) and "error" in r]
        assert errors, replies  # the bad messages were answered with errors
        assert all(isinstance(r, list | dict) for r in replies)
    outputs, completed = await owner.run_to_completion(sid)
    assert [o["seq"] for o in outputs] == list(range(len(outputs)))
    assert join(outputs, "stdout") == "".join(f"{i}\n" for i in range(100)).encode()
    assert completed["status"] == "exited" and completed["exit_code"] == 0
    # the other connection got no notification of the session
    assert not [m for m in other.notifications if m.get("method", "").startswith("process.")]


# ------------------------------------------------------------------------------ pings, metrics


async def test_server_answers_websocket_pings(client: RawClient) -> None:
    with trio.fail_after(10):
        await client.ws.ping(b"are you there")
    await still_usable(client)


async def test_lone_surrogate_in_request_id_is_echoed_as_valid_json(client: RawClient) -> None:
    """JSON may carry a lone surrogate as an escape; UTF-8 cannot: the reply escapes it."""
    await client.send('{"jsonrpc":"2.0","id":"\\ud800","method":"ping"}')
    with trio.fail_after(10):
        reply = await client.receive()
    assert reply["id"] == "\ud800" and reply["result"]["pong"] is True
    await still_usable(client)


async def test_no_websocket_extension_is_negotiated(server: Any) -> None:
    """ccx writes its text frames itself (ccx/transport/websocket.py): that is only valid
    while no extension such as permessage-deflate is in use."""
    request = (f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n"
               "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n")
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(request.encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(4096)
                assert chunk, head
                head += chunk
    lines = head.split(b"\r\n\r\n")[0].decode("latin-1").lower().split("\r\n")
    assert lines[0].split()[1] == "101", lines
    assert not [line for line in lines if line.startswith("sec-websocket-extensions")], lines


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 100_000])
def test_text_frame_header_matches_wsproto(length: int) -> None:
    from wsproto.frame_protocol import FrameProtocol

    from ccx.transport.websocket import text_frame_header

    payload = "x" * length
    expected = FrameProtocol(client=False, extensions=[]).send_data(payload, fin=True)
    assert text_frame_header(length) + payload.encode() == bytes(expected)


async def test_silent_process_not_killed_with_server_pings(start_server: Any,
                                                           connect: Any) -> None:
    server = await start_server(ws_ping_interval=0.2)
    client = await connect(server)
    stdout, _, completed = await client.run(py("import time; time.sleep(2.0); print('done')"))
    assert stdout == b"done\n"
    assert completed["status"] == "exited" and completed["exit_code"] == 0


async def test_metrics_served(server: Any) -> None:
    status, headers, body = await http_get(server.port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert body.strip()


async def test_metrics_count_what_happened(server: Any, connect: Any) -> None:
    """Sessions by status, bytes streamed, spawn failures, control latency, connections:
    parsed with prometheus_client's own parser after real activity."""
    from prometheus_client.parser import text_string_to_metric_families

    client = await connect(server)
    await client.run(py("import sys; sys.stdout.write('x' * 1000); sys.stderr.write('e' * 10)"))
    started = await client.execute(py("import time; print('ready', flush=True); time.sleep(60)"))
    await client.notification("process.output", started["session_id"])
    # the first output may be "ready" alone, its "\n" read a moment later (seen under load)
    await wait_for(lambda: server.manager.get(started["session_id"]).stdout_bytes == 6)
    await client.result("control", session_id=started["session_id"], type="PAUSE")
    await client.result("control", session_id=started["session_id"], type="RESUME")
    await client.error("execute", command=["/nonexistent/program"])
    _, _, body = await http_get(server.port, "/metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode())
               for s in family.samples}
    assert samples[("ccx_sessions", (("status", "exited"),))] == 1
    assert samples[("ccx_sessions", (("status", "running"),))] == 1
    assert samples[("ccx_connections", ())] == 1
    assert samples[("ccx_sessions_started_total", ())] == 2
    assert samples[("ccx_spawn_failures_total", ())] == 1
    assert samples[("ccx_output_bytes_total", (("stream", "stdout"),))] == 1000 + len("ready\n")
    assert samples[("ccx_output_bytes_total", (("stream", "stderr"),))] == 10
    assert samples[("ccx_control_latency_seconds_count", (("type", "PAUSE"),))] == 1
    assert samples[("ccx_control_latency_seconds_count", (("type", "RESUME"),))] == 1
    await client.result("control", session_id=started["session_id"], type="CANCEL")


async def test_metrics_need_the_token_when_one_is_set(start_server: Any) -> None:
    server = await start_server(token="tok")
    status, _, _ = await http_get(server.port, "/metrics")
    assert status == 401
    status, _, _ = await http_get(server.port, "/metrics", {"Authorization": "Bearer nope"})
    assert status == 401
    status, _, _ = await http_get(server.port, "/metrics", {"Authorization": "Bearer tok"})
    assert status == 200
    status, _, _ = await http_get(server.port, "/metrics?token=tok")
    assert status == 200


@pytest.mark.parametrize("method,target,expected", [
    ("POST", "/nope", 404),
    ("PUT", "/nope/", 404),
    ("PUT", "/", 405),  # the web console's page: GET and HEAD only
    ("POST", "/ws", 426),
])
async def test_other_plain_requests(server: Any, method: str, target: str,
                                    expected: int) -> None:
    status, _, _ = await http_get(server.port, target, {"Content-Length": "0"}, method=method)
    assert status == expected


# ------------------------------------------------------------------------------ configuration


def test_settings_defaults_match_section_6() -> None:
    from ccx.config import Settings

    settings = Settings.from_env({})
    assert (settings.host, settings.port) == ("127.0.0.1", 8003)
    assert settings.token is None
    assert settings.allowed_commands is None
    assert settings.allow_shell is False
    assert settings.max_sessions == 64
    assert settings.max_sessions_per_connection == 16
    assert settings.max_message_bytes == 1048576
    assert settings.kill_grace == 5
    assert settings.ws_ping_interval == 0
    assert settings.log_level == "info"
    assert settings.log_format == "json"


def test_settings_from_environment() -> None:
    from ccx.config import Settings

    settings = Settings.from_env({
        "CCX_HOST": "::1", "CCX_PORT": "9001", "CCX_TOKEN": "t",
        "CCX_ALLOWED_COMMANDS": "echo,/bin/cat", "CCX_ALLOW_SHELL": "1",
        "CCX_ALLOWED_ORIGINS": "https://a.example,https://b.example",
        "CCX_MAX_SESSIONS": "7", "CCX_MAX_SESSIONS_PER_CONNECTION": "3",
        "CCX_MAX_MESSAGE_BYTES": "2048", "CCX_KILL_GRACE": "1.5", "CCX_WS_PING_INTERVAL": "10",
        "CCX_LOG_LEVEL": "debug", "CCX_LOG_FORMAT": "console",
    })
    assert settings.host == "::1" and settings.port == 9001 and settings.token == "t"
    assert settings.allowed_commands == ("echo", "/bin/cat")
    assert settings.allow_shell is True
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert (settings.max_sessions, settings.max_sessions_per_connection) == (7, 3)
    assert settings.max_message_bytes == 2048 and settings.kill_grace == 1.5
    assert settings.ws_ping_interval == 10
    assert (settings.log_level, settings.log_format) == ("debug", "console")


def test_token_required_for_non_loopback_bind() -> None:
    from ccx.config import ConfigError, Settings

    with pytest.raises(ConfigError):
        Settings.from_env({"CCX_HOST": "0.0.0.0"}).check_exposure()
    Settings.from_env({"CCX_HOST": "0.0.0.0", "CCX_TOKEN": "t"}).check_exposure()
    Settings.from_env({"CCX_HOST": "0.0.0.0", "CCX_INSECURE": "1"}).check_exposure()
    Settings.from_env({"CCX_HOST": "127.0.0.1"}).check_exposure()


@pytest.mark.parametrize(("origin", "allowed"), [
    ("http://localhost", True), ("http://127.0.0.1:8080", True), ("http://[::1]:99", True),
    ("https://localhost", True), ("http://evil@localhost", False), ("http://[::1]evil", False),
    ("http://localhost.evil.com", False), ("http://localhost/path", False), ("null", False),
])
def test_origin_check_is_strict_about_loopback(origin: str, allowed: bool) -> None:
    from ccx.config import Settings
    from ccx.transport.websocket import origin_ok

    assert origin_ok(Settings(), origin) is allowed


async def test_no_data_frame_follows_the_close_frame() -> None:
    """RFC 6455 5.5.1: after its Close frame, an endpoint sends no data frame. The server's
    own writer (`FrameStream.send_text_frame`) must not write one in the window between
    trio-websocket writing Close and the close handshake ending (`ws.closed` still None):
    a client that reads the Close and then a text frame fails (wsproto raises), which is
    how `ccx run` once exited 69 instead of 143 at a server's SIGTERM."""
    import wsproto.frame_protocol

    from ccx.transport.websocket import FrameStream

    left, right = trio.socket.socketpair()
    server_side = FrameStream(trio.SocketStream(left), b"")
    client = trio.SocketStream(right)
    assert await server_side.send_text_frame(b'{"a":1}')
    # trio-websocket's aclose() writes its Close frame through the same stream's send_all
    close = wsproto.frame_protocol.FrameProtocol(client=False, extensions=[]).close(
        1001, "server shutdown")
    await server_side.send_all(close)
    assert not await server_side.send_text_frame(b'{"late":true}'), "a frame after Close"
    await server_side.aclose()
    received = b""
    while chunk := await client.receive_some(65536):
        received += chunk
    peer = wsproto.frame_protocol.FrameProtocol(client=True, extensions=[])
    peer.receive_bytes(received)
    opcodes = [frame.opcode for frame in peer.received_frames()]
    assert opcodes == [wsproto.frame_protocol.Opcode.TEXT, wsproto.frame_protocol.Opcode.CLOSE]


async def test_the_client_survives_a_peer_that_sends_data_after_close() -> None:
    """A server (or proxy) that breaks RFC 6455 5.5.1 by sending a text frame after its
    Close: ccx's client sees a closed connection (`ConnectionLost` for a call), never an
    exception group escaping `connect()` (what made `ccx run` exit 69)."""
    import base64 as b64
    import hashlib as hl

    import wsproto.frame_protocol

    from ccx.client import ConnectionLost, connect

    frames = wsproto.frame_protocol.FrameProtocol(client=False, extensions=[])

    async def broken_server(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = b64.b64encode(hl.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11")
                               .digest())
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept +
                              b"\r\n\r\n")
        await stream.receive_some(4096)  # the client's request
        await stream.send_all(frames.close(1001, "bye") + frames.send_data('{"late":1}', True))
        with trio.move_on_after(5):
            while await stream.receive_some(4096):
                pass
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, broken_server, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(10):
            async with connect(f"ws://127.0.0.1:{port}/ws") as client:
                with pytest.raises(ConnectionLost):
                    await client.call("ping")
        nursery.cancel_scope.cancel()
