"""Lingering MCP sessions (issue 9, last bullet): `start` with `linger` survives its MCP
connection or HTTP session; a later MCP client picks it up with `read_output`.

Rules: servers bind 127.0.0.1 on port 0; children are real processes; every test has a
deadline; every server fixture asserts that no process group it started is alive at teardown.
SDK clients run in a worker thread under asyncio (see tests/test_mcp.py); the rest use raw
WebSocket clients with the `mcp` subprotocol.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from conftest import RawClient, group_alive, py, wait_for
from mcp import ClientSession
from test_mcp import CCX, TICKER, in_sdk, initialize, mcp_client, structured, ws
from test_mcp_http import http

from ccx.server import Server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # websocket_client

Connect = Callable[..., Awaitable[RawClient]]
ServerFactory = Callable[..., Awaitable[Server]]
LINES = 30000  # 30000 lines of 10 bytes: 300 kB, far more than the small buffers below
BIG = py(f"import sys\nfor i in range({LINES}):\n    sys.stdout.write(f'{{i:09d}}\\n')\n"
         "sys.stderr.write('done')")
EXPECTED = "".join(f"{i:09d}\n" for i in range(LINES))


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def tool(client: RawClient, name: str, **arguments: Any) -> dict[str, Any]:
    reply = await client.result("tools/call", {"name": name, "arguments": arguments})
    assert not reply["isError"], reply["content"]
    return dict(reply["structuredContent"])


async def tool_error(client: RawClient, name: str, **arguments: Any) -> str:
    reply = await client.result("tools/call", {"name": name, "arguments": arguments})
    assert reply["isError"], reply
    return str(reply["content"][0]["text"])


async def sdk_read_rest(session: ClientSession, sid: str, offsets: tuple[int, int]) -> dict[
        str, Any]:
    """read_output from *offsets* until eof: the joined output and the last answer."""
    out, err, last = "", "", {"next_stdout_offset": offsets[0],
                              "next_stderr_offset": offsets[1], "eof": False}
    while not last["eof"]:
        last = structured(await session.call_tool("read_output", {
            "session_id": sid, "stdout_offset": last["next_stdout_offset"],
            "stderr_offset": last["next_stderr_offset"], "wait_s": 5, "max_bytes": 50000}))
        out, err = out + last["stdout"], err + last["stderr"]
    return {**last, "stdout": out, "stderr": err}


async def start_and_read_some(session: ClientSession) -> dict[str, Any]:
    """start BIG with linger, read its first bytes, and leave (the client closes)."""
    started = structured(await session.call_tool("start", {
        "command": BIG, "linger": 30, "tag": "longhaul"}))
    assert started["linger"] == 30
    first = structured(await session.call_tool("read_output", {
        "session_id": started["session_id"], "wait_s": 5, "max_bytes": 1000}))
    assert first["stdout"] and EXPECTED.startswith(first["stdout"])
    return {**started, "first": first}


async def pick_up(session: ClientSession, before: dict[str, Any]) -> dict[str, Any]:
    """A new client: find the session, read on from the last offsets until eof."""
    sid = before["session_id"]
    listed = structured(await session.call_tool("list_sessions", {"tag": "longhaul"}))
    (info,) = listed["sessions"]
    assert info["session_id"] == sid and info["linger"] == 30 and info["attached"] is False
    assert info["stdout_offset"] == 0, info  # the first read acknowledged nothing yet
    first = before["first"]
    rest = await sdk_read_rest(session, sid, (first["next_stdout_offset"],
                                              first["next_stderr_offset"]))
    again = structured(await session.call_tool("list_sessions", {"tag": "longhaul"}))
    return {**rest, "attached": again["sessions"][0]["attached"]}


async def check_picked_up(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["status"] == "exited" and after["exit_code"] == 0
    assert after["attached"] is True
    whole = before["first"]["stdout"] + after["stdout"]
    assert len(whole) == len(EXPECTED) and sha(whole) == sha(EXPECTED), "bytes lost or repeated"
    assert after["stderr"] == "done"


async def test_sdk_websocket_linger_survives_the_client(start_server: ServerFactory) -> None:
    # Small buffers: when the first client goes, an append is blocked on a full buffer and
    # output waits in the session's outbox; the hand-over must neither lose nor repeat it.
    server = await start_server(mcp_buffer_bytes=4096, replay_bytes=16384)
    before = await in_sdk(ws(server), start_and_read_some)
    session = server.manager.get(before["session_id"])
    await wait_for(lambda: session.owner is None)  # detached, not cancelled
    # Not "still running": the session channel may have taken the child's last bytes under
    # load. check_picked_up proves it was not cancelled (status exited, every byte there).
    assert session.state.value in ("running", "exited"), session.state
    await wait_for(lambda: server.manager.mcp_buffers[before["session_id"]].full)
    await trio.sleep(0.2)  # more output waits in the outbox while nobody is attached
    after = await in_sdk(ws(server), lambda s: pick_up(s, before))
    await check_picked_up(before, after)


async def test_sdk_http_delete_keeps_a_lingering_session(start_server: ServerFactory) -> None:
    server = await start_server(mcp_buffer_bytes=4096, replay_bytes=16384)
    before = await in_sdk(http(server), start_and_read_some)  # leaving it sends DELETE
    await wait_for(lambda: not server.mcp_http.sessions)
    # The claim is "not cancelled", not "still running" (the child may have finished into
    # the session's buffers under load); check_picked_up asserts status exited, every byte.
    state = server.manager.get(before["session_id"]).state.value
    assert state in ("running", "exited"), state
    after = await in_sdk(http(server), lambda s: pick_up(s, before))
    await check_picked_up(before, after)


async def test_http_idle_expiry_keeps_a_lingering_session(start_server: ServerFactory) -> None:
    server = await start_server(mcp_http_idle=0.1)

    async def main(session: ClientSession) -> dict[str, Any]:
        return structured(await session.call_tool("start", {"command": TICKER, "linger": 30}))

    async def read_it(session: ClientSession) -> dict[str, Any]:
        return structured(await session.call_tool("read_output", {
            "session_id": started["session_id"], "wait_s": 5}))

    started = await in_sdk(http(server), main)
    await wait_for(lambda: not server.mcp_http.sessions)
    assert group_alive(started["pid"])
    read = await in_sdk(http(server), read_it)
    assert read["status"] == "running" and read["stdout"].startswith("tick"), read
    # Now the new HTTP session owns it; it goes idle and is ended: the session lingers again.
    await trio.sleep(0.2)
    server.mcp_http._end_idle()  # what the sweeper does every SWEEP_INTERVAL_S
    assert not server.mcp_http.sessions and group_alive(started["pid"])
    assert server.manager.get(started["session_id"]).owner is None
    server.manager.get(started["session_id"]).cancel()


async def test_linger_expiry_cancels_and_completion_is_kept(server: Server,
                                                            connect: Connect) -> None:
    first = await mcp_client(connect, server)
    await initialize(first)
    started = await tool(first, "start", command=TICKER, linger=0.5)
    await first.ws.aclose()
    with trio.fail_after(10):  # ccx's own state: the task ends after the kill path
        await server.manager.get(started["session_id"]).wait_done()
    assert not group_alive(started["pid"])
    second = await mcp_client(connect, server)
    await initialize(second)
    (info,) = (await tool(second, "list_sessions"))["sessions"]
    assert info["status"] == "cancelled" and info["attached"] is False
    rest = await tool(second, "read_output", session_id=started["session_id"],
                      max_bytes=1 << 20)
    assert rest["eof"] and rest["status"] == "cancelled"
    assert rest["stdout"].startswith("tick 0\n")


async def test_retention_forgets_a_detached_session(start_server: ServerFactory,
                                                    connect: Connect) -> None:
    server = await start_server(retention=0.3)
    first = await mcp_client(connect, server)
    await initialize(first)
    started = await tool(first, "start", command=["echo", "bye"], linger=30)
    await first.ws.aclose()
    session = server.manager.get(started["session_id"])
    await wait_for(lambda: session.done)
    await trio.sleep(0.4)
    second = await mcp_client(connect, server)
    await initialize(second)
    text = await tool_error(second, "read_output", session_id=started["session_id"])
    assert "unknown session" in text
    assert not server.manager.mcp_buffers


async def test_reading_takes_the_session_over(server: Server, connect: Connect) -> None:
    """The reader becomes the owner; the session keeps its own linger (0 here): closing the
    first connection no longer cancels it, closing the reader's does."""
    first = await mcp_client(connect, server)
    await initialize(first)
    started = await tool(first, "start", command=TICKER)
    assert started["linger"] == 0
    second = await mcp_client(connect, server)
    await initialize(second)
    read = await tool(second, "read_output", session_id=started["session_id"], wait_s=5)
    assert read["stdout"] and "tick 0\n".startswith(read["stdout"][:7]), read  # may be partial
    await first.ws.aclose()
    await trio.sleep(0.3)
    assert group_alive(started["pid"])
    await tool(second, "pause", session_id=started["session_id"])
    resumed = await tool(second, "resume", session_id=started["session_id"])
    assert resumed["status"] == "running"
    await second.ws.aclose()
    await wait_for(lambda: not group_alive(started["pid"]), timeout=10)
    assert not server.manager.mcp_buffers


