"""A minimal, fast, synchronous WebSocket client (RFC 6455) for the benchmark readers.

Inputs: a `ws://host:port/path` URL; text frames to send (masked, as a client must).
Outputs: whole messages `(opcode, payload)` parsed straight out of one receive buffer, with
no per-frame allocation beyond the payload copy; pings are answered, close ends the stream.
It exists so that the reader is never the bottleneck: `websockets` and trio-websocket cost
tens of microseconds per message, which would hide a server sending one frame per line.
The reader's own ceiling is measured against `bench/fakeserver.py` (see `bench/run.py`).
Docs: https://www.rfc-editor.org/rfc/rfc6455#section-5.2 (base framing)
"""

from __future__ import annotations

import base64
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
RECV_BYTES = 1 << 20  # one recv() takes up to 1 MiB: few syscalls per 64 KiB frame


class Closed(Exception):
    """The server closed the connection (close frame or EOF)."""


def mask_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame: FIN + opcode, MASK bit and a random 4-byte key."""
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    elif length < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    key = os.urandom(4)
    repeated = (key * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        length, "big") if length else b""
    return head + key + masked


class WsClient:
    """One blocking WebSocket connection. `socket` may be given to a selector."""

    def __init__(self, url: str, *, timeout: float | None = 30.0) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        request = (f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise Closed("EOF during handshake")
            head += chunk
        status_line = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status_line + b" ":
            raise Closed(f"handshake refused: {status_line!r}")
        self.buf = bytearray(head.split(b"\r\n\r\n", 1)[1])
        self.wire_bytes = len(self.buf)
        self.closed = False
        self._fragments: list[bytes] = []
        self._fragment_op = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_text(self, text: str) -> None:
        self.sock.sendall(mask_frame(OP_TEXT, text.encode()))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.sendall(mask_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
            except OSError:
                pass
        self.sock.close()

    def receive_into_buffer(self, max_bytes: int = RECV_BYTES) -> int:
        """One recv(); returns the byte count (0 = EOF, also marks the connection closed)."""
        chunk = self.sock.recv(max_bytes)
        if not chunk:
            self.closed = True
            return 0
        self.buf += chunk
        self.wire_bytes += len(chunk)
        return len(chunk)

    def messages(self) -> Iterator[tuple[int, memoryview]]:
        """Every complete message now in the buffer (control frames handled here).

        Payloads are views into the receive buffer, valid until the next item: copy
        (`bytes(view)`) what must outlive that. The iterator must be run to its end.
        """
        buf = self.buf
        size = len(buf)
        pos = 0
        view = memoryview(buf)
        try:
            while size - pos >= 2:
                b0 = buf[pos]
                length = buf[pos + 1] & 0x7F
                head = 2
                if length == 126:
                    if size - pos < 4:
                        break
                    length = (buf[pos + 2] << 8) | buf[pos + 3]
                    head = 4
                elif length == 127:
                    if size - pos < 10:
                        break
                    length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                    head = 10
                end = pos + head + length
                if end > size:
                    break
                start, pos = pos + head, end
                opcode = b0 & 0x0F
                if opcode in (OP_TEXT, OP_BINARY) and b0 & 0x80:
                    payload = view[start:end]
                    yield opcode, payload
                    payload.release()
                elif opcode in (OP_TEXT, OP_BINARY, OP_CONT):
                    if opcode != OP_CONT:
                        self._fragment_op = opcode
                    self._fragments.append(bytes(view[start:end]))
                    if b0 & 0x80:
                        joined = memoryview(b"".join(self._fragments))
                        self._fragments = []
                        yield self._fragment_op, joined
                elif opcode == OP_PING:
                    self.sock.sendall(mask_frame(OP_PONG, bytes(view[start:end])))
                elif opcode == OP_CLOSE:
                    self.closed = True
                    break
        finally:
            view.release()
            del buf[:pos]
