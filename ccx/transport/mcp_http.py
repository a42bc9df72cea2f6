"""MCP over Streamable HTTP at `/mcp`: POST for client messages, JSON or SSE answers, sessions.

Inputs: a plain (non-upgrade) HTTP request on `/mcp` whose head was already read (`Head`),
the `SessionManager` and `Settings`.
Outputs: one HTTP/1.1 exchange per TCP connection, framed by h11 (`Connection: close`):
- POST `initialize` → JSON with a new `Mcp-Session-Id`; later POSTs need that header (400
  without it, 404 for an unknown or expired one; an unsupported `MCP-Protocol-Version` is 400).
  Notifications and responses → 202. `tools/call` of `execute` → an SSE stream (progress
  notifications, then the response); any other request → `application/json`.
- GET → an SSE stream: with `Last-Event-ID`, the rest of the stream that id belongs to;
  without, a new stream of server-to-client messages (`notifications/message` logs).
- DELETE → ends the session and cancels every process it started (204).
Every SSE event has an id `<stream>:<seq>`; events are held (sent ones too, within
`CCX_REPLAY_BYTES` per stream, reusing the session `Outbox`) so a dropped stream is resumed by
GET with `Last-Event-ID` with nothing lost. A request keeps running when its stream drops.
Token (401) and Origin (403) rules are those of the WebSocket handshake.
Docs: https://modelcontextprotocol.io/specification/2025-11-25/basic/transports#streamable-http
      https://html.spec.whatwg.org/multipage/server-sent-events.html
      https://h11.readthedocs.io/en/latest/api.html
"""

from __future__ import annotations

import contextvars
import itertools
import math
import uuid
from collections.abc import Awaitable, Callable, Sequence

import attrs
import h11
import structlog
import trio

from ccx.config import Settings
from ccx.log import get_logger
from ccx.manager import SessionManager
from ccx.mcp import SUPPORTED_VERSIONS, McpEndpoint
from ccx.outbox import Held, Outbox
from ccx.protocol import (
    Invalid,
    InvalidRequest,
    ReplayUnavailable,
    Request,
    RpcError,
    encode,
    error_response,
    parse_frame,
)
from ccx.session import OwnerGone
from ccx.transport.http import Head
from ccx.transport.websocket import origin_ok, token_ok

log = get_logger("ccx.mcp_http")

READ_BYTES = 64 * 1024
BODY_TIMEOUT_S = 30.0  # a client that sends no complete body in this time is dropped
SWEEP_INTERVAL_S = 10.0  # how often idle sessions are looked for
RETRY_MS = 200  # `retry:` hint sent when the server closes a stream before its end
DONE_STREAMS_KEPT = 64  # finished response streams kept per session for late resumption
STREAMED_TOOLS = frozenset({"execute"})  # tools/call answered as SSE: long, not idempotent
ALLOW = "GET, POST, DELETE"
JSON_TYPE = "application/json"
SSE_TYPE = "text/event-stream"

