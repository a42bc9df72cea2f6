"""The MCP tools of ccx: their `tools/list` entries and their implementations.

Each tool's arguments are an attrs class (the launch ones shared with `execute`:
`ccx.params.LaunchParams`); its `inputSchema` is made from that class by `ccx.schema`, and
the raw arguments are structured into it, so each argument is written once.
Inputs: a `ToolCall` (the calling `ToolHost`, i.e. one MCP connection, the raw arguments and
the request's progress token, if any).
Outputs: structured results (dicts matching each tool's `outputSchema`), or an `RpcError`
that the caller turns into an `isError: true` result. Control tools reuse the native methods
of `ccx.api`, so behaviour is exactly that of the WebSocket API (PROTOCOL.md sections 2, 7).
Size (over 400 lines): each tool's argument class, implementation, result schema and
`tools/list` entry stay in one file, so a tool is read and changed in one place.
Docs: https://modelcontextprotocol.io/specification/2025-11-25/server/tools
      https://modelcontextprotocol.io/specification/2025-11-25/basic/utilities/progress
"""

from __future__ import annotations

import codecs
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio

from ccx import api
from ccx.config import Settings
from ccx.errors import InvalidParams, RpcError
from ccx.manager import SessionManager
from ccx.mcp_buffer import STREAMS, OutputBuffer, Tail
from ccx.owner import Owner
from ccx.params import ExecuteParams, LaunchParams
from ccx.protocol import structure_params
from ccx.schema import doc, object_schema
from ccx.session import Session

MAX_READ_BYTES = 4 * 1024 * 1024  # largest max_bytes / tail_bytes a call may ask for
DEFAULT_READ_BYTES = 64 * 1024
MAX_WAIT_S = 600.0  # read_output waits at most this long, whatever wait_s says
PROGRESS_INTERVAL_S = 0.1  # progress notifications of one execute are at least this far apart
PROGRESS_TEXT_BYTES = 16 * 1024  # output carried by one progress message, at most


class ToolHost(Owner, Protocol):
    """What a tool needs from the MCP connection that calls it (which owns its sessions)."""

    manager: SessionManager

    @property
    def settings(self) -> Settings: ...

    async def start_session(self, params: ExecuteParams) -> tuple[Session, OutputBuffer]:
        """Start a session owned by this connection, with its output kept in a buffer."""

    async def claim(self, session_id: str) -> OutputBuffer:
        """The session's output buffer; this connection becomes the session's owner."""

    def forget(self, session_id: str) -> None: ...

    async def notify(self, method: str, params: dict[str, object]) -> None:
        """Send one notification to the peer (waits while it is slow)."""


@attrs.frozen
class ToolCall:
    host: ToolHost
    arguments: object
    progress_token: str | int | None = None


# --------------------------------------------------------------------------- argument types


@attrs.frozen
class ExecuteArgs(LaunchParams):
    input: str | None = attrs.field(default=None, metadata=doc("written to stdin, then closed"))
    tail_bytes: int | None = attrs.field(default=None, metadata=doc(
        "bytes of each stream to return (the end)", minimum=1, maximum=MAX_READ_BYTES))


@attrs.frozen
class StartArgs(LaunchParams):
    stdin: bool = attrs.field(default=False, metadata=doc("keep stdin open for send_input"))
    tag: str | None = attrs.field(default=None, metadata=doc("label for list_sessions"))
    linger: float = attrs.field(default=0.0, metadata=doc(
        "seconds the session survives without an MCP connection (capped by the server's "
        "CCX_MAX_LINGER)", minimum=0))


@attrs.frozen
class SessionArgs:
    session_id: str = attrs.field(metadata=doc("from start or list_sessions"))


@attrs.frozen
class ReadArgs(SessionArgs):
    stdout_offset: int = attrs.field(default=0, metadata=doc(minimum=0))
    stderr_offset: int = attrs.field(default=0, metadata=doc(minimum=0))
    wait_s: float = attrs.field(default=0.0, metadata=doc(minimum=0, maximum=MAX_WAIT_S))
    max_bytes: int = attrs.field(default=DEFAULT_READ_BYTES,
                                 metadata=doc(minimum=1, maximum=MAX_READ_BYTES))


