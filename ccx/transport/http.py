"""Plain HTTP on the WebSocket port: read one request head, answer it or hand it to WebSocket.

Inputs: a fresh TCP stream from the listener.
Outputs: a parsed `h11.Request` and the raw bytes read (for replay into the WebSocket
handshake), plain answers (`/health`, `/metrics`, 404, 405, 426, 400, 431, and the 401, 403
and 503 refusals) written with h11,
`ReplayStream`, which gives trio-websocket the bytes already consumed, and `Exchange`, one
whole request/response (body read, streamed answers) framed by h11, for `/mcp`.
Why: wsproto answers any non-upgrade request with 400 before a handler sees it, so the head
is read here first.
Docs: https://h11.readthedocs.io/en/latest/api.html
      https://trio.readthedocs.io/en/stable/reference-io.html#abstract-base-classes
"""

from __future__ import annotations

import http
import json
from collections.abc import Sequence

import attrs
import h11
import trio

from ccx.errors import RpcError

MAX_HEAD_BYTES = 16 * 1024  # request line + headers; more is answered 431
READ_BYTES = 4096  # per receive while reading the head
HEAD_TIMEOUT_S = 10.0  # default: a client that sends no complete head in this time is dropped
BODY_TIMEOUT_S = 30.0  # a client that sends no complete body in this time is dropped
BODY_READ_BYTES = 64 * 1024  # per receive while reading a body
DISCARD_TIMEOUT_S = 1.0  # how long an unread body is drained before an error answer
SSE_TYPE = "text/event-stream"


