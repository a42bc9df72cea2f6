"""Plain HTTP on the WebSocket port: read one request head, answer it or hand it to WebSocket.

Inputs: a fresh TCP stream from the listener.
Outputs: a parsed `h11.Request` and the raw bytes read (for replay into the WebSocket
handshake), plain answers (`/health`, `/metrics`, 404, 405, 426, 400, 431) written with h11,
and `ReplayStream`, which gives trio-websocket the bytes already consumed.
Why: wsproto answers any non-upgrade request with 400 before a handler sees it, so the head
is read here first.
Docs: https://h11.readthedocs.io/en/latest/api.html
      https://trio.readthedocs.io/en/stable/reference-io.html#abstract-base-classes
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import attrs
import h11
import trio

MAX_HEAD_BYTES = 16 * 1024  # request line + headers; more is answered 431
READ_BYTES = 4096  # per receive while reading the head
HEAD_TIMEOUT_S = 10.0  # a client that sends no complete head in this time is dropped


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


async def read_head(stream: trio.abc.ReceiveStream) -> Head | None:
    """Read until the end of the request head; None if the peer closed before sending one.

    **Cancellation**: bounded by `HEAD_TIMEOUT_S` (then None); safe to cancel.
    """
    buffer = bytearray()
    with trio.move_on_after(HEAD_TIMEOUT_S):
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
    data = connection.send(h11.Response(status_code=status, headers=all_headers)) or b""
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
