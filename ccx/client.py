"""An async (trio) client for a ccx server: what the CLI, `ccx selftest` and the tests use.

Inputs: a server URL (`ws://127.0.0.1:8003/ws`) and an optional token.
Outputs: `Client` with `execute()` returning a `RemoteSession` (typed events, pause/resume/
cancel/send, `wait()` for the `Completed` result) and the query methods `sessions`, `status`,
`ping`, `server_info`; server errors are raised as `ServerError` (code, message, data).
Docs: https://trio-websocket.readthedocs.io/en/stable/clients.html
      ../shared/PROTOCOL.md
"""

from __future__ import annotations

import base64
import itertools
import json
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio_websocket

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # what we accept from a server, well above its 64 KiB chunks


class ServerError(Exception):
    """A JSON-RPC error answered by the server."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message
        self.data = data


class ConnectionLost(Exception):
    """The connection closed before the answer (or the session's completion) arrived."""


@attrs.frozen
class Started:
    session_id: str
    pid: int
    pgid: int
    command: list[str]


@attrs.frozen
class Output:
    session_id: str
    stream: str  # "stdout" | "stderr"
    data: bytes  # raw bytes (base64 mode) or the UTF-8 encoding of the decoded text
    seq: int

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@attrs.frozen
class Paused:
    session_id: str


@attrs.frozen
class Resumed:
    session_id: str


@attrs.frozen
class Completed:
    session_id: str
    status: str  # exited | killed | cancelled | timeout
    exit_code: int | None
    signal: str | None
    duration_s: float
    stdout_bytes: int
    stderr_bytes: int


Event = Started | Output | Paused | Resumed | Completed


def _event(method: str, params: dict[str, Any]) -> Event | None:
    sid = params["session_id"]
    if method == "process.output":
        raw = params["data"]
        data = base64.b64decode(raw) if params.get("encoding") == "base64" else raw.encode()
        return Output(sid, params["stream"], data, params["seq"])
    if method == "process.completed":
        return Completed(sid, params["status"], params.get("exit_code"), params.get("signal"),
                         params.get("duration_s", 0.0), params.get("stdout_bytes", 0),
                         params.get("stderr_bytes", 0))
    if method == "process.started":
        return Started(sid, params["pid"], params["pgid"], params["command"])
    if method == "process.paused":
        return Paused(sid)
    if method == "process.resumed":
        return Resumed(sid)
    return None


@attrs.define(eq=False)
class RemoteSession:
    """A session this client started: its events in order, its controls, its result.

    Events are buffered without bound until read, so a caller may await `pause()` inside
    its `async for` loop without deadlocking the connection; read them to keep memory flat.
    """

    client: Client
    id: str
    pid: int
    pgid: int
    _send: trio.MemorySendChannel[Event] = attrs.field(repr=False)
    _receive: trio.MemoryReceiveChannel[Event] = attrs.field(repr=False)
    result: Completed | None = None

    async def events(self) -> AsyncIterator[Event]:
        """Every event of the session, ending after `Completed`.

        Raises `ConnectionLost` if the connection closed first.
        """
        while self.result is None:
            try:
                event = await self._receive.receive()
            except trio.EndOfChannel:
                raise ConnectionLost(f"connection closed before session {self.id} completed")\
                    from None
            if isinstance(event, Completed):
                self.result = event
            yield event

    async def wait(self) -> Completed:
        """Discard remaining events and return the completion."""
        async for _ in self.events():
            pass
        assert self.result is not None
        return self.result

    async def pause(self) -> str:
        return await self.client.control(self.id, "PAUSE")

    async def resume(self) -> str:
        return await self.client.control(self.id, "RESUME")

    async def cancel(self) -> str:
        return await self.client.control(self.id, "CANCEL")

    async def send(self, data: bytes | str, *, eof: bool = False) -> int:
        """Write to the child's stdin (the session needs `stdin=True`)."""
        return await self.client.send_input(self.id, data, eof=eof)


@attrs.define(eq=False)
class Client:
    """One connection to a ccx server. Create it with `connect()`."""

    ws: trio_websocket.WebSocketConnection
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    _waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = attrs.field(factory=dict)
    _sessions: dict[str, RemoteSession] = attrs.field(factory=dict)
    _early: dict[str, list[Event]] = attrs.field(factory=dict)
    closed: bool = False

    async def _read(self) -> None:
        try:
            while True:
                message = json.loads(await self.ws.get_message())
                for item in message if isinstance(message, list) else [message]:
                    self._dispatch(item)
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            self.closed = True
            for channel in self._waiting.values():
                channel.close()
            for session in self._sessions.values():
                session._send.close()

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "method" in message:
            event = _event(message["method"], message.get("params") or {})
            if event is None:
                return
            session = self._sessions.get(event.session_id)
            if session is None:  # arrived before execute() registered it
                self._early.setdefault(event.session_id, []).append(event)
            else:
                session._send.send_nowait(event)
            return
        channel = self._waiting.pop(message.get("id"), None)  # type: ignore[arg-type]
        if channel is not None:
            channel.send_nowait(message)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send one request and return its result; raise `ServerError` for an error."""
        if self.closed:
            raise ConnectionLost("connection is closed")
        request_id = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[request_id] = send
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}
        try:
            await self.ws.send_message(json.dumps(message))
            reply = await receive.receive()
        except (trio_websocket.ConnectionClosed, trio.EndOfChannel):
            raise ConnectionLost(f"connection closed during {method}") from None
        finally:
            self._waiting.pop(request_id, None)
        if "error" in reply:
            error = reply["error"]
            raise ServerError(error.get("code", 0), error.get("message", ""), error.get("data"))
        return reply["result"]

    async def execute(
        self,
        command: str | Sequence[str],
        *,
        shell: bool = False,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        stdin: bool = False,
        encoding: str = "utf-8",
        kill_grace: float | None = None,
        **extra: Any,
    ) -> RemoteSession:
        """Start *command* (argv list, or a string split like a shell would) on the server."""
        params: dict[str, Any] = {
            "command": command if isinstance(command, str) else list(command),
            "shell": shell, "stdin": stdin, "encoding": encoding, **extra,
        }
        for name, value in (("cwd", cwd), ("env", env), ("timeout", timeout),
                            ("kill_grace", kill_grace)):
            if value is not None:
                params[name] = value
        result = await self.call("execute", params)
        send, receive = trio.open_memory_channel[Event](math.inf)
        session = RemoteSession(self, result["session_id"], result["pid"], result["pgid"],
                                send, receive)
        self._sessions[session.id] = session
        for event in self._early.pop(session.id, []):
            send.send_nowait(event)
        if self.closed:
            send.close()
        return session

    async def control(self, session_id: str, kind: str) -> str:
        result = await self.call("control", {"session_id": session_id, "type": kind})
        return str(result["status"])

    async def send_input(self, session_id: str, data: bytes | str, *, eof: bool = False) -> int:
        raw = data.encode() if isinstance(data, str) else data
        params = {"session_id": session_id, "data": base64.b64encode(raw).decode(),
                  "encoding": "base64", "eof": eof}
        return int((await self.call("input", params))["bytes"])

    async def sessions(self) -> list[dict[str, Any]]:
        return list((await self.call("sessions"))["sessions"])

    async def status(self, session_id: str) -> dict[str, Any]:
        return dict(await self.call("status", {"session_id": session_id}))

    async def ping(self) -> dict[str, Any]:
        return dict(await self.call("ping"))

    async def server_info(self) -> dict[str, Any]:
        return dict(await self.call("server.info"))


@asynccontextmanager
async def connect(url: str, token: str | None = None) -> AsyncIterator[Client]:
    """Open a connection to *url*; closing it cancels the sessions it started (server rule)."""
    headers = [(b"Authorization", f"Bearer {token}".encode())] if token else None
    async with trio.open_nursery() as nursery, trio_websocket.open_websocket_url(
        url, extra_headers=headers, max_message_size=MAX_MESSAGE_BYTES
    ) as ws:
        client = Client(ws)
        nursery.start_soon(client._read)
        try:
            yield client
        finally:
            with trio.move_on_after(2, shield=True):
                await ws.aclose()
            nursery.cancel_scope.cancel()


async def _self_check() -> None:
    import sys

    from ccx.config import Settings
    from ccx.server import Server

    async with trio.open_nursery() as nursery:
        server = await nursery.start(Server(Settings(port=0)).run)
        async with connect(server.url) as client:
            session = await client.execute([sys.executable, "-c", "print('hello')"])
            outputs = [e async for e in session.events() if isinstance(e, Output)]
            assert b"".join(o.data for o in outputs) == b"hello\n", outputs
            assert session.result is not None and session.result.exit_code == 0
            try:
                await client.status("nope")
            except ServerError as exc:
                assert exc.code == -32002
            else:
                raise AssertionError("unknown session must fail")
        server.stop()
    print("ccx.client: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