class BadHead(Exception):
    """The request head is malformed or too large; `status` says how to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@attrs.frozen
class Head:
    """A parsed request head and every byte read so far (head and anything after it)."""

    request: h11.Request
    raw: bytes

    @property
    def method(self) -> str:
        return self.request.method.decode("ascii", "replace")

    @property
    def target(self) -> str:
        return self.request.target.decode("ascii", "replace")

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        for key, value in self.request.headers:
            if key == wanted:
                return value.decode("latin-1")
        return None

    @property
    def is_websocket_upgrade(self) -> bool:
        upgrade = (self.header("upgrade") or "").lower()
        connection = (self.header("connection") or "").lower()
        return "websocket" in upgrade and "upgrade" in connection


async def read_head(stream: trio.abc.ReceiveStream,
                    timeout: float = HEAD_TIMEOUT_S) -> Head | None:
    """Read until the end of the request head; None if the peer closed before sending one.

    **Cancellation**: bounded by *timeout* s (then None: CCX_HEAD_TIMEOUT); safe to cancel.
    """
    buffer = bytearray()
    with trio.move_on_after(timeout):
        while b"\r\n\r\n" not in buffer:
            if len(buffer) > MAX_HEAD_BYTES:
                raise BadHead(431, "Request Header Fields Too Large")
            try:
                data = await stream.receive_some(READ_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            buffer += data
        connection = h11.Connection(h11.SERVER)
        connection.receive_data(bytes(buffer))
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadHead(exc.error_status_hint, str(exc)) from None
        if not isinstance(event, h11.Request):
            raise BadHead(400, "Bad Request")
        return Head(event, bytes(buffer))
    return None


async def send_plain(
    stream: trio.abc.SendStream,
    status: int,
    body: bytes | str | dict[str, object],
    *,
    content_type: str = "text/plain; charset=utf-8",
    headers: Sequence[tuple[str, str]] = (),
    head_only: bool = False,
) -> None:
    """Write one complete HTTP/1.1 response and close the connection side of it."""
    if isinstance(body, dict):
        body = json.dumps(body)
        content_type = "application/json"
    payload = body.encode() if isinstance(body, str) else body
    connection = h11.Connection(h11.SERVER)
    # h11 needs to have seen a request before it lets us respond; feed it a minimal one.
    connection.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    connection.next_event()
    all_headers = [("Content-Type", content_type), ("Content-Length", str(len(payload))),
                   ("Connection", "close"), *headers]
    data = connection.send(h11.Response(status_code=status, headers=all_headers,
                                        reason=_reason(status))) or b""
    if not head_only:
        data += connection.send(h11.Data(data=payload)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


class ReplayStream(trio.abc.Stream):
    """A stream that first yields bytes already read from *inner*, then reads *inner*."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.inner, trio.abc.HalfCloseableStream):
            await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class HttpError(Exception):
    """Answer the exchange with `status` and a short text (or a JSON-RPC error body)."""

    def __init__(self, status: int, text: str, *, rpc: RpcError | None = None,
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(text)
        self.status = status
        self.rpc = rpc
        self.headers = headers


class Exchange:
    """One request/response on a TCP stream, framed by h11 (the head is already read)."""

    def __init__(self, stream: trio.abc.Stream, head: Head) -> None:
        self.stream = stream
        self.head = head
        self.h11 = h11.Connection(h11.SERVER)
        self.body_read = False
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
                        data = await self.stream.receive_some(BODY_READ_BYTES)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    self.h11.receive_data(bytes(data))
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limit:
                        raise HttpError(413, f"body exceeds {limit} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    self.body_read = True
                    return bytes(body)
                else:  # ConnectionClosed before the end
                    raise HttpError(400, "incomplete request body")
        raise HttpError(408, "request body not received in time")

    async def discard_body(self, limit: int) -> None:
        """Drain what is left of the request body (bounded), so that closing after an error
        answer does not reset the connection (losing the answer) under the client."""
        if self.body_read:
            return
        with trio.move_on_after(DISCARD_TIMEOUT_S):
            try:
                await self.read_body(limit)
            except HttpError:
                pass

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(self.h11.send(h11.Data(data=data)) or b"")

    async def start_sse(self) -> None:
        headers = [("Content-Type", SSE_TYPE), ("Cache-Control", "no-cache"),
                   ("Connection", "close")]
        await self.stream.send_all(self.h11.send(h11.Response(status_code=200, reason=b"OK",
                                                              headers=headers)) or b"")

    async def end(self) -> None:
        await self.stream.send_all(self.h11.send(h11.EndOfMessage()) or b"")

    async def respond(self, status: int, body: str = "",
                      content_type: str = "text/plain; charset=utf-8",
                      headers: Sequence[tuple[str, str]] = ()) -> None:
        """A complete response; a peer that went away meanwhile is not an error."""
        payload = body.encode("utf-8", "surrogatepass")
        all_headers = [("Connection", "close"), *headers]
        if status not in (204, 304):
            all_headers += [("Content-Type", content_type),
                            ("Content-Length", str(len(payload)))]
        try:
            data = self.h11.send(h11.Response(status_code=status, headers=all_headers,
                                              reason=_reason(status))) or b""
            if payload and status not in (204, 304):
                data += self.h11.send(h11.Data(data=payload)) or b""
            data += self.h11.send(h11.EndOfMessage()) or b""
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass


def _reason(status: int) -> bytes:
    """The standard reason phrase ("426 Upgrade Required"), as PROTOCOL.md writes them."""
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


async def _self_check() -> None:
    """A head split over two sends, read whole with what follows it; a plain response."""
    import trio.testing

    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"GET /health?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n")
    await client.send_all(b"Connection: Upgrade\r\n\r\nrest")
    head = await read_head(server, timeout=1)
    assert head is not None and head.path == "/health" and head.is_websocket_upgrade
    assert head.header("HOST") == "a" and head.raw.endswith(b"rest")
    await send_plain(server, 404, {"error": "nope"})
    reply = await client.receive_some(4096)
    assert reply.startswith(b"HTTP/1.1 404 ") and reply.endswith(b'{"error": "nope"}'), reply
    await client.send_all(b"\x00garbage\r\n\r\n")
    try:
        await read_head(server, timeout=1)
    except BadHead as exc:
        assert exc.status == 400, exc.status
    else:
        raise AssertionError("a malformed head must be refused")
    print("ccx.transport.http: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