class HttpError(Exception):
    """Answer the exchange with `status` and a short text (or a JSON-RPC error body)."""

    def __init__(self, status: int, text: str, *, rpc: RpcError | None = None,
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(text)
        self.status = status
        self.rpc = rpc
        self.headers = headers


# ------------------------------------------------------------------------------------ streams


@attrs.define(eq=False)
class EventStream:
    """The events of one SSE stream, held for replay; one follower writes them at a time."""

    id: str
    outbox: Outbox
    done: bool = False  # nothing more will be pushed
    closed: bool = False  # the session ended: pushers fail
    _changed: trio.Event = attrs.field(factory=trio.Event)
    _follower: trio.CancelScope | None = None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def push(self, message: dict[str, object]) -> None:
        """Hold one message as the next event; wait while `budget_bytes` are unsent.

        **Cancellation**: safe; nothing is held if cancelled while waiting.
        """
        size = len(encode(message))
        while not self.outbox.has_room and not self.closed:
            await self._changed.wait()
        if self.closed:
            raise OwnerGone(self.id)
        self.outbox.push(Held("event", message, self.outbox.take_seq(), size))
        self._notify()

    def finish(self) -> None:
        self.done = True
        self._notify()

    def close(self) -> None:
        self.closed = self.done = True
        if self._follower is not None:
            self._follower.cancel()
        self._notify()

    @property
    def finished(self) -> bool:
        """Done and every event written out: a follower has nothing more to send."""
        return self.done and self.outbox.head() is None

    def resume_after(self, seq: int) -> None:
        """Queue every held event after *seq* again (the client's `Last-Event-ID`)."""
        if seq + 1 < self.outbox.first_seq:
            raise ReplayUnavailable(f"events after {self.id}:{seq} are no longer held",
                                    {"first_seq": self.outbox.first_seq})
        self.outbox.rewind(seq, [])
        self._notify()

    async def follow(self, write: Callable[[bytes], Awaitable[None]], *,
                     max_s: float) -> str:
        """Write held and new events until the stream is `finished`, or *max_s* passed
        (`paused`), or a newer follower took over or the session ended (`replaced`).

        **Cancellation**: an event is marked sent only after its write returned.
        """
        if self._follower is not None:
            self._follower.cancel()
        deadline = trio.current_time() + max_s if max_s > 0 else math.inf
        with trio.CancelScope() as scope:
            self._follower = scope
            try:
                while True:
                    held = self.outbox.head()
                    if held is None:
                        if self.done:
                            return "finished"
                        changed = self._changed
                        with trio.move_on_at(deadline):
                            await changed.wait()
                    if trio.current_time() >= deadline:
                        return "paused"
                    if held is not None:
                        await write(sse_event(f"{self.id}:{held.seq}", encode(held.message)))
                        self.outbox.delivered()
                        self._notify()  # room for a waiting pusher
            finally:
                if self._follower is scope:
                    self._follower = None
        return "replaced"


# The response stream of the request being handled: notifications it sends go there.
CURRENT_STREAM: contextvars.ContextVar[EventStream | None] = contextvars.ContextVar(
    "ccx_mcp_stream", default=None)


def sse_event(event_id: str, data: str, *, retry_ms: int | None = None) -> bytes:
    """One SSE event; `data` is compact JSON (no newlines) or empty (a priming event)."""
    retry = f"retry: {retry_ms}\n" if retry_ms is not None else ""
    return f"id: {event_id}\n{retry}data: {data}\n\n".encode()


# ------------------------------------------------------------------------------------ sessions


@attrs.define(eq=False)
class HttpSession:
    """One MCP session (`Mcp-Session-Id`): its endpoint and its event streams."""

    id: str
    manager: SessionManager
    endpoint: McpEndpoint = attrs.field(init=False)
    streams: dict[str, EventStream] = attrs.field(factory=dict)
    standalone: EventStream | None = None  # the GET stream for messages without a request
    last_seen: float = attrs.field(factory=trio.current_time)
    _numbers: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))

    def __attrs_post_init__(self) -> None:
        self.endpoint = McpEndpoint(self.manager, self.send)

    async def send(self, message: dict[str, object]) -> None:
        """Deliver a server message: on the current request's stream, else on the GET
        stream; with neither, it is dropped (as the spec allows for unrelated messages)."""
        stream = CURRENT_STREAM.get() or self.standalone
        if stream is not None:
            await stream.push(message)

    def new_stream(self, prefix: str) -> EventStream:
        finished = [s for s in self.streams.values() if s.finished]
        for old in finished[: max(0, len(finished) - DONE_STREAMS_KEPT)]:
            del self.streams[old.id]
        stream = EventStream(f"{prefix}{next(self._numbers)}",
                             Outbox(self.manager.settings.replay_bytes))
        self.streams[stream.id] = stream
        return stream

    @property
    def busy(self) -> bool:
        """A request runs or a stream is being written: the session is not idle."""
        return bool(self.endpoint.in_flight) or any(
            s._follower is not None for s in self.streams.values())

    def close(self) -> None:
        self.endpoint.close()  # cancels its processes (MCP sessions have no linger)
        for stream in self.streams.values():
            stream.close()


