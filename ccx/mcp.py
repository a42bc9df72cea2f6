"""MCP server side of one connection: lifecycle, tools, progress, cancellation, logging.

Inputs: JSON-RPC frames (text) from any transport (WebSocket subprotocol `mcp`, stdio), the
`SessionManager`, and a `send` function that delivers one message to the peer (raising
`OwnerGone` once it is gone).
Outputs: responses for `handle_frame()`; notifications (`notifications/progress`,
`notifications/message`) through `send`. The endpoint is the `Owner` of the sessions its tools
start: their output goes into bounded per-session `OutputBuffer`s (a full, unread buffer
throttles the child), kept in `SessionManager.mcp_buffers`. `close()` cancels the sessions
without `linger`, as closing a WebSocket does (PROTOCOL.md 5), and detaches the others
(`SessionManager.release`: linger clock, then `CCX_RETENTION`); their buffers stay. Reading a
session's output from another endpoint moves the session there (`claim`, an MCP `attach`).
Protocol revision 2025-11-25; 2025-06-18, 2025-03-26 and 2024-11-05 are accepted too.
Size (over 400 lines): the MCP lifecycle (initialize, capabilities, versions), its
dispatch and the `Owner`/`ToolHost` side of a connection belong to one endpoint object; the
tools themselves are `ccx.mcp_tools`.
Docs: https://modelcontextprotocol.io/specification/2025-11-25/basic/lifecycle
      https://modelcontextprotocol.io/specification/2025-11-25/basic/utilities/cancellation
      https://modelcontextprotocol.io/specification/2025-11-25/server/utilities/logging
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import structlog
import trio

from ccx import __version__
from ccx.api import error_reply
from ccx.config import Settings
from ccx.errors import InvalidParams, InvalidRequest, MethodNotFound, RpcError, SessionNotFound
from ccx.events import Completed, Event, Output
from ccx.log import add_tap, get_logger, remove_tap
from ccx.manager import SessionManager
from ccx.mcp_buffer import OutputBuffer
from ccx.mcp_tools import TOOLS, ToolCall
from ccx.owner import OwnerGone
from ccx.params import ExecuteParams
from ccx.protocol import (
    Frame,
    Invalid,
    Request,
    error_response,
    event_params,
    notification,
    parse_frame,
    response,
)
from ccx.session import Session

log = get_logger("ccx.mcp")

SUPPORTED_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")  # newest first
LATEST_VERSION = SUPPORTED_VERSIONS[0]
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
DEFAULT_LOG_LEVEL = "warning"  # until logging/setLevel: only trouble is reported
STRUCTLOG_TO_MCP = {"debug": "debug", "info": "info", "msg": "info", "warning": "warning",
                    "warn": "warning", "error": "error", "exception": "error",
                    "critical": "critical", "fatal": "critical"}
CLAIM_CATCH_UP_S = 1.0  # a claim waits this long at most for held output to reach the buffer
LOG_QUEUE_MESSAGES = 256  # log notifications waiting for the peer; more are dropped (counted)
INSTRUCTIONS = (
    "ccx runs commands on this machine as supervised process groups. Use `execute` for a "
    "command that finishes within the call (it blocks; pass `timeout`): it returns the exit "
    "status and the end of stdout/stderr ('[N bytes omitted]' marks a cut). For long jobs "
    "(Claude Code runs, builds, test suites, servers) use `start`, then call `read_output` "
    "with the returned next_stdout_offset/next_stderr_offset and a `wait_s` (e.g. 30) until "
    "`eof` is true. `send_input` writes to stdin (start with stdin=true); `pause`, `resume` "
    "and `cancel` act on the whole process tree (with what left its group); `list_sessions` "
    "shows what runs. Unread "
    "output is held, bounded: a job writing faster than you read is slowed, never truncated. "
    "Sessions started here are cancelled when this MCP connection closes, unless started with "
    "`linger` (seconds): then they keep running detached and a later MCP connection (after "
    "your own restart) finds them with `list_sessions` and continues `read_output` from the "
    "offsets it had (or from the stdout_offset/stderr_offset list_sessions shows); that read "
    "makes the new connection the session's owner."
)

Send = Callable[[dict[str, object]], Awaitable[None]]


def negotiate(requested: object) -> str:
    """The client's version when supported, else the newest this server speaks."""
    return requested if isinstance(requested, str) and requested in SUPPORTED_VERSIONS \
        else LATEST_VERSION


def _jsonable(value: dict[str, Any]) -> Any:
    return json.loads(json.dumps(value, default=str))