@attrs.frozen
class SendInputArgs(SessionArgs):
    data: str
    eof: bool = False


@attrs.frozen
class ListArgs:
    tag: str | None = attrs.field(default=None, metadata=doc("only sessions with this tag"))


def _launch(args: ExecuteArgs | StartArgs, *, stdin: bool, tag: str | None,
            linger: float = 0.0) -> ExecuteParams:
    shared = {field.name: getattr(args, field.name) for field in attrs.fields(LaunchParams)}
    # base64: the buffer holds raw bytes, so offsets are byte offsets of the child's output
    return ExecuteParams(**shared, stdin=stdin, encoding="base64", tag=tag, linger=linger)


def _bounded(value: int | None, default: int, name: str) -> int:
    value = default if value is None else value
    if not 1 <= value <= MAX_READ_BYTES:
        raise InvalidParams(f"Invalid params: {name} must be between 1 and {MAX_READ_BYTES}")
    return value


# --------------------------------------------------------------------------- implementations


async def execute(call: ToolCall) -> dict[str, object]:
    """Run to completion, keeping a bounded tail; progress carries output when asked.

    **Cancellation**: cancelling the call (`notifications/cancelled`) cancels the session.
    """
    args = structure_params(call.arguments, ExecuteArgs)
    host = call.host
    limit = _bounded(args.tail_bytes, host.settings.mcp_tail_bytes, "tail_bytes")
    session, buffer = await host.start_session(
        _launch(args, stdin=args.input is not None, tag=None))
    tails = {stream: Tail(limit) for stream in STREAMS}
    try:
        async with trio.open_nursery() as nursery:
            if args.input is not None:
                nursery.start_soon(_feed, session, args.input.encode("utf-8", "surrogatepass"))
            await _drain(call, buffer, tails)
            nursery.cancel_scope.cancel()
    finally:
        if not session.state.ended:
            session.cancel()
        host.forget(session.id)
    completion = buffer.completion or {}
    return {
        "session_id": session.id,
        "status": completion.get("status", session.state.value),
        "exit_code": completion.get("exit_code"),
        "signal": completion.get("signal"),
        "duration_s": completion.get("duration_s", 0.0),
        **{stream: tails[stream].text() for stream in STREAMS},
        **{f"{stream}_bytes": buffer.end(stream) for stream in STREAMS},
        **{f"{stream}_omitted_bytes": tails[stream].omitted_bytes for stream in STREAMS},
    }


async def _feed(session: Session, data: bytes) -> None:
    try:
        await session.write_input(data, eof=True)
    except RpcError:  # the child closed its stdin or ended: the rest is not wanted
        pass


async def _drain(call: ToolCall, buffer: OutputBuffer, tails: dict[str, Tail]) -> None:
    """Move everything the session writes into *tails* until it ended; report progress."""
    offsets = dict.fromkeys(STREAMS, 0)
    decoders = {s: codecs.getincrementaldecoder("utf-8")(errors="replace") for s in STREAMS}
    while True:
        await buffer.wait_news(offsets)
        texts = []
        for stream in STREAMS:
            piece = buffer.read(stream, offsets[stream], MAX_READ_BYTES, whole=True)
            offsets[stream] = piece.next_offset
            tails[stream].add(piece.data)
            text = decoders[stream].decode(piece.data, final=buffer.ended)
            if text:
                texts.append(text if stream == "stdout" else f"[stderr] {text}")
        ended = buffer.ended and all(offsets[s] == buffer.end(s) for s in STREAMS)
        if ended:
            for stream in STREAMS:
                buffer.read(stream, offsets[stream], 0, whole=True)  # release the last bytes
        if texts and call.progress_token is not None:
            message = _clip("".join(texts), PROGRESS_TEXT_BYTES)
            await call.host.notify("notifications/progress", {
                "progressToken": call.progress_token,
                "progress": sum(offsets.values()),
                "message": message,
            })
            if not ended:
                await trio.sleep(PROGRESS_INTERVAL_S)  # let output gather: fewer messages
        if ended:
            return


