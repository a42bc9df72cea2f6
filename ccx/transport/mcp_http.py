"""MCP over Streamable HTTP at `/mcp`: POST for client messages, JSON or SSE answers, sessions.

Inputs: a plain (non-upgrade) HTTP request on `/mcp` whose head was already read (`Head`),
the `SessionManager` and `Settings`.
Outputs: one HTTP/1.1 exchange per TCP connection, framed by h11 (`Connection: close`):
- POST `initialize` → JSON with a new `Mcp-Session-Id` (random hex after `<node>.
  <incarnation>.` with CCX_NODE_NAME: PROTOCOL.md 10; at `CCX_MCP_HTTP_MAX_SESSIONS` the
  session idle longest is ended first; 503 when every one is busy); later POSTs need it (400
  without it, 404 for an unknown or expired one; an unsupported `MCP-Protocol-Version` is 400).
  Notifications and responses → 202. `tools/call` of `execute` → an SSE stream (progress
  notifications, then the response); any other request → `application/json`.
- GET → an SSE stream: with `Last-Event-ID`, the rest of the stream that id belongs to;
  without, a new stream of server-to-client messages (`notifications/message` logs).
- DELETE → ends the session and cancels every process it started (204), except those started
  with `linger`, which are detached (`McpEndpoint.close`).
Every SSE event has an id `<stream>:<seq>`; events are held (sent ones too, within
`CCX_REPLAY_BYTES` per stream: `ccx.transport.sse`) so a dropped stream is resumed by GET with
`Last-Event-ID` with nothing lost. A request keeps running when its stream drops.
Token (401) and Origin (403) rules are those of the WebSocket handshake.
Docs: https://modelcontextprotocol.io/specification/2025-11-25/basic/transports#streamable-http
      https://html.spec.whatwg.org/multipage/server-sent-events.html
      https://h11.readthedocs.io/en/latest/api.html
"""

from __future__ import annotations

import contextvars
import itertools
import json
import uuid

import attrs
import structlog
import trio

from ccx.config import Settings
from ccx.errors import InvalidRequest, ReplayUnavailable
from ccx.log import get_logger
from ccx.manager import SessionManager
from ccx.mcp import SUPPORTED_VERSIONS, McpEndpoint
from ccx.outbox import Outbox, SpoolOutbox
from ccx.owner import OwnerGone
from ccx.protocol import Invalid, Request, encode, error_response, parse_frame
from ccx.transport.http import SSE_TYPE, Exchange, Head, HttpError
from ccx.transport.policy import origin_ok, token_ok
from ccx.transport.sse import EventStream, sse_event

log = get_logger("ccx.mcp_http")

SWEEP_INTERVAL_S = 10.0  # how often idle sessions are looked for
RETRY_MS = 200  # `retry:` hint sent when the server closes a stream before its end
DONE_STREAMS_KEPT = 64  # finished response streams kept per session, at most, for resumption
STREAMED_TOOLS = frozenset({"execute"})  # tools/call answered as SSE: long, not idempotent
ALLOW = "GET, POST, DELETE"
JSON_TYPE = "application/json"

