"""One WebSocket connection: handshake refusals (token 401, origin 403; the rules are in
`ccx.transport.policy`, the answers written here before trio-websocket sees the stream, so
they carry reason phrases), frames in, responses out.

Inputs: a TCP stream whose request head was already read (`Head`), the `SessionManager`.
Outputs: a `Connection` that is the `Owner` of the sessions it starts: it reads frames, runs
each request in its own task (at most `MAX_IN_FLIGHT` at once, so a flood back-pressures),
sends responses and session notifications, and cancels its sessions when it closes.

Input back-pressure (PROTOCOL.md section 6, docs/security.md): a frame that carries
child input (native `input`, MCP `tools/call` of `send_input`) is charged its size in bytes
to the connection's `InputBudget` (CCX_MAX_INPUT_BYTES) until its request is answered, i.e.
its data is written to the child. When the next input frame does not fit, the reader waits
for room before it reads another frame: the client waits, as a writer on a full pipe does,
and TCP holds the rest. Memory per connection: the budget plus the frame in the reader's hand.
Only input frames wait for the budget; every request read before one (control included) is
already running, so it is never held behind input. Requests the client sends *after* an input
frame that waits are read when it fits: when the child reads, or when the session ends (an
end fails its pending writes with -32004, whoever cancelled it: another connection may).
While it waits, the socket is checked for a hang-up (FIN or RST) every 0.5 s: a client that
goes away then still loses its sessions (trio-websocket, not being read, cannot see the close).
A client offering the subprotocol `mcp` (or any upgrade on `/mcp`) gets an MCP connection
instead: its frames go to a `McpEndpoint`, which owns the sessions (PROTOCOL.md section 7).

Outgoing frames: messages are encoded once to UTF-8 JSON (sessions hold their notifications
that way), and the connection's writer puts each one on the wire as a text frame itself
(`FrameStream.send_text_frame`): trio-websocket's `send_message` only takes `str`, and
turning the bytes back into `str` for wsproto to encode and copy again cost ~110 us per
64 KiB chunk, a third of the server's time per chunk. This uses public API only: the
`FrameStream` is the stream we hand to `trio_websocket.wrap_server_stream`, and one lock in
it serializes our frames with everything trio-websocket writes (pongs, close), always whole
frames. It is valid because the server negotiates no extension (trio-websocket offers none,
so no permessage-deflate: a test checks) and server frames are never masked; frames stop once
trio-websocket has started to close (`ws.closed`, set before it writes the close frame).
Docs: https://trio-websocket.readthedocs.io/en/stable/api.html
      https://websockets.spec.whatwg.org/ and RFC 6455 sections 5.2 (framing), 7.4 (codes)
"""

from __future__ import annotations

import itertools
import math
import struct

import attrs
import structlog
import trio
import trio_websocket

from ccx import api
from ccx.config import Settings
from ccx.events import Event
from ccx.log import clip, get_logger
from ccx.manager import SessionManager
from ccx.mcp import McpEndpoint
from ccx.owner import OwnerGone
from ccx.protocol import (
    Frame,
    Invalid,
    encode_event,
    encode_utf8,
    error_response,
    parse_frame,
)
from ccx.transport.http import Head, ReplayStream, send_plain
from ccx.transport.input_budget import InputBudget, carries_input
from ccx.transport.policy import BROWSER_SUBPROTOCOL, origin_ok, token_ok

log = get_logger("ccx.websocket")

MAX_IN_FLIGHT = 64  # requests of one connection being handled at once; more waits to be read
HANDSHAKE_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
CLOSE_TOO_BIG = 1009
CLOSE_GOING_AWAY = 1001
WS_PATHS = ("/ws", "/ws/mcp", "/mcp")
MCP_SUBPROTOCOL = "mcp"
MCP_PATH = "/mcp"  # an upgrade here speaks MCP even without the subprotocol

_connection_ids = itertools.count(1)

TEXT_FIN = 0x81  # FIN + opcode 1 (text): a whole message in one frame
CLOSE_FIN = 0x88  # FIN + opcode 8 (close): control frames are never fragmented


def text_frame_header(length: int) -> bytes:
    """RFC 6455 section 5.2 header of an unmasked (server) text frame of *length* bytes."""
    if length < 126:
        return bytes((TEXT_FIN, length))
    if length < 1 << 16:
        return struct.pack("!BBH", TEXT_FIN, 126, length)
    return struct.pack("!BBQ", TEXT_FIN, 127, length)