@attrs.define(eq=False)
class McpEndpoint:
    """One MCP client: its negotiated version, log level, requests in flight and buffers."""

    manager: SessionManager
    send: Send
    protocol_version: str | None = None
    initialized: bool = False  # notifications/initialized arrived
    log_level: str = DEFAULT_LOG_LEVEL
    closed: bool = False
    logs_dropped: int = 0
    _in_flight: dict[object, trio.CancelScope] = attrs.field(factory=dict)
    _log_send: trio.MemorySendChannel[dict[str, object]] = attrs.field(init=False)
    _log_receive: trio.MemoryReceiveChannel[dict[str, object]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._log_send, self._log_receive = trio.open_memory_channel[dict[str, object]](
            LOG_QUEUE_MESSAGES)

    @property
    def settings(self) -> Settings:
        return self.manager.settings

    @property
    def in_flight(self) -> bool:
        """Some request of this client is being handled."""
        return bool(self._in_flight)

    # ------------------------------------------------------------------------------ life

    async def run(self) -> None:
        """Forward log lines of this client's sessions until `close()`.

        **Cancellation**: safe; the tap is removed on the way out.
        """
        add_tap(self._tap)
        try:
            async with self._log_receive:
                async for message in self._log_receive:
                    try:
                        await self.send(message)
                    except OwnerGone:
                        return
        finally:
            remove_tap(self._tap)

    def _owned(self) -> list[OutputBuffer]:
        return [b for b in self.manager.mcp_buffers.values() if b.owner is self]

    def close(self) -> None:
        """The peer is gone: cancel the sessions it owns, or detach those with linger.

        A lingering session's buffer stays (unowned) for a later `claim`; the others' go.
        """
        if self.closed:
            return
        self.closed = True
        for buffer in self._owned():
            session = self.manager.find(buffer.session_id)
            if session is not None and session.options.linger > 0:
                buffer.hand_over(None)  # an append waiting for us fails; the bytes stay
            else:
                self.forget(buffer.session_id)
        for scope in self._in_flight.values():
            scope.cancel()
        self._log_send.close()
        self.manager.release(self)

    # ------------------------------------------------------------------------------ Owner

    async def send_event(self, event: Event) -> None:
        """Take one event of an owned session (the `Owner` side): output goes into the
        session's buffer as the bytes it carries (no JSON, no base64), waiting while the
        buffer is full; completion is recorded there; other events are not for MCP peers."""
        if self.closed:
            raise OwnerGone("mcp")
        buffer = self.manager.mcp_buffers.get(event.session_id)
        if buffer is None:  # released (its execute was cancelled): nobody will read it
            return
        if buffer.owner is not self:  # taken over by another connection, or detached
            raise OwnerGone("mcp")
        if isinstance(event, Output):
            if event.seq <= buffer.last_seq:
                return  # already held: a hand-over re-sent it
            await buffer.append(event.stream, event.data, seq=event.seq, writer=self)
        elif isinstance(event, Completed):
            buffer.complete(event_params(event))

    async def send_frame(self, frame: bytes) -> None:
        """A native frame relayed from another node (`ccx.cluster`): never made for an MCP
        connection (its tools forward as calls); refused as from a peer that is gone."""
        raise OwnerGone("mcp")

    # ------------------------------------------------------------------------------ ToolHost

    async def start_session(self, params: ExecuteParams) -> tuple[Session, OutputBuffer]:
        session = await self.manager.execute(params, self)
        buffer = OutputBuffer(session.id, self.settings.mcp_buffer_bytes, owner=self,
                              held=self.manager.held)
        self.manager.mcp_buffers[session.id] = buffer
        session.announce()  # nothing goes on the wire first: the buffer can take output now
        return session, buffer

    async def claim(self, session_id: str) -> OutputBuffer:
        """The session's output buffer, making this endpoint its owner first if it is not.

        Taking a session over is an `attach` from the last output the buffer took: the
        session's outbox re-sends what came after it, so no byte is lost or repeated. The
        session keeps its own linger; the previous owner, if still connected, gets nothing
        more. Raises `SessionNotFound` for unknown (or forgotten) sessions and for sessions
        that have no MCP buffer (started over the native API, or their MCP connection closed
        without linger).
        """
        session = self.manager.get(session_id)  # forgets what CCX_RETENTION let go
        buffer = self.manager.mcp_buffers.get(session_id)
        if buffer is None:
            raise SessionNotFound(
                f"session {session_id} has no MCP output: it was not started with the MCP "
                "start tool, or its MCP connection closed without linger",
                {"session_id": session_id})
        if buffer.owner is not self:
            if not buffer.ended:  # else nothing more will be delivered: no attach needed
                self.manager.attach(session_id, buffer.last_seq, self)
                session.announce()
            buffer.hand_over(self)
            log.info("mcp_session_claimed", session_id=session_id, since_seq=buffer.last_seq)
            # What the session held while detached is re-delivered by its own task: let it
            # arrive, so that this very read sees it (until the buffer is full, at most 1 s).
            with trio.move_on_after(CLAIM_CATCH_UP_S):
                while not (buffer.ended or buffer.full or (
                        not session.done and buffer.last_seq >= session.next_seq - 1)):
                    await buffer.wait_changed()
        return buffer

    def forget(self, session_id: str) -> None:
        buffer = self.manager.mcp_buffers.pop(session_id, None)
        if buffer is not None:
            buffer.close()

    async def notify(self, method: str, params: dict[str, object]) -> None:
        await self.send(notification(method, params))

    # ------------------------------------------------------------------------------ logs

    def _tap(self, level: str, event: dict[str, Any]) -> None:
        """A log event anywhere in the server: forward it if it is about our session."""
        session_id = event.get("session_id")
        buffer = self.manager.mcp_buffers.get(session_id) if isinstance(session_id, str) \
            else None
        if self.closed or buffer is None or buffer.owner is not self:
            return
        mcp_level = STRUCTLOG_TO_MCP.get(level, "info")
        if LOG_LEVELS.index(mcp_level) < LOG_LEVELS.index(self.log_level):
            return
        data = {k: v for k, v in event.items() if k not in ("component", "timestamp", "level")}
        params = {"level": mcp_level, "logger": str(event.get("component", "ccx")),
                  "data": _jsonable(data)}
        try:
            self._log_send.send_nowait(notification("notifications/message", params))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.logs_dropped += 1

    # ------------------------------------------------------------------------------ frames

    async def handle_frame(self, text: str | bytes) -> dict[str, object] | list[
            dict[str, object]] | None:
        """Answer one frame (a message or a batch); None when nothing is to be sent back."""
        return await self.handle_parsed(parse_frame(text))

    async def handle_parsed(self, frame: Frame) -> dict[str, object] | list[
            dict[str, object]] | None:
        """`handle_frame` for a frame the transport already parsed (`parse_frame`)."""
        replies: list[dict[str, object]] = []
        for item in frame.items:
            if isinstance(item, Invalid):
                replies.append(error_response(item.id, item.error))
                continue
            if frame.is_batch and item.method == "initialize":
                replies.append(error_response(item.id, InvalidRequest(
                    "Invalid Request: initialize must not be part of a batch")))
                continue
            reply = await self.dispatch(item)
            if reply is not None:
                replies.append(reply)
        if not replies:
            return None
        return replies if frame.is_batch else replies[0]

    async def dispatch(self, request: Request) -> dict[str, object] | None:
        """Run one request or notification; never raises but cancellation. A request
        cancelled by `notifications/cancelled` gets no response (the spec says so)."""
        started = time.monotonic()
        outcome = "ok"
        reply: dict[str, object] | None = None
        with structlog.contextvars.bound_contextvars(request_id=request.id,
                                                     method=request.method):
            try:
                if request.is_notification:
                    self._on_notification(request)
                    return None
                with trio.CancelScope() as scope:
                    if request.method != "initialize":
                        self._in_flight[request.id] = scope
                    try:
                        result = await self._call(request)
                    finally:
                        self._in_flight.pop(request.id, None)
                if scope.cancelled_caught:
                    outcome = "cancelled"
                else:
                    reply = response(request.id, result)
            except Exception as exc:
                reply, outcome = error_reply(request.id, exc)
            log.info("mcp_request", outcome=outcome,
                     duration_ms=round((time.monotonic() - started) * 1000, 3))
        return reply

    def _on_notification(self, request: Request) -> None:
        params: Any = request.params if isinstance(request.params, dict) else {}
        if request.method == "notifications/initialized":
            self.initialized = True
        elif request.method == "notifications/cancelled":
            scope = self._in_flight.get(params.get("requestId"))
            if scope is not None:
                log.info("request_cancelled", cancelled_id=params.get("requestId"),
                         reason=params.get("reason"))
                scope.cancel()
        # Anything else (roots/list_changed, progress...) needs nothing from us.

    async def _call(self, request: Request) -> dict[str, object]:
        method = request.method
        params: Any = request.params if request.params is not None else {}
        if not isinstance(params, dict):
            raise InvalidParams("Invalid params: expected an object")
        if method == "initialize":
            return self._initialize(params)
        if method == "ping":
            return {}
        if self.protocol_version is None:
            raise InvalidRequest(f"Invalid Request: {method} before initialize; the first "
                                 "request of an MCP session must be initialize")
        if method == "tools/list":
            return {"tools": [t.describe(self.protocol_version, self.settings)
                              for t in TOOLS.values()]}
        if method == "tools/call":
            return await self._call_tool(params)
        if method == "logging/setLevel":
            level = params.get("level")
            if level not in LOG_LEVELS:
                raise InvalidParams(f"Invalid params: level must be one of {', '.join(LOG_LEVELS)}")
            self.log_level = level
            return {}
        raise MethodNotFound(f"Method not found: {method}")

    def _initialize(self, params: dict[str, Any]) -> dict[str, object]:
        if self.protocol_version is not None:
            raise InvalidRequest("Invalid Request: already initialized")
        requested = params.get("protocolVersion")
        if not isinstance(requested, str):
            raise InvalidParams("Invalid params: protocolVersion (a string) is required")
        self.protocol_version = negotiate(requested)
        client = params.get("clientInfo") or {}
        log.info("mcp_initialized", requested=requested, version=self.protocol_version,
                 client=client.get("name") if isinstance(client, dict) else None)
        server_info: dict[str, object] = {"name": "ccx", "version": __version__}
        if self.protocol_version >= "2025-06-18":
            server_info["title"] = "ccx: supervised long-running commands"
        return {
            "protocolVersion": self.protocol_version,
            "capabilities": {"tools": {"listChanged": False}, "logging": {}},
            "serverInfo": server_info,
            "instructions": INSTRUCTIONS,
        }

    async def _call_tool(self, params: dict[str, Any]) -> dict[str, object]:
        name = params.get("name")
        tool = TOOLS.get(name) if isinstance(name, str) else None
        if tool is None:
            raise InvalidParams(f"Unknown tool: {name}", {"tools": list(TOOLS)})
        meta = params.get("_meta")
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        arguments = params.get("arguments") or {}
        call = ToolCall(self, arguments, token)
        try:
            # PROTOCOL.md 10: a tool naming another node's session runs there (ccx.cluster)
            target = self.manager.cluster.route(arguments.get("session_id")) \
                if isinstance(arguments, dict) else None
            if target is not None:
                assert self.protocol_version is not None
                return await self.manager.cluster.forward_tool(
                    target, tool.name, arguments, self, self.protocol_version)
            result = await tool.run(call)
        except RpcError as exc:  # not allowed, not found, spawn failed...: a tool failure
            text = exc.message if exc.data is None else f"{exc.message} {json.dumps(exc.data)}"
            return {"content": [{"type": "text", "text": text}], "isError": True}
        reply: dict[str, object] = {
            "content": [{"type": "text", "text": json.dumps(result, ensure_ascii=False)}],
            "isError": False,
        }
        assert self.protocol_version is not None
        if self.protocol_version >= "2025-06-18":
            reply["structuredContent"] = result
        return reply


async def _self_check() -> None:
    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    async with trio.open_nursery() as nursery:
        manager = SessionManager(Settings(kill_grace=1.0))
        await nursery.start(manager.run)
        endpoint = McpEndpoint(manager, send)
        early = await endpoint.handle_frame('{"jsonrpc":"2.0","id":1,"method":"tools/list"}')
        assert isinstance(early, dict) and "error" in early, early
        init = await endpoint.handle_frame(json.dumps({
            "jsonrpc": "2.0", "id": 2, "method": "initialize",
            "params": {"protocolVersion": "1999-01-01", "capabilities": {}}}))
        assert isinstance(init, dict) and init["result"]["protocolVersion"] == LATEST_VERSION  # type: ignore[index]
        reply = await endpoint.handle_frame(json.dumps({
            "jsonrpc": "2.0", "id": 3, "method": "tools/call",
            "params": {"name": "execute", "arguments": {"command": ["echo", "hi"]}}}))
        assert isinstance(reply, dict), reply
        result: Any = reply["result"]
        assert result["structuredContent"]["stdout"] == "hi\n", result
        endpoint.close()
        nursery.cancel_scope.cancel()
    print("ccx.mcp: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
