"""MCP over Streamable HTTP at /mcp: the official SDK's `streamable_http_client`, and raw HTTP.

Rules: servers bind 127.0.0.1 on port 0; children are real processes; every test has a
deadline; every server fixture asserts that no process group it started is alive at teardown.
SDK code runs in a worker thread under asyncio (see tests/test_mcp.py); raw exchanges use h11
as the client, so HTTP framing (chunked SSE bodies) is parsed by a real HTTP implementation.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import trio
from conftest import group_alive, py, wait_for
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from test_mcp import every_tool, in_sdk, progress_then_cancel, structured

from ccx.server import Server

ServerFactory = Callable[..., Awaitable[Server]]
ACCEPT_BOTH = "application/json, text/event-stream"
# Prints 0..29, one line every 50 ms (1.5 s in all).
COUNTER = py("import time\nfor i in range(30):\n    print(i, flush=True); time.sleep(0.05)")


def http(server: Server) -> Callable[[], Any]:
    return lambda: streamable_http_client(f"http://127.0.0.1:{server.port}/mcp")


# ---------------------------------------------------------------------------- SDK


async def test_sdk_http_every_tool_and_logs(server: Server) -> None:
    logs: list[Any] = []

    async def on_log(params: Any) -> None:
        logs.append(params)

    pids = await in_sdk(http(server), every_tool, logging_callback=on_log)
    assert not group_alive(pids["echo_pid"]) and not group_alive(pids["ticker_pid"])
    assert ("ccx.session", "completed") in {(p.logger, p.data.get("event")) for p in logs}
    await wait_for(lambda: not server.mcp_http.sessions)  # the SDK's DELETE ended it


async def test_sdk_http_progress_then_cancelled_notification(server: Server) -> None:
    info = await in_sdk(http(server), progress_then_cancel)
    assert not group_alive(info["pgid"])


async def test_sdk_http_dropped_stream_is_resumed_with_last_event_id(
        start_server: ServerFactory) -> None:
    server = await start_server(mcp_sse_max=0.3)  # the server hangs up every 0.3 s

    async def main(session: ClientSession) -> tuple[dict[str, Any], str]:
        messages: list[str] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            messages.append(message or "")

        done = structured(await session.call_tool("execute", {"command": COUNTER},
                                                  progress_callback=on_progress))
        return done, "".join(messages)

    done, progress = await in_sdk(http(server), main)
    expected = "".join(f"{i}\n" for i in range(30))
    assert done["stdout"] == expected and done["exit_code"] == 0
    assert progress == expected, "progress lost or repeated across resumptions"
    assert server.mcp_http.resumptions >= 2


async def test_sdk_http_delete_kills_the_sessions_processes(server: Server) -> None:
    async def main(session: ClientSession) -> dict[str, Any]:
        return structured(await session.call_tool("start", {"command": ["sleep", "60"]}))

    started = await in_sdk(http(server), main)  # leaving the context sends DELETE
    await wait_for(lambda: not group_alive(started["pid"]), timeout=10)
    assert not server.mcp_http.sessions


# ---------------------------------------------------------------------------- raw HTTP


class Reply:
    """One HTTP response read with h11: status, headers, and the body as it arrives."""

    def __init__(self, stream: trio.SocketStream, client: h11.Connection,
                 response: h11.Response) -> None:
        self.stream, self.client = stream, client
        self.status = response.status_code
        self.headers = {k.decode().lower(): v.decode() for k, v in response.headers}
        self._pending = b""
        self.ended = False

    async def chunk(self) -> bytes:
        while True:
            event = self.client.next_event()
            if event is h11.NEED_DATA:
                self.client.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                return bytes(event.data)
            else:
                self.ended = True
                return b""

    async def body(self) -> bytes:
        data = b""
        while not self.ended:
            data += await self.chunk()
        return data

    async def json(self) -> Any:
        return json.loads(await self.body())

    async def event(self) -> dict[str, str] | None:
        """The next SSE event as {field: value}, or None at the end of the body."""
        while b"\n\n" not in self._pending:
            data = await self.chunk()
            if not data:
                return None
            self._pending += data
        raw, self._pending = self._pending.split(b"\n\n", 1)
        fields = {}
        for line in raw.decode().split("\n"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        return fields


async def request(server: Server, method: str, body: Any = None, **headers: str) -> Reply:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port or 0)
    client = h11.Connection(h11.CLIENT)
    payload = b"" if body is None else (body if isinstance(body, bytes)
                                        else json.dumps(body).encode())
    head = [("Host", "127.0.0.1"), ("Content-Length", str(len(payload)))]
    head += [(k.replace("_", "-"), v) for k, v in headers.items()]
    data = client.send(h11.Request(method=method, target="/mcp", headers=head)) or b""
    data += (client.send(h11.Data(data=payload)) or b"") + (client.send(h11.EndOfMessage()) or b"")
    await stream.send_all(data)
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            return Reply(stream, client, event)


def rpc(method: str, params: dict[str, Any] | None = None, id: int | None = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or {}}
    if id is not None:
        message["id"] = id
    return message


async def open_session(server: Server, version: str = "2025-11-25", **headers: str) -> str:
    reply = await request(server, "POST", rpc("initialize", {
        "protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "raw",
                                                                       "version": "0"}}),
        Accept=ACCEPT_BOTH, **headers)
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    assert (await reply.json())["result"]["protocolVersion"] == version
    session_id = reply.headers["mcp-session-id"]
    note = await request(server, "POST", rpc("notifications/initialized", id=None),
                         Accept=ACCEPT_BOTH, Mcp_Session_Id=session_id, **headers)
    assert note.status == 202 and await note.body() == b""
    return session_id


async def test_status_codes(start_server: ServerFactory) -> None:
    server = await start_server(token="s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    assert (await request(server, "POST", rpc("ping"), Accept=ACCEPT_BOTH)).status == 401
    big = await request(server, "POST", b"x" * 500_000, Accept=ACCEPT_BOTH)
    assert big.status == 401  # answered whole, not lost to a reset: the body was drained
    evil = await request(server, "POST", rpc("ping"), Accept=ACCEPT_BOTH, Origin="http://evil.example", **auth)
    assert evil.status == 403
    sid = await open_session(server, **auth)
    with_sid = {**auth, "Mcp_Session_Id": sid, "Accept": ACCEPT_BOTH}
    bad = await request(server, "POST", b"{not json", **with_sid)
    assert bad.status == 400 and (await bad.json())["error"]["code"] == -32700
    assert (await request(server, "POST", rpc("ping"), Accept=ACCEPT_BOTH, **auth)).status == 400
    gone = await request(server, "POST", rpc("ping"), **{**with_sid, "Mcp_Session_Id": "nope"})
    assert gone.status == 404
    assert (await request(server, "PUT", rpc("ping"), **with_sid)).status == 405
    wrong_version = await request(server, "POST", rpc("ping"), **with_sid,
                                  MCP_Protocol_Version="1999-01-01")
    assert wrong_version.status == 400
    pong = await request(server, "POST", rpc("ping"), **with_sid, MCP_Protocol_Version="2025-11-25")
    assert pong.status == 200 and (await pong.json())["result"] == {}
    batch = await request(server, "POST", [rpc("ping")], **with_sid)
    assert batch.status == 400  # no batches in 2025-06-18 and later
    assert (await request(server, "GET", **{**with_sid, "Accept": "application/json"})).status == 406
    assert (await request(server, "DELETE", **with_sid)).status == 204
    assert (await request(server, "POST", rpc("ping"), **with_sid)).status == 404


async def test_batches_on_2025_03_26_and_refusal_before_initialize(server: Server) -> None:
    early = await request(server, "POST", rpc("tools/list"), Accept=ACCEPT_BOTH)
    assert early.status == 400  # no session id: initialize first
    sid = await open_session(server, "2025-03-26")
    reply = await request(server, "POST", [rpc("ping", id=1), rpc("tools/list", id=2)],
                          Accept=ACCEPT_BOTH, Mcp_Session_Id=sid)
    answers = await reply.json()
    assert [a["id"] for a in answers] == [1, 2] and "outputSchema" not in answers[1]["result"]["tools"][0]


async def test_raw_stream_dropped_then_resumed_loses_nothing(server: Server) -> None:
    sid = await open_session(server)
    headers = {"Accept": ACCEPT_BOTH, "Mcp_Session_Id": sid}
    call = rpc("tools/call", {"name": "execute", "arguments": {"command": COUNTER},
                              "_meta": {"progressToken": "p"}}, id=7)
    first = await request(server, "POST", call, **headers)
    assert first.status == 200 and first.headers["content-type"] == "text/event-stream"
    priming = await first.event()
    assert priming is not None and priming["data"] == "" and priming["id"].endswith(":-1")
    seen: list[dict[str, str]] = []
    while len(seen) < 3:
        event = await first.event()
        assert event is not None
        seen.append(event)
    await first.stream.aclose()  # the network drops; the command goes on
    await trio.sleep(0.3)
    again = await request(server, "GET", Accept="text/event-stream", Mcp_Session_Id=sid,
                          Last_Event_ID=seen[-1]["id"])
    assert again.status == 200
    while (event := await again.event()) is not None:
        seen.append(event)
    ids = [int(e["id"].rsplit(":", 1)[1]) for e in seen]
    assert ids == list(range(len(ids))), ids  # no gap, no repeat
    messages = [json.loads(e["data"]) for e in seen]
    final = messages[-1]
    assert final["id"] == 7 and final["result"]["structuredContent"]["exit_code"] == 0
    progress = "".join(m["params"]["message"] for m in messages[:-1])
    assert progress == "".join(f"{i}\n" for i in range(30))
    done = await request(server, "GET", Accept="text/event-stream", Mcp_Session_Id=sid,
                         Last_Event_ID=seen[-1]["id"])
    assert done.status == 410  # ended and fully delivered


async def test_get_stream_carries_logs(server: Server) -> None:
    sid = await open_session(server)
    headers = {"Accept": ACCEPT_BOTH, "Mcp_Session_Id": sid}
    level = await request(server, "POST", rpc("logging/setLevel", {"level": "info"}), **headers)
    assert (await level.json())["result"] == {}
    logs = await request(server, "GET", Accept="text/event-stream", Mcp_Session_Id=sid)
    assert logs.status == 200 and (await logs.event() or {}).get("data") == ""
    done = await request(server, "POST", rpc("tools/call", {
        "name": "execute", "arguments": {"command": ["true"]}}), Accept="application/json",
        Mcp_Session_Id=sid)
    assert done.headers["content-type"] == "application/json"  # no SSE accepted: JSON
    assert (await done.json())["result"]["isError"] is False
    with trio.fail_after(5):
        while True:
            event = await logs.event()
            assert event is not None
            data = json.loads(event["data"])
            if data["params"]["data"].get("event") == "completed":
                break
    assert data["method"] == "notifications/message" and data["params"]["level"] == "info"
    await logs.stream.aclose()