def _clip(text: str, limit_bytes: int) -> str:
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit_bytes:
        return text
    tail = Tail(limit_bytes)
    tail.add(data)
    return tail.text()


async def start(call: ToolCall) -> dict[str, object]:
    args = structure_params(call.arguments, StartArgs)
    session, _ = await call.host.start_session(
        _launch(args, stdin=args.stdin, tag=args.tag, linger=args.linger))
    return {"session_id": session.id, "status": "started", "pid": session.group.pid,
            "linger": session.options.linger}


async def read_output(call: ToolCall) -> dict[str, object]:
    """Output from a byte offset per stream, waiting up to `wait_s` for some to arrive.

    A session owned by another MCP connection (or by none: detached) becomes this one's.
    """
    args = structure_params(call.arguments, ReadArgs)
    max_bytes = _bounded(args.max_bytes, DEFAULT_READ_BYTES, "max_bytes")
    if args.wait_s < 0:
        raise InvalidParams("Invalid params: wait_s must not be negative")
    buffer = await call.host.claim(args.session_id)
    offsets = {"stdout": args.stdout_offset, "stderr": args.stderr_offset}
    pieces = {s: buffer.read(s, offsets[s], max_bytes) for s in STREAMS}
    if not any(p.data for p in pieces.values()) and not buffer.ended and args.wait_s > 0:
        with trio.move_on_after(min(args.wait_s, MAX_WAIT_S)):
            await buffer.wait_news(offsets)
        pieces = {s: buffer.read(s, offsets[s], max_bytes) for s in STREAMS}
    completion = buffer.completion or {}
    eof = buffer.ended and all(p.next_offset == buffer.end(s) for s, p in pieces.items())
    if eof:
        for stream, piece in pieces.items():
            buffer.read(stream, piece.next_offset, 0)  # everything was handed out: release it
    status = completion.get("status")
    if status is None:
        status = call.host.manager.get(args.session_id).state.value
    return {
        "session_id": args.session_id,
        "status": status,
        "ended": buffer.ended,
        "eof": eof,
        "exit_code": completion.get("exit_code"),
        **{s: p.data.decode("utf-8", errors="replace") for s, p in pieces.items()},
        **{f"next_{s}_offset": p.next_offset for s, p in pieces.items()},
    }


def _native(method: api.Handler, extra: dict[str, object] | None = None) -> ToolFn:
    """A tool that is one native method (same checks, same errors, same result)."""

    async def run(call: ToolCall) -> dict[str, object]:
        arguments = call.arguments if isinstance(call.arguments, dict) else {}
        return await method(api.Call(call.host.manager, call.host,
                                     {**arguments, **(extra or {})}))

    return run


async def list_sessions(call: ToolCall) -> dict[str, object]:
    """The native `sessions`, plus, for sessions with MCP output, the oldest offsets held."""
    result = await _native(api.sessions)(call)
    buffers = call.host.manager.mcp_buffers
    sessions: Any = result["sessions"]
    for info in sessions:
        buffer = buffers.get(info["session_id"])
        if buffer is not None:
            info.update({f"{s}_offset": buffer.first_offset(s) for s in STREAMS})
    return result


async def send_input(call: ToolCall) -> dict[str, object]:
    structure_params(call.arguments, SendInputArgs)  # session_id is required here
    return await _native(api.input_)(call)


async def _control(call: ToolCall, kind: str) -> dict[str, object]:
    structure_params(call.arguments, SessionArgs)
    return await _native(api.control, {"type": kind})(call)


# --------------------------------------------------------------------------- schemas
# Input schemas are made from the argument classes above (`ccx.schema`); results have no
# class (they are built as dicts), so their schemas are written here.

ToolFn = Callable[[ToolCall], Awaitable[dict[str, object]]]

