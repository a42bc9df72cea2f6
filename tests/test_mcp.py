"""MCP (PROTOCOL.md section 7) driven by the official MCP Python SDK, plus raw protocol checks.

Rules: servers bind 127.0.0.1 on port 0; children are real processes; every test has a
deadline (pytest-timeout, and `anyio.fail_after` inside SDK code); every server fixture asserts
that no process group it started is alive at teardown.
The SDK's WebSocket client is built on the asyncio `websockets` package, so SDK code runs in a
worker thread under `anyio.run(..., backend="asyncio")` while the trio server runs here.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
from conftest import RawClient, group_alive, proc_stat, py, wait_for
from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client
from mcp.client.websocket import websocket_client

from ccx.server import Server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # websocket_client

CCX = str(Path(sys.executable).with_name("ccx"))
SDK_DEADLINE_S = 30
TOOL_NAMES = {"execute", "start", "read_output", "send_input", "pause", "resume", "cancel",
              "list_sessions"}
# Prints "tick N" every 50 ms until killed.
TICKER = py("import time, sys\nfor i in range(100000):\n"
            "    print('tick', i, flush=True); time.sleep(0.05)")
# Echoes each stdin line, upper-cased, until EOF.
ECHO = py("import sys\nfor line in sys.stdin:\n    print(line.upper(), end='', flush=True)")

Connect = Callable[..., Awaitable[RawClient]]
SdkMain = Callable[[ClientSession], Awaitable[Any]]


async def in_sdk(transport: Callable[[], AbstractAsyncContextManager[Any]], main: SdkMain,
                 **session_kw: Any) -> Any:
    """Run *main* with an initialized SDK `ClientSession`, in asyncio, in a worker thread."""

    async def go() -> Any:
        with anyio.fail_after(SDK_DEADLINE_S):
            async with transport() as streams, ClientSession(streams[0], streams[1],
                                                             **session_kw) as session:
                await session.initialize()
                return await main(session)

    return await trio.to_thread.run_sync(functools.partial(anyio.run, go, backend="asyncio"))


def ws(server: Server, path: str = "/ws") -> Callable[[], AbstractAsyncContextManager[Any]]:
    return lambda: websocket_client(f"ws://127.0.0.1:{server.port}{path}")


def structured(result: types.CallToolResult) -> dict[str, Any]:
    assert not result.isError, result.content
    assert result.structuredContent is not None
    assert json.loads(result.content[0].text) == result.structuredContent  # type: ignore[union-attr]
    return result.structuredContent


async def read_all(session: ClientSession, session_id: str) -> dict[str, Any]:
    """read_output from 0 until eof; returns the joined output and the last answer."""
    out, err, offsets, last = "", "", (0, 0), {}
    while not last.get("eof"):
        last = structured(await session.call_tool("read_output", {
            "session_id": session_id, "stdout_offset": offsets[0], "stderr_offset": offsets[1],
            "wait_s": 5}))
        out, err = out + last["stdout"], err + last["stderr"]
        offsets = (last["next_stdout_offset"], last["next_stderr_offset"])
    return {**last, "stdout": out, "stderr": err}


# ---------------------------------------------------------------------------- SDK: WebSocket


async def every_tool(session: ClientSession) -> dict[str, Any]:
    """Call every tool once or more through the SDK; return the pids it started."""
    init = session.get_server_capabilities()
    assert init is not None and init.tools is not None and init.logging is not None
    listed = await session.list_tools()
    assert {t.name for t in listed.tools} == TOOL_NAMES
    assert all(t.inputSchema["type"] == "object" and t.outputSchema for t in listed.tools)
    await session.set_logging_level("info")

    done = structured(await session.call_tool("execute", {"command": ["echo", "hi"]}))
    assert done["status"] == "exited" and done["exit_code"] == 0
    assert done["stdout"] == "hi\n" and done["stdout_omitted_bytes"] == 0

    fed = structured(await session.call_tool("execute", {"command": "cat", "input": "é\n"}))
    assert fed["stdout"] == "é\n"

    big = structured(await session.call_tool("execute", {
        "command": py("import sys; sys.stdout.write('x' * 100000 + 'END'); "
                      "sys.stderr.write('oops'); sys.exit(3)"),
        "tail_bytes": 10}))
    assert big["exit_code"] == 3 and big["stderr"] == "oops"
    assert big["stdout"] == "[99993 bytes omitted]\nxxxxxxxEND"
    assert big["stdout_bytes"] == 100003 and big["stdout_omitted_bytes"] == 99993

    slow = structured(await session.call_tool("execute", {"command": ["sleep", "30"],
                                                         "timeout": 0.3}))
    assert slow["status"] == "timeout"

    missing = await session.call_tool("execute", {"command": "no-such-program-ccx"})
    assert missing.isError and "not found" in missing.content[0].text  # type: ignore[union-attr]
    bad = await session.call_tool("start", {"command": 42})
    assert bad.isError and "command" in bad.content[0].text  # type: ignore[union-attr]
    unknown = await session.call_tool("read_output", {"session_id": "nope"})
    assert unknown.isError and "unknown session" in unknown.content[0].text  # type: ignore[union-attr]

    started = structured(await session.call_tool("start", {"command": ECHO, "stdin": True,
                                                           "tag": "echo"}))
    sid = started["session_id"]
    sent = structured(await session.call_tool("send_input", {"session_id": sid,
                                                             "data": "hello\n"}))
    assert sent["bytes"] == 6
    first = structured(await session.call_tool("read_output", {"session_id": sid,
                                                               "wait_s": 10}))
    assert first["stdout"] == "HELLO\n" and not first["ended"]
    paused = structured(await session.call_tool("pause", {"session_id": sid}))
    assert paused["status"] == "paused"
    state = proc_stat(started["pid"])
    assert state is not None and state[0] == "T"
    resumed = structured(await session.call_tool("resume", {"session_id": sid}))
    assert resumed["status"] == "running"
    listed_sessions = structured(await session.call_tool("list_sessions", {"tag": "echo"}))
    assert [s["session_id"] for s in listed_sessions["sessions"]] == [sid]
    await session.call_tool("send_input", {"session_id": sid, "data": "bye\n", "eof": True})
    rest = await read_all_from(session, sid, first)
    assert rest["stdout"] == "BYE\n" and rest["status"] == "exited"

    ticker = structured(await session.call_tool("start", {"command": TICKER}))
    seen = {"stdout": "", "next_stdout_offset": 0}
    while "\n" not in seen["stdout"]:  # the child may write a line in several pieces
        seen = structured(await session.call_tool("read_output", {
            "session_id": ticker["session_id"], "wait_s": 10,
            "stdout_offset": seen["next_stdout_offset"] - len(seen["stdout"])}))
    cancelled = structured(await session.call_tool("cancel",
                                                   {"session_id": ticker["session_id"]}))
    assert cancelled["status"] == "cancelling"
    end = await read_all(session, ticker["session_id"])
    assert end["status"] == "cancelled" and end["stdout"].startswith("tick 0\n")
    assert end["exit_code"] is None
    # Quiet the server's log notifications before leaving: the SDK 1.x websocket client's
    # reader raises BrokenResourceError (an ExceptionGroup out of `websocket_client`) when a
    # message arrives after the ClientSession closed (the stdio client had the same bug,
    # python-sdk PR #1749). Once setLevel is answered, no log can still be on the way.
    await session.set_logging_level("emergency")
    return {"echo_pid": started["pid"], "ticker_pid": ticker["pid"]}


async def test_sdk_websocket_lifecycle_and_every_tool(server: Server) -> None:
    logs: list[types.LoggingMessageNotificationParams] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params)

    pids = await in_sdk(ws(server), every_tool, logging_callback=on_log)
    assert not group_alive(pids["echo_pid"]) and not group_alive(pids["ticker_pid"])
    events = {(p.logger, p.data.get("event")) for p in logs}
    assert ("ccx.session", "completed") in events, events
    assert all(p.level in ("info", "warning", "error") for p in logs)


async def read_all_from(session: ClientSession, sid: str, last: dict[str, Any]) -> dict[str, Any]:
    out = ""
    while not last["eof"]:
        last = structured(await session.call_tool("read_output", {
            "session_id": sid, "stdout_offset": last["next_stdout_offset"],
            "stderr_offset": last["next_stderr_offset"], "wait_s": 5}))
        out += last["stdout"]
    return {**last, "stdout": out}


async def progress_then_cancel(session: ClientSession) -> dict[str, Any]:
    """A long execute: progress carries its output; notifications/cancelled ends it."""
    progress: list[tuple[float, str | None]] = []
    enough = anyio.Event()

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))
        if len(progress) >= 3:
            enough.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(functools.partial(session.call_tool, "execute",
                                           {"command": TICKER},
                                           progress_callback=on_progress))
        await enough.wait()
        request_id = session._request_id - 1  # the execute call: the last request sent
        await session.send_notification(types.ClientNotification(types.CancelledNotification(
            params=types.CancelledNotificationParams(requestId=request_id,
                                                     reason="test"))))
        tasks.cancel_scope.cancel()  # the server sends no response to a cancelled request
    values = [value for value, _ in progress]
    assert values == sorted(set(values)), "progress must increase"
    text = "".join(message or "" for _, message in progress)
    assert text.startswith("tick 0\ntick 1\n"), text
    for _ in range(100):
        sessions = structured(await session.call_tool("list_sessions", {}))["sessions"]
        if sessions and sessions[0]["status"] == "cancelled":
            return dict(sessions[0])
        await anyio.sleep(0.05)
    raise AssertionError(f"execute's session was not cancelled: {sessions}")


async def test_sdk_execute_progress_then_cancelled_notification(server: Server) -> None:
    info = await in_sdk(ws(server), progress_then_cancel)
    assert not group_alive(info["pgid"])


@pytest.mark.parametrize("path", ["/ws/mcp", "/mcp"])
async def test_sdk_websocket_other_paths(server: Server, path: str) -> None:
    async def main(session: ClientSession) -> Any:
        return structured(await session.call_tool("execute", {"command": ["echo", path]}))

    assert (await in_sdk(ws(server, path), main))["stdout"] == f"{path}\n"


# ---------------------------------------------------------------------------- SDK: stdio


async def test_sdk_stdio_tools_progress_and_sessions_die_with_stdin() -> None:
    params = StdioServerParameters(command=CCX, args=["mcp", "--kill-grace", "1"])

    async def main(session: ClientSession) -> dict[str, Any]:
        messages: list[str] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            messages.append(message or "")

        done = structured(await session.call_tool(
            "execute", {"command": py("import time\nfor i in range(3):\n"
                                      "    print(i, flush=True); time.sleep(0.2)")},
            progress_callback=on_progress))
        assert done["stdout"] == "0\n1\n2\n" and "".join(messages) == "0\n1\n2\n"
        assert len(messages) >= 2, messages
        return structured(await session.call_tool("start", {"command": ["sleep", "60"]}))

    started = await in_sdk(lambda: stdio_client(params), main)
    # Leaving the SDK context closed `ccx mcp`'s stdin: it cancels its sessions and exits.
    await wait_for(lambda: not group_alive(started["pid"]), timeout=10)


# ---------------------------------------------------------------------------- raw protocol


async def mcp_client(connect: Connect, server: Server, path: str = "/ws") -> RawClient:
    client = await connect(server, path, subprotocols=["mcp"])
    assert client.ws.subprotocol == "mcp"
    return client


async def initialize(client: RawClient, version: str = "2025-11-25") -> dict[str, Any]:
    result = await client.result("initialize", {"protocolVersion": version, "capabilities": {},
                                                "clientInfo": {"name": "raw", "version": "0"}})
    await client.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    return result


async def test_requests_before_initialize_are_refused(server: Server, connect: Connect) -> None:
    client = await mcp_client(connect, server)
    error = await client.error("tools/list")
    assert error["code"] == -32600 and "initialize" in error["message"]
    assert await client.result("ping") == {}  # ping is allowed at any time
    batch_init = [{"jsonrpc": "2.0", "id": 9, "method": "initialize",
                   "params": {"protocolVersion": "2025-11-25"}}]
    await client.send(batch_init)
    reply = await client.receive()
    assert reply[0]["error"]["code"] == -32600
    await initialize(client)
    again = await client.error("initialize", {"protocolVersion": "2025-11-25"})
    assert "already initialized" in again["message"]
    assert (await client.error("tools/call", {"name": "rm"}))["code"] == -32602
    assert (await client.error("resources/list"))["code"] == -32601
    assert (await client.error("logging/setLevel", {"level": "loud"}))["code"] == -32602


@pytest.mark.parametrize(("asked", "agreed"), [
    ("2025-11-25", "2025-11-25"), ("2025-06-18", "2025-06-18"), ("2025-03-26", "2025-03-26"),
    ("2024-11-05", "2024-11-05"), ("2099-01-01", "2025-11-25"), ("1.0", "2025-11-25"),
])
async def test_version_negotiation(server: Server, connect: Connect, asked: str,
                                   agreed: str) -> None:
    client = await mcp_client(connect, server, "/mcp")
    result = await initialize(client, asked)
    assert result["protocolVersion"] == agreed
    assert result["serverInfo"]["name"] == "ccx" and result["serverInfo"]["version"]
    assert set(result["capabilities"]) == {"tools", "logging"} and result["instructions"]
    tools = (await client.result("tools/list"))["tools"]
    call = await client.result("tools/call", {"name": "execute",
                                              "arguments": {"command": ["true"]}})
    modern = agreed >= "2025-06-18"
    assert all(("outputSchema" in t) is modern for t in tools)
    assert ("structuredContent" in call) is modern and call["isError"] is False


async def test_no_subprotocol_speaks_native(server: Server, connect: Connect) -> None:
    client = await connect(server, "/ws/mcp")
    assert client.ws.subprotocol is None
    assert (await client.result("ping"))["pong"] is True


async def test_unread_output_throttles_the_child_and_nothing_is_lost(
        start_server: Callable[..., Awaitable[Server]], connect: Connect) -> None:
    server = await start_server(mcp_buffer_bytes=64 * 1024, replay_bytes=64 * 1024)
    client = await mcp_client(connect, server)
    await initialize(client)
    total = 4 * 1024 * 1024
    code = (f"import sys\nfor i in range({total // 64}):\n"
            "    sys.stdout.write(f'{i:063d}\\n')")
    started = await client.result("tools/call", {"name": "start",
                                                 "arguments": {"command": py(code)}})
    sid = started["structuredContent"]["session_id"]
    session = server.manager.get(sid)
    await trio.sleep(1.0)
    held = session.stdout_bytes
    assert held < total // 2, f"child was not throttled: {held} bytes read from it"
    offset, chunks = 0, []
    while True:
        reply = await client.result("tools/call", {"name": "read_output", "arguments": {
            "session_id": sid, "stdout_offset": offset, "wait_s": 5, "max_bytes": 1 << 20}})
        data = reply["structuredContent"]
        chunks.append(data["stdout"])
        offset = data["next_stdout_offset"]
        if data["eof"]:
            break
    out = "".join(chunks)
    assert len(out) == total and out.endswith(f"{total // 64 - 1:063d}\n")
    assert out == "".join(f"{i:063d}\n" for i in range(total // 64))
    stale = await client.result("tools/call", {"name": "read_output", "arguments": {
        "session_id": sid, "stdout_offset": 0}})
    assert stale["isError"] and "already read" in stale["content"][0]["text"]


async def test_closing_the_connection_kills_its_sessions(server: Server,
                                                         connect: Connect) -> None:
    client = await mcp_client(connect, server)
    await initialize(client)
    reply = await client.result("tools/call", {"name": "start",
                                               "arguments": {"command": ["sleep", "60"]}})
    pid = reply["structuredContent"]["pid"]
    assert group_alive(pid)
    await client.ws.aclose()
    await wait_for(lambda: not group_alive(pid), timeout=10)


async def test_allow_list_applies(start_server: Callable[..., Awaitable[Server]],
                                  connect: Connect) -> None:
    server = await start_server(allowed_commands=("echo",))
    client = await mcp_client(connect, server)
    await initialize(client)
    refused = await client.result("tools/call", {"name": "execute",
                                                 "arguments": {"command": ["true"]}})
    assert refused["isError"] and "not allowed" in refused["content"][0]["text"]
    shell = await client.result("tools/call", {"name": "start", "arguments": {
        "command": "echo hi", "shell": True}})
    assert shell["isError"] and "shell" in shell["content"][0]["text"]