class FrameStream(ReplayStream):
    """The stream trio-websocket runs over, which can also write pre-encoded text frames.

    Every write (trio-websocket's whole frames through `send_all`, ours through
    `send_text_frame`) takes one lock, so frames never interleave.
    """

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        super().__init__(inner, prefix)
        self._write_lock = trio.StrictFIFOLock()
        self.close_sent = False  # a Close frame is on the wire: no data frame may follow

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """trio-websocket's writes: whole frames, one per call (wsproto's bytes for one
        event); a Close frame among them is noted (RFC 6455 5.5.1)."""
        async with self._write_lock:
            if len(data) and data[0] == CLOSE_FIN:  # (the HTTP handshake starts "HTTP/")
                self.close_sent = True
            await self.inner.send_all(data)

    async def send_text_frame(self, payload: bytes) -> bool:
        """Write *payload* (valid UTF-8) as one text frame; False, writing nothing, once a
        Close frame was written (RFC 6455 5.5.1: no data frame after it; the close handshake
        may still be under way, so trio-websocket's `closed` is not yet set). Raises
        `trio.BrokenResourceError` / `ClosedResourceError` as `send_all`.

        **Cancellation**: like `send_all`, a cancelled write may leave part of a frame; only
        the connection's own teardown cancels it, and nothing is written after that.
        """
        async with self._write_lock:
            if self.close_sent:
                return False
            await self.inner.send_all(text_frame_header(len(payload)) + payload)
        return True


