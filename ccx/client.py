"""An async (trio) client for a ccx server: what the CLI, `ccx selftest` and the tests use.

Inputs: a server URL (`ws://127.0.0.1:8003/ws`) and an optional token.
Outputs: `Client` with `execute()` returning a `RemoteSession` (typed events, pause/resume/
cancel/send, `wait()` for the `Completed` result) and the query methods `sessions`, `status`,
`ping`, `server_info`; server errors are raised as `ServerError` (code, message, data).
Size (over 400 lines): one connection, its reader and the `RemoteSession`s it feeds share
the back-pressure state (bytes held unread, the pending calls); split, that state would
have to be passed between modules.
Docs: https://trio-websocket.readthedocs.io/en/stable/clients.html
      ../shared/PROTOCOL.md
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import math
import os
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio_websocket

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # what we accept from a server, well above its 64 KiB chunks
RECONNECT_FIRST_S = 0.05  # first re-dial delay after a dropped connection; doubles each try
RECONNECT_MAX_S = 5.0
CLOSE_TIMEOUT_S = 2.0
# One socket read takes up to this much (trio-websocket's default is 4 KiB: 16 trips through
# its reader and wsproto per 64 KiB output chunk; a node relaying for another feels it most).
RECEIVE_BYTES = 256 * 1024
# How every server notification starts on the wire (compact JSON, `ccx.protocol.notification`):
# a relaying client passes such frames on without parsing them.
NOTIFICATION_PREFIX = '{"jsonrpc":"2.0","method":'
# Output a connection holds for its callers (delivered to a `RemoteSession`, not yet read
# from `events()`): above it, the client stops reading the connection, so the server's send
# blocks and the child is throttled (PROTOCOL.md 8), unless a call waits for its reply.
MAX_HELD_OUTPUT_BYTES = 4 * 1024 * 1024


_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a node name: a DNS label


class ServerError(Exception):
    """A JSON-RPC error answered by the server."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message
        self.data = data


class ConnectionLost(Exception):
    """The connection closed before the answer (or the session's completion) arrived."""


def node_of(session_id: str) -> str | None:
    """The node named by a session id `<node>.<incarnation>.<rest>` (PROTOCOL.md 10), or
    None for an id without that prefix."""
    parts = session_id.split(".", 2)
    if len(parts) == 3 and all(parts) and _LABEL.fullmatch(parts[0]):
        return parts[0]
    return None


def with_node(url: str, node: str) -> str:
    """*url* with its query parameter `node` set to *node* (others kept)."""
    split = urllib.parse.urlsplit(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(split.query, keep_blank_values=True)
             if k != "node"]
    query.append(("node", node))
    return urllib.parse.urlunsplit(split._replace(query=urllib.parse.urlencode(query)))


@attrs.frozen
class Started:
    session_id: str
    pid: int
    pgid: int
    command: list[str]


@attrs.frozen
class Output:
    session_id: str
    stream: str  # "stdout" | "stderr" | "pty"
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
    reason: str | None = None  # why the node ended it itself: "drain", "shutdown"


@attrs.frozen
class Detached:
    """Another connection attached to the session: this client gets nothing more of it. With
    *reason* ("unreachable"): the session's *node*, reached through another node, was lost
    (docs/protocol-notes.md, "Node loss"), not taken over."""

    session_id: str
    node: str | None = None
    reason: str | None = None

    def __str__(self) -> str:
        if self.reason is not None:
            return f"session {self.session_id} lost: node {self.node} is {self.reason}"
        return f"session {self.session_id} was attached by another client"


Event = Started | Output | Paused | Resumed | Completed | Detached


def _event(method: str, params: dict[str, Any]) -> Event | None:
    sid = params["session_id"]
    if method == "process.output":
        raw = params["data"]
        data = base64.b64decode(raw) if params.get("encoding") == "base64" else raw.encode()
        return Output(sid, params["stream"], data, params["seq"])
    if method == "process.completed":
        return Completed(sid, params["status"], params.get("exit_code"), params.get("signal"),
                         params.get("duration_s", 0.0), params.get("stdout_bytes", 0),
                         params.get("stderr_bytes", 0), params.get("reason"))
    if method == "process.started":
        return Started(sid, params["pid"], params["pgid"], params["command"])
    if method == "process.paused":
        return Paused(sid)
    if method == "process.resumed":
        return Resumed(sid)
    if method == "process.detached":
        return Detached(sid, params.get("node"), params.get("reason"))
    return None


