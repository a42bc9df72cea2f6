"""Helpers for the reliability suite: a raw WebSocket client that can misbehave, /proc probes.

`RawWs` speaks just enough RFC 6455 to do what a well-behaved client library refuses to do:
send text frames holding invalid UTF-8, binary frames, and vanish with a TCP reset (SO_LINGER
0). Incoming frames are parsed with wsproto.
Docs: https://www.rfc-editor.org/rfc/rfc6455#section-5.2
      https://python-hyper.org/projects/wsproto/en/stable/api.html
      https://man7.org/linux/man-pages/man7/socket.7.html (SO_LINGER)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

CCX = str(Path(sys.executable).with_name("ccx"))
OP_TEXT = 0x1
OP_BINARY = 0x2


class Closed(Exception):
    """The server closed the WebSocket (code) or the TCP connection (code None)."""

    def __init__(self, code: int | None) -> None:
        super().__init__(code)
        self.code = code


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One masked client frame (RFC 6455 5.2), whatever the payload holds."""
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if size < 4096 else \
        (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (size // 4 + 1))[:size], "big")
         ).to_bytes(size, "big")
    return head + mask + masked


class RawWs:
    """A WebSocket client over a plain trio socket; sends whatever frames it is told to."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._messages: list[str | bytes] = []
        self._text: list[str] = []
        self._bytes: list[bytes] = []
        self.close_code: int | None = None
        self.closed = False
        self._next_id = 0

    @classmethod
    async def connect(cls, port: int, path: str = "/ws") -> RawWs:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = cls(stream)
        await stream.send_all(client.ws.send(Request(host=f"127.0.0.1:{port}", target=path)))
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise Closed(None)
            client.ws.receive_data(data)
            for event in client.ws.events():
                if isinstance(event, AcceptConnection):
                    return client
                if isinstance(event, RejectConnection):
                    raise AssertionError(f"handshake rejected: {event.status_code}")

    async def send_raw(self, opcode: int, payload: bytes) -> None:
        await self.stream.send_all(frame(opcode, payload))

    async def send_json(self, value: Any) -> None:
        await self.send_raw(OP_TEXT, json.dumps(value).encode())

    async def request(self, method: str, params: Any = None) -> Any:
        self._next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": self._next_id, "method": method}
        if params is not None:
            message["params"] = params
        await self.send_json(message)
        while True:
            reply = json.loads(await self.receive())
            if isinstance(reply, dict) and reply.get("id") == self._next_id:
                return reply

    async def receive(self) -> str | bytes:
        """The next whole message; raises `Closed` once the server closes."""
        while not self._messages:
            if self.closed:
                raise Closed(self.close_code)
            try:
                data = await self.stream.receive_some(1 << 20)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                self.closed = True
                continue
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    self._text.append(event.data)
                    if event.message_finished:
                        self._messages.append("".join(self._text))
                        self._text = []
                elif isinstance(event, BytesMessage):
                    self._bytes.append(bytes(event.data))
                    if event.message_finished:
                        self._messages.append(b"".join(self._bytes))
                        self._bytes = []
                elif isinstance(event, CloseConnection):
                    self.close_code = event.code
                    self.closed = True
                elif isinstance(event, Ping):
                    await self.stream.send_all(frame(0xA, bytes(event.payload)))
        return self._messages.pop(0)

    def reset(self) -> None:
        """Vanish with a TCP RST instead of a FIN: SO_LINGER on, timeout 0, then close."""
        sock = self.stream.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    async def aclose(self) -> None:
        await self.stream.aclose()


def fd_count(pid: int) -> int:
    """Open fds of *pid*, not counting the short-lived ones of a /proc scan in progress."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        count += not target.startswith("/proc")
    return count


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot): tells a pid from its reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return int(raw[raw.rfind(b")") + 2 :].split()[19])


class Serve:
    """A `ccx serve` subprocess and the JSON log events it wrote before listening."""

    def __init__(self, state_dir: Path, *, prefix: Sequence[str] = (), **env: str) -> None:
        self.proc = subprocess.Popen(
            [*prefix, CCX, "serve", "--port", "0", "--kill-grace", "1"], stderr=subprocess.PIPE,
            env={**os.environ, "CCX_LOG_FORMAT": "json", "CCX_STATE_DIR": str(state_dir),
                 "CCX_TRACK_INTERVAL": "0.1", **env},
        )
        assert self.proc.stderr is not None
        self.events: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            event = json.loads(line)
            self.events.append(event)
            if event.get("event") == "listening":
                self.port = int(event["port"])
                # Keep reading: a full stderr pipe would block the server's logging.
                self._drain = threading.Thread(target=self._read_log, daemon=True)
                self._drain.start()
                return
        self.proc.kill()
        raise AssertionError(f"ccx serve did not start: {self.events}")

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"event": "unparsed", "line": line.decode("replace")})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=15)
        self._drain.join(timeout=5)