@attrs.define(eq=False)
class Connection:
    """A live WebSocket peer: reads requests, answers, and owns the sessions it starts."""

    ws: trio_websocket.WebSocketConnection
    manager: SessionManager
    settings: Settings
    wire: FrameStream  # the stream under `ws`: writes our pre-encoded frames
    speaks_mcp: bool = False
    id: str = attrs.field(factory=lambda: f"c{next(_connection_ids)}")
    closed: bool = False
    mcp: McpEndpoint | None = attrs.field(init=False, default=None)
    _in_flight: trio.Semaphore = attrs.field(factory=lambda: trio.Semaphore(MAX_IN_FLIGHT))
    input: InputBudget = attrs.field(init=False)
    _outgoing: trio.MemorySendChannel[bytes] = attrs.field(init=False)
    _outgoing_receive: trio.MemoryReceiveChannel[bytes] = attrs.field(init=False)
    _drained: trio.Event = attrs.field(factory=trio.Event)
    close_deadline: float = math.inf  # set at server shutdown: no close waits beyond it

    def __attrs_post_init__(self) -> None:
        # Capacity 0: a sender waits until the writer takes its message, so a slow peer
        # back-pressures every session of this connection and nothing queues up here.
        self._outgoing, self._outgoing_receive = trio.open_memory_channel[bytes](0)
        self.input = InputBudget(self.settings.max_input_bytes)
        if self.speaks_mcp:
            self.mcp = McpEndpoint(self.manager, self.send_message)

    async def send_message(self, message: dict[str, object] | list[dict[str, object]]) -> None:
        """Hand one JSON-RPC message (or batch) to the writer; raise `OwnerGone` once the peer
        is gone. Waits while the writer is busy: that wait is the back-pressure.

        **Cancellation**: safe. A message is either taken whole by the writer or not at all,
        so an abandoned hand-over never leaves half a frame on the socket.
        """
        await self.send_frame(encode_utf8(message))

    async def send_event(self, event: Event) -> None:
        """The sink of a session's events (`ccx.owner.Owner`): each is encoded once, here,
        as it goes to this connection's writer (`encode_event`); waits as `send_message`."""
        await self.send_frame(encode_event(event))

    async def send_frame(self, frame: bytes) -> None:
        """`send_message` for a message already encoded (`encode_utf8`): events, and frames
        relayed unparsed from another node (`ccx.cluster`)."""
        if self.closed:
            raise OwnerGone(self.id)
        try:
            await self._outgoing.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise OwnerGone(self.id) from None

    async def _write(self) -> None:
        """The only task that writes messages: one frame each, in hand-over order."""
        try:
            async with self._outgoing_receive:
                async for frame in self._outgoing_receive:
                    try:
                        sent = await self.wire.send_text_frame(frame)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        sent = False
                    if not sent:
                        self.closed = True
                        break
        finally:  # also when cancelled: nothing more will be written, `close` need not wait
            self._drained.set()

    async def serve(self) -> None:
        """Read frames until the peer goes; then release what this connection owns.

        **Cancellation**: cancelling it (server shutdown) ends the request tasks; sessions are
        released (detached or cancelled) either way.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write)
                if self.mcp is not None:
                    nursery.start_soon(self.mcp.run)
                if self.settings.ws_ping_interval > 0:
                    nursery.start_soon(self._keepalive)
                await self._read_frames(nursery)
                nursery.cancel_scope.cancel()
        finally:
            self.closed = True
            self._outgoing.close()
            if self.mcp is not None:
                self.mcp.close()  # releases the sessions the endpoint owns
            self.manager.release(self)

    async def _read_frames(self, nursery: trio.Nursery) -> None:
        limit = self.settings.max_message_bytes
        while True:
            try:
                message = await self.ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            size = len(message.encode("utf-8", "surrogatepass")) if isinstance(message, str) \
                else len(message)
            if size > limit:  # trio-websocket counts characters; the contract counts bytes
                log.warning("frame_too_big", bytes=size, limit=limit)
                with trio.move_on_after(CLOSE_TIMEOUT_S):
                    await self.ws.aclose(CLOSE_TOO_BIG, f"message exceeds {limit} bytes")
                return
            frame = parse_frame(message)
            del message  # the parsed frame is what stays in memory
            charge = size if carries_input(frame) else 0
            if charge and not await self._input_room(charge):
                log.info("peer_hung_up", waiting_for="input room")
                return  # as a close: the connection's sessions are released
            await self._in_flight.acquire()
            nursery.start_soon(self._handle_frame, frame, charge)

    async def _input_room(self, charge: int) -> bool:
        """Wait until *charge* bytes of input fit (back-pressure: the reader stops reading, as
        a writer on a full pipe waits); False, with nothing charged, if the peer hung up.

        While the reader waits, trio-websocket reads no further frame either (its queue is
        full), so a close frame or EOF behind the client's unread frames would go unseen
        until the child reads, and the connection's sessions would run on without it. So
        the socket itself is checked for a hang-up (peer FIN: POLLRDHUP, seen even with
        unread data before it; RST: POLLERR/POLLHUP) every `input_budget.HANGUP_POLL_S`, only while
        waiting: no event exists for it without reading.
        """
        sock = getattr(self.wire.inner, "socket", None)
        return await self.input.acquire_unless_hung_up(charge, [] if sock is None else [sock])

    async def _handle_frame(self, frame: Frame, charge: int) -> None:
        try:
            if self.mcp is not None:
                try:
                    reply = await self.mcp.handle_parsed(frame)
                    if reply is not None:
                        await self.send_message(reply)
                except OwnerGone:
                    pass
            else:
                await self._handle_native(frame)
        finally:
            self._in_flight.release()
            if charge:
                self.input.release(charge)

    async def _handle_native(self, frame: Frame) -> None:
        replies: list[dict[str, object]] = []
        hooks = []
        for item in frame.items:
            if isinstance(item, Invalid):
                replies.append(error_response(item.id, item.error))
                continue
            call = api.Call(self.manager, self, item.params)
            try:
                reply = await api.dispatch(item, call)
            finally:
                hooks += call.after_response
            if reply is not None:
                replies.append(reply)
        try:
            if replies:
                await self.send_message(replies if frame.is_batch else replies[0])
        except OwnerGone:
            pass
        finally:
            for hook in hooks:  # e.g. let execute's notifications follow its response
                hook()

    async def _keepalive(self) -> None:
        """Ping every CCX_WS_PING_INTERVAL s. No pong is demanded: a reader that is merely
        slow must not be cut off, and back-pressure may hold the ping behind output."""
        while True:
            await trio.sleep(self.settings.ws_ping_interval)
            with trio.move_on_after(self.settings.ws_ping_interval):
                try:
                    await self.ws.ping()
                except trio_websocket.ConnectionClosed:
                    return

    async def close(self, code: int, reason: str) -> None:
        """Let the requests under way be answered (an `execute` whose child has started)
        and the writer send what it was handed (completions at shutdown), then close; give
        up after CLOSE_TIMEOUT_S or at `close_deadline` (the server's shutdown)."""
        with trio.move_on_at(min(trio.current_time() + CLOSE_TIMEOUT_S, self.close_deadline)):
            for _ in range(MAX_IN_FLIGHT):  # every permit back: no request is being handled
                await self._in_flight.acquire()  # (and the reader starts no new one)
            self._outgoing.close()
            if not self.ws.closed:
                await self._drained.wait()
            await self.ws.aclose(code, reason)


def _peer(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("?", 0)
    except OSError:
        return "?"
    return f"{host}:{port}"


async def serve_websocket(
    stream: trio.abc.Stream,
    head: Head,
    manager: SessionManager,
    settings: Settings,
    connections: set[Connection],
) -> None:
    """Finish the handshake on *stream* (401/403 refusals included) and serve the connection.

    **Cancellation**: the connection is closed and its sessions released on the way out.
    """
    # Refusals are written here, before trio-websocket sees the stream: wsproto's
    # `reject` writes no reason phrase ("HTTP/1.1 401 "), and a refused client costs no
    # handshake work.
    if not token_ok(settings, head):
        log.warning("handshake_rejected", status=401, path=clip(head.path))
        await send_plain(stream, 401, "missing or wrong token\n",
                         headers=[("WWW-Authenticate", "Bearer")])
        return
    if not origin_ok(settings, head.header("origin"), head.header("host")):
        log.warning("handshake_rejected", status=403, origin=clip(head.header("origin")))
        await send_plain(stream, 403, "origin not allowed\n")
        return
    async with trio.open_nursery() as nursery:
        wire = FrameStream(stream, head.raw)
        with trio.move_on_after(HANDSHAKE_TIMEOUT_S) as handshake:
            request = await trio_websocket.wrap_server_stream(
                nursery, wire,
                max_message_size=settings.max_message_bytes,
            )
        if handshake.cancelled_caught:
            nursery.cancel_scope.cancel()
            return
        offered_mcp = MCP_SUBPROTOCOL in request.proposed_subprotocols
        # A browser offers `ccx` (and maybe `ccx.bearer.<token>`): only `ccx` is selected.
        selected = MCP_SUBPROTOCOL if offered_mcp else (
            BROWSER_SUBPROTOCOL if BROWSER_SUBPROTOCOL in request.proposed_subprotocols
            else None)
        ws = await request.accept(subprotocol=selected)
        connection = Connection(ws, manager, settings, wire,
                                speaks_mcp=offered_mcp or head.path == MCP_PATH)
        connections.add(connection)
        with structlog.contextvars.bound_contextvars(connection_id=connection.id):
            log.info("connected", path=head.path, remote=_peer(stream),
                     protocol="mcp" if connection.speaks_mcp else "native")
            try:
                await connection.serve()
            finally:
                connections.discard(connection)
                with trio.CancelScope(shield=True):
                    await connection.close(1000, "")
                log.info("disconnected", close_code=int(ws.closed.code) if ws.closed else None)
        nursery.cancel_scope.cancel()


async def _self_check() -> None:
    """Frames over a real WebSocket: a parse error answered, a batch answered as a list, and
    a frame over CCX_MAX_MESSAGE_BYTES closing the connection with 1009."""
    import json

    from ccx.server import Server  # the server routes upgrades here; import it late

    settings = Settings(port=0, state_dir="", max_message_bytes=1024)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(Server(settings).run)
        async with trio_websocket.open_websocket_url(server.url) as ws:
            await ws.send_message("{")
            assert json.loads(await ws.get_message())["error"]["code"] == -32700
            ping = {"jsonrpc": "2.0", "method": "ping"}
            await ws.send_message(json.dumps([{**ping, "id": 1}, {**ping, "id": 2}]))
            replies = json.loads(await ws.get_message())
            assert sorted(r["id"] for r in replies) == [1, 2], replies
            await ws.send_message("x" * 2048)
            try:
                await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                assert exc.reason is not None and exc.reason.code == 1009, exc.reason
            else:
                raise AssertionError("an over-long frame must close the connection")
        server.stop()
    print("ccx.transport.websocket: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