# The response stream of the request being handled: notifications it sends go there.
CURRENT_STREAM: contextvars.ContextVar[EventStream | None] = contextvars.ContextVar(
    "ccx_mcp_stream", default=None)


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
        self._forget_finished()
        stream_id = f"{prefix}{next(self._numbers)}"
        budget, spool = self.manager.settings.replay_bytes, self.manager.spool
        stream = EventStream(stream_id, Outbox(budget) if spool is None else
                             SpoolOutbox(budget, None, spool.spool(f"sse-{stream_id}", budget)))
        self.streams[stream.id] = stream
        return stream

    def _forget_finished(self) -> None:
        """Finished streams stay for late resumption: the newest `DONE_STREAMS_KEPT`, within
        one `CCX_REPLAY_BYTES` budget for all of them (oldest forgotten first)."""
        finished = [s for s in self.streams.values() if s.finished]  # oldest first
        held = sum(s.outbox.sent_bytes for s in finished)
        for index, old in enumerate(finished):
            if len(finished) - index <= DONE_STREAMS_KEPT and \
                    held <= self.manager.settings.replay_bytes:
                break
            held -= old.outbox.sent_bytes
            del self.streams[old.id]
            old.forget()

    @property
    def busy(self) -> bool:
        """A request runs or a stream is being written: the session is not idle."""
        return bool(self.endpoint.in_flight) or any(
            s._follower is not None for s in self.streams.values())

    def close(self) -> None:
        self.endpoint.close()  # cancels its processes, detaches those with linger
        for stream in self.streams.values():
            stream.forget()


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
            finally:  # one line for all: thousands of sessions must not slow the shutdown
                count = len(self.sessions)
                for session_id in list(self.sessions):
                    self.end(session_id, reason="server stopping", quiet=True)
                if count:
                    log.info("mcp_sessions_ended", count=count, reason="server stopping")

    def _end_idle(self) -> None:
        now = trio.current_time()
        for session in list(self.sessions.values()):
            if not session.busy and now - session.last_seen > self.settings.mcp_http_idle:
                self.end(session.id, reason="idle")

    def end(self, session_id: str, *, reason: str, quiet: bool = False) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            if not quiet:
                log.info("mcp_session_ended", mcp_session=session_id, reason=reason)
            session.close()

    def _make_room(self) -> None:
        """At CCX_MCP_HTTP_MAX_SESSIONS, end the session idle longest; 503 if all are busy."""
        if len(self.sessions) < self.settings.mcp_http_max_sessions:
            return
        idle = [s for s in self.sessions.values() if not s.busy]
        if not idle:
            raise HttpError(503, "too many MCP sessions, all busy", headers=[("Retry-After", "1")])
        self.end(min(idle, key=lambda s: s.last_seen).id, reason="evicted")

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
            if exc.status != 413:
                await exchange.discard_body(self.settings.max_message_bytes)
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
        self._make_room()
        session = HttpSession(self.manager.id_prefix + uuid.uuid4().hex, self.manager)
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
            await exchange.write(sse_event(f"{stream.id}:-1", b"", retry_ms=RETRY_MS))
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
            await exchange.write(sse_event(f"{stream.id}:-1", b"", retry_ms=RETRY_MS))
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


async def _post_raw(port: int, body: dict[str, object], *headers: str) -> tuple[str, bytes]:
    """POST *body* to /mcp; the whole answer (the server closes after it): head, body."""
    payload = json.dumps(body).encode()
    head = "\r\n".join(["POST /mcp HTTP/1.1", "Host: 127.0.0.1", "Accept: */*",
                        f"Content-Length: {len(payload)}", *headers, "", ""])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(head.encode() + payload)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    answer_head, _, answer_body = data.partition(b"\r\n\r\n")
    return answer_head.decode("latin-1"), answer_body


async def _self_check() -> None:
    from ccx.server import Server

    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(Server(Settings(port=0, kill_grace=1.0)).run)
        assert server.port is not None
        head, body = await _post_raw(server.port, {
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}}})
        assert head.startswith("HTTP/1.1 200") and b'"2025-11-25"' in body, (head, body)
        session_id = head.lower().split("mcp-session-id: ", 1)[1].split("\r\n", 1)[0]
        head, _ = await _post_raw(server.port, {"jsonrpc": "2.0", "id": 2, "method": "ping"})
        assert head.startswith("HTTP/1.1 400"), head  # no session id
        head, body = await _post_raw(server.port, {"jsonrpc": "2.0", "id": 3, "method": "ping"},
                                     f"Mcp-Session-Id: {session_id}")
        assert head.startswith("HTTP/1.1 200") and b'"result":{}' in body, (head, body)
        server.stop()
    print("ccx.transport.mcp_http: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