@attrs.define(eq=False)
class RemoteSession:
    """A session this client started (or attached to): its events in order, its controls.

    Events wait here until read. While more than `MAX_HELD_OUTPUT_BYTES` of output waits
    (over all sessions of the connection), the client stops reading the connection, so the
    server and then the child are throttled; a call (`pause()` inside the `async for` loop,
    say) still gets its reply: the client reads on while a call waits for one.
    With `linger` > 0 the session survives a dropped connection: the client re-dials,
    attaches with the last seq it saw, and `events()` goes on without a gap or duplicate.
    """

    client: Client
    id: str
    pid: int
    pgid: int
    linger: float
    _send: trio.MemorySendChannel[Event] = attrs.field(repr=False)
    _receive: trio.MemoryReceiveChannel[Event] = attrs.field(repr=False)
    last_seq: int = -1
    result: Completed | None = None
    taken: bool = False  # another connection attached to it (`Detached` was delivered)
    detached: Detached | None = None  # why, when it was

    def _deliver(self, event: Event) -> None:
        if isinstance(event, Output):
            if event.seq <= self.last_seq:
                return  # replayed after a reconnect and already delivered
            self.last_seq = event.seq
        elif isinstance(event, Completed):
            if self.result is not None:
                return
            self.result = event
        elif isinstance(event, Detached):
            self.taken, self.detached = True, event
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self._send.send_nowait(event)
            if isinstance(event, Output):  # held until events() reads it
                self.client._hold(len(event.data))
        if isinstance(event, Detached):
            self._send.close()

    async def events(self) -> AsyncIterator[Event]:
        """Every event of the session, ending after `Completed` (or `Detached`, when another
        connection took the session over).

        Raises `ConnectionLost` if the connection closed for good first.
        """
        while True:
            try:
                event = await self._receive.receive()
            except trio.EndOfChannel:
                raise ConnectionLost(f"connection closed before session {self.id} completed")\
                    from None
            if isinstance(event, Output):
                self.client._release(len(event.data))
            yield event
            if isinstance(event, Completed | Detached):
                return

    async def wait(self) -> Completed:
        """Discard remaining events and return the completion.

        Raises `ConnectionLost` if the connection closed for good or another connection
        took the session over first.
        """
        async for _ in self.events():
            pass
        if self.result is None:
            raise ConnectionLost(str(self.detached or Detached(self.id)))
        return self.result

    async def pause(self) -> str:
        return await self.client.control(self.id, "PAUSE")

    async def resume(self) -> str:
        return await self.client.control(self.id, "RESUME")

    async def cancel(self) -> str:
        return await self.client.control(self.id, "CANCEL")

    async def send(self, data: bytes | str, *, eof: bool = False) -> int:
        """Write to the child's stdin (the session needs `stdin=True`), or type on its
        terminal (a PTY session; *eof* then types ^D)."""
        return await self.client.send_input(self.id, data, eof=eof)

    async def resize(self, cols: int, rows: int) -> dict[str, Any]:
        """Set a PTY session's window size (the child gets SIGWINCH)."""
        return await self.client.resize(self.id, cols, rows)


