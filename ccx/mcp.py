"""MCP server side of one connection: lifecycle, tools, progress, cancellation, logging.

Inputs: JSON-RPC frames (text) from any transport (WebSocket subprotocol `mcp`, stdio), the
`SessionManager`, and a `send` function that delivers one message to the peer (raising
`OwnerGone` once it is gone).
Outputs: responses for `handle_frame()`; notifications (`notifications/progress`,
`notifications/message`) through `send`. The endpoint is the `Owner` of the sessions its tools
start: their output goes into bounded per-session `OutputBuffer`s (a full, unread buffer
throttles the child), and `close()` cancels them, as closing a WebSocket does (PROTOCOL.md 5).
Protocol revision 2025-11-25; 2025-06-18, 2025-03-26 and 2024-11-05 are accepted too.
Docs: https://modelcontextprotocol.io/specification/2025-11-25/basic/lifecycle
      https://modelcontextprotocol.io/specification/2025-11-25/basic/utilities/cancellation
      https://modelcontextprotocol.io/specification/2025-11-25/server/utilities/logging
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import structlog
import trio

from ccx import __version__
from ccx.config import Settings
from ccx.log import add_tap, get_logger, remove_tap
from ccx.manager import SessionManager
from ccx.mcp_buffer import OutputBuffer
from ccx.mcp_tools import TOOLS, ToolCall
from ccx.protocol import (
    ExecuteParams,
    InternalError,
    Invalid,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    Request,
    RpcError,
    error_response,
    notification,
    parse_frame,
    response,
)
from ccx.session import OwnerGone, Session

log = get_logger("ccx.mcp")

SUPPORTED_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")  # newest first
LATEST_VERSION = SUPPORTED_VERSIONS[0]
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
DEFAULT_LOG_LEVEL = "warning"  # until logging/setLevel: only trouble is reported
STRUCTLOG_TO_MCP = {"debug": "debug", "info": "info", "msg": "info", "warning": "warning",
                    "warn": "warning", "error": "error", "exception": "error",
                    "critical": "critical", "fatal": "critical"}
LOG_QUEUE_MESSAGES = 256  # log notifications waiting for the peer; more are dropped (counted)
INSTRUCTIONS = (
    "ccx runs commands on this machine as supervised process groups. Use `execute` for a "
    "command that finishes within the call (it blocks; pass `timeout`): it returns the exit "
    "status and the end of stdout/stderr ('[N bytes omitted]' marks a cut). For long jobs "
    "(Claude Code runs, builds, test suites, servers) use `start`, then call `read_output` "
    "with the returned next_stdout_offset/next_stderr_offset and a `wait_s` (e.g. 30) until "
    "`eof` is true. `send_input` writes to stdin (start with stdin=true); `pause`, `resume` "
    "and `cancel` act on the whole process group; `list_sessions` shows what runs. Unread "
    "output is held, bounded: a job writing faster than you read is slowed, never truncated. "
    "Sessions started here are cancelled when this MCP connection closes."
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
    _buffers: dict[str, OutputBuffer] = attrs.field(factory=dict)
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

    def close(self) -> None:
        """The peer is gone: fail blocked buffers, cancel (or detach) the sessions it owns."""
        if self.closed:
            return
        self.closed = True
        for buffer in self._buffers.values():
            buffer.close()
        for scope in self._in_flight.values():
            scope.cancel()
        self._log_send.close()
        self.manager.release(self)

    # ------------------------------------------------------------------------------ Owner

    async def send_message(self, message: dict[str, object]) -> None:
        """Take one notification of an owned session (the `Owner` side): output goes into
        the session's buffer, waiting while it is full; completion is recorded there."""
        if self.closed:
            raise OwnerGone("mcp")
        params: Any = message.get("params") or {}
        buffer = self._buffers.get(params.get("session_id"))
        if buffer is None:  # released (its execute was cancelled): nobody will read it
            return
        method = message.get("method")
        if method == "process.output":
            await buffer.append(params["stream"], base64.b64decode(params["data"]))
        elif method == "process.completed":
            buffer.complete(dict(params))

    # ------------------------------------------------------------------------------ ToolHost

    async def start_session(self, params: ExecuteParams) -> tuple[Session, OutputBuffer]:
        self._forget_expired()
        session = await self.manager.execute(params, self)
        buffer = OutputBuffer(session.id, self.settings.mcp_buffer_bytes)
        self._buffers[session.id] = buffer
        session.announce()  # nothing goes on the wire first: the buffer can take output now
        return session, buffer

    def buffer(self, session_id: str) -> OutputBuffer | None:
        self._forget_expired()
        return self._buffers.get(session_id)

    def forget(self, session_id: str) -> None:
        buffer = self._buffers.pop(session_id, None)
        if buffer is not None:
            buffer.close()

    def _forget_expired(self) -> None:
        """Buffers of sessions ended more than CCX_RETENTION ago go, read or not."""
        now = trio.current_time()
        for session_id, buffer in list(self._buffers.items()):
            if buffer.ended_at is not None and now - buffer.ended_at > self.settings.retention:
                self.forget(session_id)

    async def notify(self, method: str, params: dict[str, object]) -> None:
        await self.send(notification(method, params))

    # ------------------------------------------------------------------------------ logs

    def _tap(self, level: str, event: dict[str, Any]) -> None:
        """A log event anywhere in the server: forward it if it is about our session."""
        if self.closed or event.get("session_id") not in self._buffers:
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
        frame = parse_frame(text)
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
            except RpcError as exc:
                outcome = f"error {exc.code}"
                reply = error_response(request.id, exc)
            except Exception as exc:
                log.exception("request_crashed")
                outcome = "error -32603"
                reply = error_response(request.id, InternalError(f"Internal error: {exc!r}"))
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
            return {"tools": [t.describe(self.protocol_version) for t in TOOLS.values()]}
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
        call = ToolCall(self, params.get("arguments") or {}, token)
        try:
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
