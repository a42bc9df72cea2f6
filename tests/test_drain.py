"""PROTOCOL.md 10, readiness and drain (in-process servers): `/ready`, the `drain` method,
-32007 for `execute` while draining (MCP: an `isError` result naming the node), everything
else (control, input, status, watch, attach, MCP reads) still served, a drain timeout cancelling with `reason: "drain"`, `undo`; node-named
ids with an incarnation. Signals to a real `ccx serve` are in tests/test_drain_signals.py.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from conftest import RawClient, completion, http_get, py, start_ready
from test_mcp_http import open_session

from ccx.server import Server

Connect = Callable[..., Awaitable[RawClient]]
StartServer = Callable[..., Awaitable[Server]]
READY_THEN_LINES = py("import sys\nprint('ready', flush=True)\n"
                      "for line in sys.stdin: print('got', line.strip(), flush=True)")
SLEEPS = py("import time; print('ready', flush=True); time.sleep(1000)")


async def _ready(server: Server) -> tuple[int, dict[str, Any]]:
    status, _, body = await http_get(server.port or 0, "/ready")
    return status, json.loads(body)


async def test_draining_node_refuses_execute_and_serves_the_rest(
        start_server: StartServer, connect: Connect) -> None:
    server = await start_server(node_name="ccx-0")
    client = await connect(server)
    assert await _ready(server) == (200, {"ready": True})
    started = await start_ready(client, READY_THEN_LINES, stdin=True)
    sid = started["session_id"]

    assert await client.result("drain") == {"draining": True, "sessions": 1}
    assert await _ready(server) == (503, {"ready": False, "reason": "draining"})
    status, _, _ = await http_get(server.port or 0, "/health")
    assert status == 200  # liveness is not readiness
    error = await client.error("execute", {"command": ["true"]})
    assert error["code"] == -32007 and error["data"] == {"node": "ccx-0"}, error
    assert error["message"] == "node draining", error  # PROTOCOL.md 10's words
    # -32007 comes before any other check (a router may re-route on it)
    for params in ({"command": ["no-such-binary-xyz"]}, {"command": ["true"], "timeout": -1}):
        error = await client.error("execute", params)
        assert error["code"] == -32007, (params, error)
    info = await client.result("server.info")
    assert info["draining"] is True and info["node"] == "ccx-0"
    assert info["busy"] == 1  # the count drain gives, read-only

    # control, input, status, attach (from another connection) all still work
    await client.result("input", {"session_id": sid, "data": "hello\n"})
    seen = ""
    with trio.fail_after(10):
        while "got hello" not in seen:
            seen += (await client.notification("process.output", sid))["data"]
    assert (await client.result("control", {"session_id": sid, "type": "PAUSE"}))[
        "status"] == "paused"
    assert (await client.result("control", {"session_id": sid, "type": "RESUME"}))[
        "status"] == "running"
    watcher = await connect(server)  # watch (PROTOCOL.md 11) works while draining too
    watched = await watcher.result("watch", {"session_id": sid})
    assert watched["session_id"] == sid and watched["status"] == "running"
    other = await connect(server)
    attached = await other.result("attach", {"session_id": sid, "since_seq": 0})
    assert attached["session_id"] == sid
    await other.result("input", {"session_id": sid, "data": "again\n"})
    seen = ""
    with trio.fail_after(10):  # the watcher sees the new owner's output
        while "got again" not in seen:
            seen += (await watcher.notification("process.output", sid))["data"]

    # MCP: reads work, execute and start are tool errors naming the node
    mcp = await connect(server, "/ws", subprotocols=["mcp"])
    await mcp.result("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                    "clientInfo": {"name": "raw", "version": "0"}})
    await mcp.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    for tool in ("execute", "start"):
        result = await mcp.result("tools/call", {"name": tool,
                                                 "arguments": {"command": ["true"]}})
        assert result["isError"] and "ccx-0" in result["content"][0]["text"], result
    listed = await mcp.result("tools/call", {"name": "list_sessions", "arguments": {}})
    assert not listed["isError"] and sid in listed["content"][0]["text"]

    # undo: new sessions again
    assert (await other.result("drain", {"undo": True}))["draining"] is False
    assert await _ready(server) == (200, {"ready": True})
    started_again = await other.execute(["true"])
    await completion(other, started_again["session_id"])


async def test_ready_says_full_at_the_session_limit(
        start_server: StartServer, connect: Connect) -> None:
    server = await start_server(max_sessions=1)
    client = await connect(server)
    started = await start_ready(client, SLEEPS)
    assert await _ready(server) == (503, {"ready": False, "reason": "full"})
    await client.result("control", {"session_id": started["session_id"], "type": "CANCEL"})
    done = await completion(client, started["session_id"])
    assert "reason" not in done  # a client's cancel: the node did not end it
    assert await _ready(server) == (200, {"ready": True})


async def test_drain_timeout_cancels_with_reason_drain_and_undo_calls_it_off(
        start_server: StartServer, connect: Connect) -> None:
    server = await start_server()
    client = await connect(server)
    first = await start_ready(client, SLEEPS)
    # a timeout called off by undo cancels nothing (checking that something does not
    # happen takes waiting past the moment it would have happened)
    await client.result("drain", {"timeout": 0.2})
    await client.result("drain", {"undo": True})
    await trio.sleep(0.5)
    assert (await client.result("status", {"session_id": first["session_id"]}))[
        "status"] == "running"
    second = await start_ready(client, SLEEPS)
    result = await client.result("drain", {"timeout": 0.3})
    assert result == {"draining": True, "sessions": 2}
    for sid in (first["session_id"], second["session_id"]):
        done = await completion(client, sid)
        assert done["status"] == "cancelled" and done["reason"] == "drain", done
    info = await client.result("server.info")
    assert info["draining"] is True and info["busy"] == 0  # stays draining until undone
    assert (await client.result("drain"))["sessions"] == 0


async def test_bad_drain_params(start_server: StartServer, connect: Connect) -> None:
    server = await start_server()
    client = await connect(server)
    for params in ({"timeout": -1}, {"timeout": "5"}, {"undo": 1}):
        error = await client.error("drain", params)
        assert error["code"] == -32602, (params, error)


async def test_ids_carry_node_and_incarnation(start_server: StartServer,
                                              connect: Connect) -> None:
    one = await start_server(node_name="ccx-1")
    two = await start_server(node_name="ccx-1")  # a restart of the same node
    plain = await start_server()
    seen = []
    for server in (one, two):
        client = await connect(server)
        info = await client.result("server.info")
        incarnation = info["incarnation"]
        assert isinstance(incarnation, str) and incarnation and "." not in incarnation
        started = await client.execute(["true"])
        assert started["session_id"].startswith(f"ccx-1.{incarnation}."), started
        await completion(client, started["session_id"])
        seen.append(incarnation)
    assert seen[0] != seen[1]
    mcp_session = await open_session(two)  # Mcp-Session-Id: the same prefix
    assert mcp_session.startswith(f"ccx-1.{seen[1]}."), mcp_session
    client = await connect(plain)
    info = await client.result("server.info")
    assert info["node"] is None and info["incarnation"] is None and info["draining"] is False
    started = await client.execute(["true"])
    assert "." not in started["session_id"]
    await completion(client, started["session_id"])