_NULLABLE_INT = {"type": ["integer", "null"]}
_STATUS = {"type": "string", "description": "running, paused, cancelling, exited, killed, "
           "cancelled or timeout"}
_STATUS_RESULT = {"type": "object", "required": ["session_id", "status"],
                  "properties": {"session_id": {"type": "string"}, "status": _STATUS}}


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


_EXECUTE_OUT = _object({
    "session_id": {"type": "string"}, "status": _STATUS, "exit_code": _NULLABLE_INT,
    "signal": {"type": ["string", "null"]}, "duration_s": {"type": "number"},
    "stdout": {"type": "string"}, "stderr": {"type": "string"},
    "stdout_bytes": {"type": "integer"}, "stderr_bytes": {"type": "integer"},
    "stdout_omitted_bytes": {"type": "integer"}, "stderr_omitted_bytes": {"type": "integer"},
}, ("session_id", "status", "exit_code", "stdout", "stderr"))
_READ_OUT = _object({
    "session_id": {"type": "string"}, "status": _STATUS,
    "ended": {"type": "boolean", "description": "the process group has ended"},
    "eof": {"type": "boolean", "description": "ended and every byte was read"},
    "exit_code": _NULLABLE_INT, "stdout": {"type": "string"}, "stderr": {"type": "string"},
    "next_stdout_offset": {"type": "integer"}, "next_stderr_offset": {"type": "integer"},
}, ("session_id", "status", "ended", "eof", "stdout", "stderr", "next_stdout_offset",
    "next_stderr_offset"))
_SESSION_INFO = _object({
    "session_id": {"type": "string"}, "command": {"type": "array", "items": {"type": "string"}},
    "pid": {"type": "integer"}, "status": _STATUS, "started_at": {"type": "string"},
    "ended_at": {"type": ["string", "null"]}, "exit_code": _NULLABLE_INT,
    "signal": {"type": ["string", "null"]}, "stdout_bytes": {"type": "integer"},
    "stderr_bytes": {"type": "integer"}, "tag": {"type": ["string", "null"]},
    "linger": {"type": "number", "description": "seconds it survives without a connection"},
    "attached": {"type": "boolean",
                 "description": "a connection owns it now (false: detached, lingering)"},
    "stdout_offset": {"type": "integer", "description": "MCP sessions: oldest stdout offset "
                      "still held, where read_output resumes if the last offsets were lost"},
    "stderr_offset": {"type": "integer", "description": "the same for stderr"},
}, ("session_id", "command", "status"))


@attrs.frozen
class Tool:
    name: str
    title: str
    description: str
    arguments: type  # the attrs class its arguments structure into; its inputSchema
    output_schema: dict[str, Any]
    run: ToolFn
    read_only: bool = False
    input_schema: dict[str, Any] = attrs.field(init=False)

    @input_schema.default
    def _input_schema(self) -> dict[str, Any]:
        return object_schema(self.arguments)

    def describe(self, version: str, settings: Settings | None = None) -> dict[str, object]:
        """The `tools/list` entry; fields newer than the negotiated version are left out.
        With *settings*, limits in the schema (kill_grace's maximum) are this server's."""
        entry: dict[str, object] = {"name": self.name, "description": self.description,
                                    "inputSchema": _with_limits(self.input_schema, settings)}
        if version >= "2025-03-26":
            entry["annotations"] = {"readOnlyHint": self.read_only,
                                    "destructiveHint": self.name == "cancel",
                                    "openWorldHint": False}
        if version >= "2025-06-18":
            entry["title"] = self.title
            entry["outputSchema"] = self.output_schema
        return entry


def _with_limits(schema: dict[str, Any], settings: Settings | None) -> dict[str, Any]:
    properties = schema.get("properties", {})
    if settings is None or "kill_grace" not in properties:
        return schema
    grace = {**properties["kill_grace"], "maximum": settings.max_kill_grace}
    return {**schema, "properties": {**properties, "kill_grace": grace}}