@attrs.define(eq=False)
class Client:
    """A connection to a ccx server that re-dials for lingering sessions. Use `connect()`."""

    url: str
    token: str | None = None
    ws: trio_websocket.WebSocketConnection | None = None
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    _waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = attrs.field(factory=dict)
    _on_reply: dict[int, Callable[[], None]] = attrs.field(factory=dict)  # see `call`
    _sessions: dict[str, RemoteSession] = attrs.field(factory=dict)
    _early: dict[str, list[Event]] = attrs.field(factory=dict)
    _held: int = 0  # output bytes in sessions' channels, not yet read (MAX_HELD_OUTPUT_BYTES)
    _room: trio.Event = attrs.field(factory=trio.Event)  # set when reading may go on
    _closing: bool = False
    closed: bool = False
    reconnects: int = 0
    # Set: every notification's text goes to it, awaited before the next frame is read (a
    # node forwarding for its own client: back-pressure end to end, `ccx.cluster`), and no
    # re-dial happens. Responses still answer `call()`.
    relay: Callable[[str], Awaitable[None]] | None = None
    subprotocols: list[str] | None = None  # offered in the handshake (["mcp"]: an MCP peer)
    ended: trio.Event = attrs.field(factory=trio.Event)  # set once the connection is gone

    # ------------------------------------------------------------------------- connection

    async def _dial(self, nursery: trio.Nursery,
                    url: str | None = None) -> trio_websocket.WebSocketConnection:
        headers = [(b"Authorization", f"Bearer {self.token}".encode())] if self.token else None
        return await trio_websocket.connect_websocket_url(
            nursery, url or self.url, extra_headers=headers, subprotocols=self.subprotocols,
            max_message_size=MAX_MESSAGE_BYTES, receive_buffer_size=RECEIVE_BYTES)

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the connection: dial, read, and re-dial while lingering sessions need it."""
        first = True
        try:
            while True:
                async with trio.open_nursery() as nursery:
                    if first:
                        self.ws = await self._dial(nursery)  # errors reach connect()'s caller
                    else:
                        ws = await self._redial(nursery)
                        if ws is None:
                            return
                        self.ws = ws
                    if first:
                        task_status.started()
                        first = False
                    else:
                        self.reconnects += 1
                        nursery.start_soon(self._reattach)
                    await self._read(self.ws)
                    # Let trio-websocket's reader finish the close handshake (cancelling it
                    # now would leave aclose() waiting), but not forever.
                    nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT_S
                self._fail_waiting()
                if self._closing or self.relay is not None or not self._lingering():
                    return
        finally:
            self.closed = True
            self.ended.set()
            self._fail_waiting()
            for session in self._sessions.values():
                session._send.close()

    def _lingering(self) -> list[RemoteSession]:
        return [s for s in self._sessions.values()
                if s.linger > 0 and s.result is None and not s.taken]

    def redial_url(self) -> str:
        """Where to dial again for the lingering sessions (PROTOCOL.md 10): their node, named
        in their ids, through `CCX_PEER_URL` when this client's environment sets it (a client
        inside the cluster), else the entry URL with `?node=<node>` for a proxy that routes
        on it (ccx ignores the parameter). Without a node name: the entry URL."""
        nodes = [n for n in (node_of(s.id) for s in self._lingering()) if n is not None]
        if not nodes:
            return self.url
        template = os.environ.get("CCX_PEER_URL")
        if template and "{node}" in template:
            return template.replace("{node}", nodes[0])
        return with_node(self.url, nodes[0])

    async def _redial(self, nursery: trio.Nursery) -> trio_websocket.WebSocketConnection | None:
        """Re-dial with exponential backoff for as long as the longest linger lasts."""
        deadline = trio.current_time() + max(s.linger for s in self._lingering())
        delay = RECONNECT_FIRST_S
        while trio.current_time() < deadline and not self._closing:
            try:
                return await self._dial(nursery, self.redial_url())
            except (OSError, trio_websocket.HandshakeError):
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
        return None

    async def _reattach(self) -> None:
        for session in self._lingering():
            try:
                await self.call("attach", {"session_id": session.id,
                                           "since_seq": session.last_seq})
            except ServerError:  # forgotten or no longer replayable: this one is lost
                session._send.close()
            except ConnectionLost:
                return

    def _fail_waiting(self) -> None:
        for channel in self._waiting.values():
            channel.close()
        self._waiting.clear()
        for session in self._sessions.values():
            if session.linger <= 0 or self._closing:
                session._send.close()

    async def _read(self, ws: trio_websocket.WebSocketConnection) -> None:
        try:
            while True:
                while self._held > MAX_HELD_OUTPUT_BYTES and not self._waiting:
                    self._room = trio.Event()
                    await self._room.wait()  # back-pressure: leave the rest in the socket
                text = await ws.get_message()
                if self.relay is not None and isinstance(text, str) \
                        and text.startswith(NOTIFICATION_PREFIX):
                    await self.relay(text)  # waits while the relay's reader is slow
                    continue
                message = json.loads(text)
                for item in message if isinstance(message, list) else [message]:
                    self._dispatch(item)
        except trio_websocket.ConnectionClosed:
            pass

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "method" in message:
            event = _event(message["method"], message.get("params") or {})
            if event is None:
                return
            session = self._sessions.get(event.session_id)
            if session is None:  # arrived before execute() registered it
                self._early.setdefault(event.session_id, []).append(event)
            else:
                session._deliver(event)
            return
        channel = self._waiting.pop(message.get("id"), None)  # type: ignore[arg-type]
        if channel is not None:
            channel.send_nowait(message)
            hook = self._on_reply.pop(message["id"], None)
            if hook is not None:
                hook()

    def _hold(self, size: int) -> None:
        self._held += size

    def _release(self, size: int) -> None:
        self._held -= size
        if self._held <= MAX_HELD_OUTPUT_BYTES:
            self._room.set()

    # ------------------------------------------------------------------------- calls

    async def call(self, method: str, params: dict[str, Any] | None = None, *,
                   on_reply: Callable[[], None] | None = None) -> Any:
        """Send one request and return its result; raise `ServerError` for an error.
        *on_reply* runs in the reader as the reply is read, before any later frame is (a
        relaying node holds back what follows a forwarded attach's result: `ccx.cluster`)."""
        ws = self.ws
        if self.closed or ws is None:
            raise ConnectionLost("connection is closed")
        request_id = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[request_id] = send
        if on_reply is not None:
            self._on_reply[request_id] = on_reply
        self._room.set()  # its reply may sit behind held output: read on until it comes
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}
        try:
            await ws.send_message(json.dumps(message))
            reply = await receive.receive()
        except (trio_websocket.ConnectionClosed, trio.EndOfChannel):
            raise ConnectionLost(f"connection closed during {method}") from None
        finally:
            self._waiting.pop(request_id, None)
            self._on_reply.pop(request_id, None)
        if "error" in reply:
            error = reply["error"]
            raise ServerError(error.get("code", 0), error.get("message", ""), error.get("data"))
        return reply["result"]

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        """Send a JSON-RPC notification (no answer)."""
        ws = self.ws
        if self.closed or ws is None:
            raise ConnectionLost("connection is closed")
        message = {"jsonrpc": "2.0", "method": method, "params": params or {}}
        try:
            await ws.send_message(json.dumps(message))
        except trio_websocket.ConnectionClosed:
            raise ConnectionLost(f"connection closed during {method}") from None

    def _register(self, session_id: str, pid: int, pgid: int, linger: float) -> RemoteSession:
        send, receive = trio.open_memory_channel[Event](math.inf)
        session = RemoteSession(self, session_id, pid, pgid, linger, send, receive)
        self._sessions[session.id] = session
        for event in self._early.pop(session.id, []):
            session._deliver(event)
        if self.closed:
            send.close()
        return session

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
        linger: float = 0.0,
        tag: str | None = None,
        pty: tuple[int, int] | Mapping[str, int] | None = None,
        **extra: Any,
    ) -> RemoteSession:
        """Start *command* (argv list, or a string split like a shell would) on the server.

        *pty* = (cols, rows) or {"cols": ..., "rows": ...} runs it on a pseudo-terminal:
        output then comes as stream "pty", and `send()` types on the terminal.
        """
        params: dict[str, Any] = {
            "command": command if isinstance(command, str) else list(command),
            "shell": shell, "stdin": stdin, "encoding": encoding, **extra,
        }
        for name, value in (("cwd", cwd), ("env", env), ("timeout", timeout),
                            ("kill_grace", kill_grace), ("tag", tag)):
            if value is not None:
                params[name] = value
        if linger > 0:
            params["linger"] = linger
        if pty is not None:
            params["pty"] = (dict(pty) if isinstance(pty, Mapping)
                             else {"cols": pty[0], "rows": pty[1]})
        result = await self.call("execute", params)
        return self._register(result["session_id"], result["pid"], result["pgid"], linger)

    async def attach(self, session_id: str, *, since_seq: int = -1,
                     linger: float | None = None) -> RemoteSession:
        """Take over *session_id* (maybe started elsewhere); its held output comes again
        from *since_seq* + 1, then its pause state and completion. *linger* (by default the
        session's own, from `status`) decides whether to re-attach after a reconnect."""
        if linger is None:
            linger = float((await self.status(session_id)).get("linger") or 0.0)
        session = self._sessions.get(session_id)
        created = session is None or session.taken
        if created:
            session = self._register(session_id, 0, 0, linger)
        assert session is not None
        session.last_seq, session.linger = since_seq, linger
        try:
            result = await self.call("attach", {"session_id": session_id,
                                               "since_seq": since_seq})
        except ServerError:
            if created and self._sessions.get(session_id) is session:
                del self._sessions[session_id]
            raise
        session.pid, session.pgid = result["pid"], result["pgid"]
        return session

    async def control(self, session_id: str, kind: str) -> str:
        result = await self.call("control", {"session_id": session_id, "type": kind})
        return str(result["status"])

    async def send_input(self, session_id: str, data: bytes | str, *, eof: bool = False) -> int:
        raw = data.encode() if isinstance(data, str) else data
        params = {"session_id": session_id, "data": base64.b64encode(raw).decode(),
                  "encoding": "base64", "eof": eof}
        return int((await self.call("input", params))["bytes"])

    async def resize(self, session_id: str, cols: int, rows: int) -> dict[str, Any]:
        return dict(await self.call("resize", {"session_id": session_id, "cols": cols,
                                               "rows": rows}))

    async def sessions(self, tag: str | None = None) -> list[dict[str, Any]]:
        params = {"tag": tag} if tag is not None else {}
        return list((await self.call("sessions", params))["sessions"])

    async def status(self, session_id: str) -> dict[str, Any]:
        return dict(await self.call("status", {"session_id": session_id}))

    async def ping(self) -> dict[str, Any]:
        return dict(await self.call("ping"))

    async def server_info(self) -> dict[str, Any]:
        return dict(await self.call("server.info"))

    async def aclose(self) -> None:
        """Close for good: sessions without linger are cancelled by the server."""
        self._closing = True
        if self.ws is not None:
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await self.ws.aclose()


@asynccontextmanager
async def connect(url: str, token: str | None = None) -> AsyncIterator[Client]:
    """Open a connection to *url*; leaving the block closes it for good."""
    client = Client(url, token)
    async with trio.open_nursery() as nursery:
        await nursery.start(client._run)
        try:
            yield client
        finally:
            await client.aclose()
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