@attrs.define(eq=False)
class McpHttp:
    """The `/mcp` endpoint: the registry of HTTP MCP sessions and the exchange handler."""

    manager: SessionManager
    sessions: dict[str, HttpSession] = attrs.field(factory=dict)
    resumptions: int = 0  # GETs with Last-Event-ID that resumed a stream
    _nursery: trio.Nursery | None = None

    @property
    def settings(self) -> Settings:
        return self.manager.settings

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host streamed requests and log forwarders; end idle sessions. Until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await trio.sleep(SWEEP_INTERVAL_S)
                    self._end_idle()
            finally:
                for session_id in list(self.sessions):
                    self.end(session_id, reason="server stopping")

    def _end_idle(self) -> None:
        now = trio.current_time()
        for session in list(self.sessions.values()):
            if not session.busy and now - session.last_seen > self.settings.mcp_http_idle:
                self.end(session.id, reason="idle")

    def end(self, session_id: str, *, reason: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            log.info("mcp_session_ended", mcp_session=session_id, reason=reason)
            session.close()

    # ------------------------------------------------------------------------------ exchange

    async def handle(self, stream: trio.abc.Stream, head: Head) -> None:
        """Answer one HTTP exchange on `/mcp`. Never raises but cancellation."""
        exchange = Exchange(stream, head)
        try:
            if not token_ok(self.settings, head):
                raise HttpError(401, "missing or wrong token",
                                headers=[("WWW-Authenticate", "Bearer")])
            if not origin_ok(self.settings, head.header("origin")):
                raise HttpError(403, "origin not allowed")
            if head.method == "POST":
                await self._post(exchange, await exchange.read_body(
                    self.settings.max_message_bytes))
            elif head.method == "GET":
                await self._get(exchange)
            elif head.method == "DELETE":
                self.end(self._session(head).id, reason="DELETE")
                await exchange.respond(204)
            else:
                raise HttpError(405, "method not allowed", headers=[("Allow", ALLOW)])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away; a stream's events stay held for Last-Event-ID
        except HttpError as exc:
            log.info("mcp_http_refused", status=exc.status, reason=str(exc), method=head.method)
            if exc.rpc is not None:
                await exchange.respond(exc.status, encode(error_response(None, exc.rpc)),
                                       JSON_TYPE, exc.headers)
            else:
                await exchange.respond(exc.status, f"{exc}\n", headers=exc.headers)

    def _session(self, head: Head) -> HttpSession:
        session_id = head.header("mcp-session-id")
        if session_id is None:
            raise HttpError(400, "Mcp-Session-Id header required (send initialize first)")
        session = self.sessions.get(session_id)
        if session is None:
            raise HttpError(404, "unknown or expired MCP session; initialize a new one")
        version = head.header("mcp-protocol-version")
        if version is not None and version not in SUPPORTED_VERSIONS:
            raise HttpError(400, f"unsupported MCP-Protocol-Version: {version}")
        session.last_seen = trio.current_time()
        return session

    async def _post(self, exchange: Exchange, body: bytes) -> None:
        accept = exchange.head.header("accept") or "*/*"
        json_ok = JSON_TYPE in accept or "*/*" in accept
        sse_ok = SSE_TYPE in accept or "*/*" in accept
        frame = parse_frame(body)
        if not frame.is_batch and len(frame.items) == 1 and isinstance(frame.items[0], Invalid):
            raise HttpError(400, "bad JSON-RPC message", rpc=frame.items[0].error)
        if not json_ok and not sse_ok:
            raise HttpError(406, f"Accept must allow {JSON_TYPE} or {SSE_TYPE}")
        first = frame.items[0] if len(frame.items) == 1 and not frame.is_batch else None
        if isinstance(first, Request) and first.method == "initialize":
            await self._initialize(exchange, first)
            return
        session = self._session(exchange.head)
        version = session.endpoint.protocol_version or ""
        if frame.is_batch and version >= "2025-06-18":
            raise HttpError(400, "batch", rpc=InvalidRequest(
                f"Invalid Request: no JSON-RPC batches in protocol version {version}"))
        if not any((isinstance(i, Request) and not i.is_notification) or isinstance(i, Invalid)
                   for i in frame.items):
            await session.endpoint.handle_frame(body)  # notifications and responses only
            await exchange.respond(202)
            return
        if isinstance(first, Request) and sse_ok and _streams(first):
            await self._post_streamed(exchange, session, first)
            return
        reply = await session.endpoint.handle_frame(body)
        if reply is None:  # cancelled by notifications/cancelled: no response
            await exchange.respond(202)
        else:
            await exchange.respond(200, encode(reply), JSON_TYPE)

    async def _initialize(self, exchange: Exchange, request: Request) -> None:
        session = HttpSession(uuid.uuid4().hex, self.manager)
        reply = await session.endpoint.dispatch(request)
        assert reply is not None
        if "error" in reply:
            session.close()
            await exchange.respond(200, encode(reply), JSON_TYPE)
            return
        assert self._nursery is not None
        self.sessions[session.id] = session
        self._nursery.start_soon(session.endpoint.run)
        log.info("mcp_session_started", mcp_session=session.id,
                 version=session.endpoint.protocol_version)
        await exchange.respond(200, encode(reply), JSON_TYPE,
                               [("Mcp-Session-Id", session.id)])

    async def _post_streamed(self, exchange: Exchange, session: HttpSession,
                             request: Request) -> None:
        """Run *request* in the registry's nursery (a dropped connection does not cancel it)
        and follow its event stream on this connection."""
        stream = session.new_stream("r")
        assert self._nursery is not None
        self._nursery.start_soon(_run_streamed, session, stream, request,
                                 structlog.contextvars.get_contextvars())
        await exchange.start_sse()
        if (session.endpoint.protocol_version or "") >= "2025-11-25":
            # priming: the point to resume from, and how soon to come back after a drop
            await exchange.write(sse_event(f"{stream.id}:-1", "", retry_ms=RETRY_MS))
        await self._follow(exchange, stream)

    async def _get(self, exchange: Exchange) -> None:
        accept = exchange.head.header("accept") or "*/*"
        if SSE_TYPE not in accept and "*/*" not in accept:
            raise HttpError(406, f"Accept must allow {SSE_TYPE}")
        session = self._session(exchange.head)
        last_id = exchange.head.header("last-event-id")
        if last_id is None:
            if session.standalone is not None:
                session.standalone.close()
            session.standalone = stream = session.new_stream("g")
            await exchange.start_sse()
            await exchange.write(sse_event(f"{stream.id}:-1", "", retry_ms=RETRY_MS))
            await self._follow(exchange, stream)
            return
        stream_id, _, seq_text = last_id.rpartition(":")
        resumed = session.streams.get(stream_id)
        if resumed is None or resumed.closed or not seq_text.lstrip("-").isdigit():
            raise HttpError(400, f"unknown Last-Event-ID: {last_id}")
        try:
            resumed.resume_after(int(seq_text))
        except ReplayUnavailable as exc:
            raise HttpError(400, exc.message) from None
        if resumed.finished:
            raise HttpError(410, f"stream {stream_id} has ended and was fully delivered")
        self.resumptions += 1
        log.info("mcp_stream_resumed", stream=stream_id, after=int(seq_text))
        await exchange.start_sse()
        await self._follow(exchange, resumed)

    async def _follow(self, exchange: Exchange, stream: EventStream) -> None:
        outcome = await stream.follow(exchange.write, max_s=self.settings.mcp_sse_max)
        if outcome == "replaced":  # another connection has the stream now: just hang up
            return
        if outcome == "paused":  # closed early on purpose: tell the client how soon to resume
            await exchange.write(f"retry: {RETRY_MS}\n\n".encode())
        await exchange.end()


def _streams(request: Request) -> bool:
    params = request.params if isinstance(request.params, dict) else {}
    return request.method == "tools/call" and params.get("name") in STREAMED_TOOLS


async def _run_streamed(session: HttpSession, stream: EventStream, request: Request,
                        context: dict[str, object]) -> None:
    """Dispatch *request* with its notifications going to *stream*, then its response."""
    CURRENT_STREAM.set(stream)  # this task's own context: nobody else sees it
    with structlog.contextvars.bound_contextvars(**context):
        try:
            reply = await session.endpoint.dispatch(request)
            if reply is not None:
                await stream.push(reply)
        except OwnerGone:
            pass
        finally:
            stream.finish()


# ------------------------------------------------------------------------------------ HTTP


class Exchange:
    """One request/response on a TCP stream, framed by h11 (the head is already read)."""

    def __init__(self, stream: trio.abc.Stream, head: Head) -> None:
        self.stream = stream
        self.head = head
        self.h11 = h11.Connection(h11.SERVER)
        self.h11.receive_data(head.raw)
        event = self.h11.next_event()
        assert isinstance(event, h11.Request), event

    async def read_body(self, limit: int) -> bytes:
        """The whole request body (413 beyond *limit* bytes, 400 if it is malformed)."""
        body = bytearray()
        with trio.move_on_after(BODY_TIMEOUT_S):
            while True:
                try:
                    event = self.h11.next_event()
                except h11.RemoteProtocolError as exc:
                    raise HttpError(exc.error_status_hint, str(exc)) from None
                if event is h11.NEED_DATA:
                    try:
                        data = await self.stream.receive_some(READ_BYTES)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    self.h11.receive_data(bytes(data))
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limit:
                        raise HttpError(413, f"body exceeds {limit} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    return bytes(body)
                else:  # ConnectionClosed before the end
                    raise HttpError(400, "incomplete request body")
        raise HttpError(408, "request body not received in time")

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(self.h11.send(h11.Data(data=data)) or b"")

    async def start_sse(self) -> None:
        headers = [("Content-Type", SSE_TYPE), ("Cache-Control", "no-cache"),
                   ("Connection", "close")]
        await self.stream.send_all(self.h11.send(h11.Response(status_code=200,
                                                              headers=headers)) or b"")

    async def end(self) -> None:
        await self.stream.send_all(self.h11.send(h11.EndOfMessage()) or b"")

    async def respond(self, status: int, body: str = "", content_type: str = "text/plain; "
                      "charset=utf-8", headers: Sequence[tuple[str, str]] = ()) -> None:
        """A complete response; a peer that went away meanwhile is not an error."""
        payload = body.encode("utf-8", "surrogatepass")
        all_headers = [("Connection", "close"), *headers]
        if status not in (204, 304):
            all_headers += [("Content-Type", content_type),
                            ("Content-Length", str(len(payload)))]
        try:
            data = self.h11.send(h11.Response(status_code=status, headers=all_headers)) or b""
            if payload and status not in (204, 304):
                data += self.h11.send(h11.Data(data=payload)) or b""
            data += self.h11.send(h11.EndOfMessage()) or b""
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass


async def _self_check() -> None:
    stream = EventStream("r1", Outbox(1024))
    await stream.push({"n": 1})
    await stream.push({"n": 2})
    written: list[bytes] = []

    async def write(data: bytes) -> None:
        written.append(data)

    stream.finish()
    assert await stream.follow(write, max_s=0) == "finished"
    assert written == [b'id: r1:0\ndata: {"n":1}\n\n', b'id: r1:1\ndata: {"n":2}\n\n'], written
    stream.resume_after(0)  # the client saw event 0 only: event 1 again
    written.clear()
    assert await stream.follow(write, max_s=0) == "finished" and len(written) == 1
    print("ccx.transport.mcp_http: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