TOOLS: dict[str, Tool] = {tool.name: tool for tool in (
    Tool("execute", "Run a command to completion",
         "Run a command and wait until it ends (use timeout for a limit). Returns the exit "
         "status and the last tail_bytes of stdout and stderr; a line '[N bytes omitted]' "
         "marks a cut. With a progressToken, progress notifications carry output as it comes. "
         "For long jobs prefer start + read_output.",
         ExecuteArgs, _EXECUTE_OUT, execute),
    Tool("start", "Start a long-running command",
         "Start a command in its own process group and return its session_id at once. Read "
         "its output with read_output; it is held (bounded) until read, and a command whose "
         "unread output fills the buffer is slowed down, never truncated. It is cancelled "
         "when this MCP connection closes, unless linger > 0: then it keeps running detached "
         "for up to linger seconds (its output held) and any later MCP connection can pick it "
         "up with read_output; once ended, it is kept for the server's retention time.",
         StartArgs,
         _object({"session_id": {"type": "string"}, "status": {"type": "string"},
                  "pid": {"type": "integer"},
                  "linger": {"type": "number", "description": "as granted (capped)"}},
                 ("session_id", "status", "pid")),
         start),
    Tool("read_output", "Read a session's output",
         "Return stdout/stderr from the given byte offsets (0 at first, then the returned "
         "next_*_offset values), waiting up to wait_s seconds for new output. Reading from an "
         "offset releases the bytes before it. eof is true once the session ended and all "
         "output was read. Reading a session started by another MCP connection (a lingering "
         "one, after a restart) makes this connection its owner: it keeps its own linger, and "
         "it is cancelled when this connection closes only if its linger is 0.",
         ReadArgs, _READ_OUT, read_output, read_only=True),
    Tool("send_input", "Write to a session's stdin",
         "Write text to the stdin of a session started with stdin=true; eof=true closes it.",
         SendInputArgs,
         _object({"session_id": {"type": "string"}, "bytes": {"type": "integer"}},
                 ("session_id", "bytes")),
         send_input),
    Tool("pause", "Pause a session",
         "SIGSTOP the session's whole process tree: its group and the descendants that left "
         "it (setsid); answers once all are stopped.",
         SessionArgs, _STATUS_RESULT,
         lambda call: _control(call, "PAUSE")),
    Tool("resume", "Resume a session", "SIGCONT the session's whole process tree.",
         SessionArgs, _STATUS_RESULT,
         lambda call: _control(call, "RESUME")),
    Tool("cancel", "Cancel a session",
         "Stop the session's whole process group: SIGTERM, then SIGKILL after kill_grace.",
         SessionArgs, _STATUS_RESULT,
         lambda call: _control(call, "CANCEL")),
    Tool("list_sessions", "List sessions",
         "Every session this server knows, running and recently ended, with its status, "
         "linger, tag, whether a connection owns it (attached) and, for sessions started "
         "over MCP, the oldest output offsets still held.",
         ListArgs,
         _object({"sessions": {"type": "array", "items": _SESSION_INFO}}, ("sessions",)),
         list_sessions, read_only=True),
)}


if __name__ == "__main__":
    import json

    for tool in TOOLS.values():
        json.dumps(tool.describe("2025-11-25"))
        assert "outputSchema" not in tool.describe("2025-03-26")
    assert ReadArgs("s").max_bytes == DEFAULT_READ_BYTES
    read_schema = TOOLS["read_output"].input_schema
    assert read_schema["required"] == ["session_id"], read_schema
    assert read_schema["properties"]["max_bytes"]["default"] == DEFAULT_READ_BYTES
    limited: Any = TOOLS["start"].describe("2025-11-25", Settings(state_dir="", kill_grace=1,
                                                                  max_kill_grace=2))
    assert limited["inputSchema"]["properties"]["kill_grace"]["maximum"] == 2
    assert _clip("x" * 10, 4) == "[6 bytes omitted]\nxxxx"
    print("ccx.mcp_tools: PASS")