async def test_linger_is_capped_and_without_it_the_buffer_goes(start_server: ServerFactory,
                                                               connect: Connect) -> None:
    server = await start_server(max_linger=2.0)
    client = await mcp_client(connect, server)
    await initialize(client)
    capped = await tool(client, "start", command=["sleep", "30"], linger=1000)
    assert capped["linger"] == 2.0
    assert "linger" in await tool_error(client, "start", command=["true"], linger=-1)
    plain = await tool(client, "start", command=["sleep", "30"])
    await client.ws.aclose()
    await wait_for(lambda: not group_alive(plain["pid"]), timeout=10)
    assert set(server.manager.mcp_buffers) == {capped["session_id"]}
    server.manager.get(capped["session_id"]).cancel()


async def test_sdk_stdio_linger_dies_with_the_process() -> None:
    """Over stdio the sessions live in the `ccx mcp` process: linger cannot outlive it."""
    from mcp import StdioServerParameters
    from mcp.client.stdio import stdio_client

    params = StdioServerParameters(command=CCX, args=["mcp", "--kill-grace", "1"])

    async def main(session: ClientSession) -> dict[str, Any]:
        return structured(await session.call_tool("start", {"command": ["sleep", "60"],
                                                            "linger": 60}))

    started = await in_sdk(lambda: stdio_client(params), main)
    assert started["linger"] == 60
    await wait_for(lambda: not group_alive(started["pid"]), timeout=10)
