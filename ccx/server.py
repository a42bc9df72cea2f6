"""The ccx server: listener, HTTP routing, the session manager, and orderly shutdown.

Inputs: `Settings`.
Outputs: a running server (`Server.run`, started with `nursery.start` to learn the bound
port) that accepts within the connection limits (`ccx.transport.listen`), reads each request
head within CCX_HEAD_TIMEOUT, refuses a foreign `Host` on a loopback bind (403, DNS
rebinding: `ccx.transport.policy`), then routes: `/health` (liveness), `/ready` (readiness,
PROTOCOL.md 10: 503 while draining or full) and `/metrics` answers, WebSocket connections on
`/ws` and `/ws/mcp` (and `/mcp` for MCP), MCP over Streamable HTTP on `/mcp`
(`ccx.transport.mcp_http`), the web console on `/` and `/ui/` (`ccx.transport.ui`).
Stopping (PROTOCOL.md 5, 6, 10): SIGTERM first drains (no new sessions, the rest keeps
working) until no session is busy or CCX_DRAIN_TIMEOUT has passed (0: at once); then the
shutdown cancels every session at once (their kill paths run concurrently; completions say
`reason` "drain" when the drain timed out, "shutdown" otherwise), delivers their
completions and closes connections with 1001. SIGINT, or a second SIGTERM during the drain,
starts the shutdown at once; a further SIGTERM or SIGINT during the shutdown SIGKILLs every
group and ends the server within 2 s.
Docs: https://trio.readthedocs.io/en/stable/reference-io.html#trio.serve_listeners
      https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

import ipaddress
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import attrs
import trio

from ccx import __version__
from ccx.config import Settings, bind_host
from ccx.log import get_logger
from ccx.manager import SessionManager
from ccx.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ccx.metrics import ServerState
from ccx.node import Node
from ccx.transport.http import BadHead, Head, read_head, send_plain
from ccx.transport.listen import Gate, connection_cap, raise_fd_limit, serve_limited
from ccx.transport.mcp_http import McpHttp
from ccx.transport.policy import host_ok, token_ok
from ccx.transport.ui import is_ui_path, serve_ui
from ccx.transport.websocket import (
    CLOSE_GOING_AWAY,
    MCP_PATH,
    WS_PATHS,
    Connection,
    serve_websocket,
)

log = get_logger("ccx.server")

SHUTDOWN_MARGIN_S = 1.5  # beyond kill_grace: time to deliver completions and close sockets
CLOSE_RESERVE_S = 0.5  # of that margin, kept for closing connections with 1001
# TCP keepalive (CCX_TCP_KEEPALIVE s idle, then KEEPALIVE_COUNT probes KEEPALIVE_INTERVAL_S
# apart) finds idle peers that vanished without a FIN or RST. CCX_TCP_USER_TIMEOUT: data
# (or a keepalive probe) unacknowledged for that long drops the connection. A live peer that
# merely stops reading still answers zero-window probes, so back-pressure never trips it; a
# vanished one does, and its sessions are then cancelled instead of blocking forever.
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_COUNT = 6


class Connections(set[Connection]):
    """The open WebSocket connections (`ccx.transport.websocket` adds and discards them);
    `wait_empty()` returns once none is left, woken by each discard (no polling)."""

    def __init__(self) -> None:
        super().__init__()
        self._discarded = trio.Event()

    def discard(self, connection: object) -> None:
        super().discard(connection)
        self._discarded.set()  # wakes every waiter; the next discard gets a new event
        self._discarded = trio.Event()

    def remove(self, connection: Connection) -> None:
        super().remove(connection)
        self._discarded.set()
        self._discarded = trio.Event()

    async def wait_empty(self) -> None:
        while self:
            await self._discarded.wait()


@attrs.define(eq=False)
class Server:
    """Serve the contract on `settings.host:settings.port` until `stop()` is called."""

    settings: Settings
    node: Node = attrs.field(init=False)  # the composition root: subreaper, recovery, manager
    manager: SessionManager = attrs.field(init=False)
    mcp_http: McpHttp = attrs.field(init=False)
    connections: Connections = attrs.field(factory=Connections)
    port: int | None = None
    gate: Gate = attrs.field(init=False)
    loopback_bind: bool = True  # every bound address is loopback: the Host rule applies
    _stopping: trio.Event = attrs.field(factory=trio.Event)  # shut down now
    _drain_first: trio.Event = attrs.field(factory=trio.Event)  # SIGTERM: drain, then stop

    def __attrs_post_init__(self) -> None:
        self.gate = Gate(connection_cap(self.settings.max_connections),
                         self.settings.max_pending_heads)
        self.node = Node(self.settings)
        self.manager = self.node.manager
        self.mcp_http = McpHttp(self.manager)
        self.manager.metrics.watch(self._state)

    @property
    def url(self) -> str:
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"ws://{host}:{self.port}/ws"

    def stop(self) -> None:
        """Begin an orderly shutdown now (SIGINT; SIGTERM during a drain)."""
        self._stopping.set()

    def terminate(self) -> None:
        """What SIGTERM does: drain for CCX_DRAIN_TIMEOUT seconds, then shut down. The node
        is draining from here on whatever the timeout (0 included: `execute` gets -32007
        during the shutdown too), and the drain cannot be undone (PROTOCOL.md 10)."""
        self.manager.drain(for_good=True)
        if self.settings.drain_timeout > 0:
            self._drain_first.set()
        else:
            self.stop()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def draining_to_stop(self) -> bool:
        """SIGTERM's drain is under way (the shutdown has not begun)."""
        return self._drain_first.is_set() and not self._stopping.is_set()

    def kill(self) -> None:
        """End a shutdown now (a further SIGTERM or SIGINT, PROTOCOL.md 6): SIGKILL every
        group and escapee at once, then give the rest of the shutdown `node.FORCED_EXIT_S`."""
        self._stopping.set()
        self.node.kill()

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, serve, and on `stop()` shut down in order. Returns when all is closed.

        **Cancellation**: cancelling it skips the orderly part, but every session still goes
        through its shielded kill path, so no process outlives the server.
        """
        # The node (ccx.node) first recovers what a server that died without cleaning up left
        # running, then runs the manager; `kill()` bounds what is left of all of it.
        async with self.node.running():
            await self._listen_and_serve(task_status)
        log.info("stopped")

    async def _listen_and_serve(self, task_status: trio.TaskStatus[Server]) -> None:
        if self.gate.max_connections < self.settings.max_connections:
            log.warning("connection_cap_lowered", wanted=self.settings.max_connections,
                        cap=self.gate.max_connections,
                        reason="RLIMIT_NOFILE allows only twice as many descriptors")
        listeners = await trio.open_tcp_listeners(self.settings.port,
                                                  host=bind_host(self.settings.host))
        self.port = listeners[0].socket.getsockname()[1]
        self.loopback_bind = all(
            ipaddress.ip_address(listener.socket.getsockname()[0].split("%")[0]).is_loopback
            for listener in listeners)
        await self._serve(listeners, task_status)

    async def _serve(self, listeners: list[trio.SocketListener],
                     task_status: trio.TaskStatus[Server]) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.mcp_http.run)
            async with trio.open_nursery() as handlers:
                accepting = trio.CancelScope()
                handlers.start_soon(self._accept, listeners, handlers, accepting)
                log.info("listening", host=self.settings.host, port=self.port,
                         version=__version__)
                task_status.started(self)
                cause = await self._until_stop()
                accepting.cancel()
                log.info("shutting_down", sessions=len(self.manager.live()), cause=cause)
                # One deadline for all of it (PROTOCOL.md 5: exit within kill_grace + 2 s),
                # whatever the clients do: sessions get kill_grace and some time to deliver
                # their completions, connections what is left to close with 1001.
                stop_by = trio.current_time() + self.settings.kill_grace + SHUTDOWN_MARGIN_S
                await self.manager.shutdown(
                    timeout=stop_by - CLOSE_RESERVE_S - trio.current_time(), cause=cause)
                for connection in list(self.connections):
                    connection.close_deadline = stop_by
                    handlers.start_soon(connection.close, CLOSE_GOING_AWAY, "server shutting down")
                with trio.move_on_at(stop_by):
                    await self.connections.wait_empty()
                handlers.cancel_scope.cancel()
            nursery.cancel_scope.cancel()

    async def _until_stop(self) -> str:
        """Wait for `stop()`, or for `terminate()` and then its drain; return the `reason`
        the shutdown gives the sessions it cancels: "drain" when CCX_DRAIN_TIMEOUT ran out,
        "shutdown" otherwise."""
        async with trio.open_nursery() as wait:
            wait.start_soon(_cancel_on, self._stopping.wait, wait.cancel_scope)
            wait.start_soon(_cancel_on, self._drain_first.wait, wait.cancel_scope)
        if self._stopping.is_set():
            return "shutdown"
        timeout = self.settings.drain_timeout
        log.info("draining", timeout_s=timeout, sessions=len(self.manager.busy()))
        with trio.move_on_after(timeout) as deadline:
            async with trio.open_nursery() as race:
                race.start_soon(_cancel_on, self._stopping.wait, race.cancel_scope)
                race.start_soon(_cancel_on, self.manager.wait_idle, race.cancel_scope)
        cut = self._stopping.is_set()
        self._stopping.set()  # from here on a further signal SIGKILLs
        if cut:
            log.info("drain_cut_short", sessions=len(self.manager.busy()))
            return "shutdown"
        if deadline.cancelled_caught:
            log.info("drain_timeout", sessions=len(self.manager.busy()))
            return "drain"
        log.info("drained")
        return "shutdown"

    async def _accept(
        self,
        listeners: list[trio.SocketListener],
        handlers: trio.Nursery,
        accepting: trio.CancelScope,
    ) -> None:
        with accepting:
            await serve_limited(self._handle, listeners, self.gate, handlers)

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One TCP connection: route it; never let its failure reach the server."""
        try:
            _set_keepalive(stream.socket, self.settings)
            head = None
            with self.gate.reading_head():  # cancelled if evicted: then head stays None
                try:
                    head = await read_head(stream, self.settings.head_timeout)
                except BadHead as exc:
                    await send_plain(stream, exc.status, f"{exc}\n")
                    return
            if head is not None:
                await self._route(stream, head)
        except Exception:
            log.exception("connection_crashed")
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _route(self, stream: trio.SocketStream, head: Head) -> None:
        path = head.path
        if not host_ok(self.settings, head.header("host"), loopback_bind=self.loopback_bind):
            # DNS rebinding: a foreign page whose name now points at 127.0.0.1. Refused before
            # the token, the origin and the path, /health included (PROTOCOL.md 1 addition).
            log.warning("host_rejected", status=403, host=head.header("host"), path=path)
            await send_plain(stream, 403, "host not allowed\n")
        elif path in WS_PATHS and head.is_websocket_upgrade:
            await serve_websocket(stream, head, self.manager, self.settings, self.connections)
        elif path == MCP_PATH:  # MCP over Streamable HTTP (plain POST/GET/DELETE)
            await self.mcp_http.handle(stream, head)
        elif path in WS_PATHS:
            await send_plain(stream, 426, "this endpoint speaks WebSocket only\n",
                             headers=[("Upgrade", "websocket")])
        elif path in ("/health", "/ready", "/metrics") and head.method not in ("GET", "HEAD"):
            await send_plain(stream, 405, "method not allowed\n", headers=[("Allow", "GET")])
        elif path == "/health":
            body = {"status": "ok", "version": __version__, "sessions": len(self.manager.running())}
            await send_plain(stream, 200, body, head_only=head.method == "HEAD")
        elif path == "/ready":  # no token: the readiness probe (PROTOCOL.md 10)
            why = self.manager.ready()
            body = {"ready": True} if why is None else {"ready": False, "reason": why}
            await send_plain(stream, 200 if why is None else 503, body,
                             head_only=head.method == "HEAD")
        elif is_ui_path(path):  # the web console (ccx.transport.ui)
            await serve_ui(stream, head, self.settings)
        elif path == "/metrics":
            if not token_ok(self.settings, head):
                await send_plain(stream, 401, "missing or wrong token\n",
                                 headers=[("WWW-Authenticate", "Bearer")])
            else:
                await send_plain(stream, 200, self.manager.metrics.render(),
                                 content_type=METRICS_CONTENT_TYPE,
                                 head_only=head.method == "HEAD")
        else:
            await send_plain(stream, 404, "not found\n")

    def _state(self) -> ServerState:
        return ServerState([s.state.value for s in self.manager.all()], self.connections,
                           self.manager.started_total, self.manager.spawn_failures_total,
                           self.manager.output_bytes(), held_bytes=self.manager.held.held_bytes,
                           held_limit=self.manager.held.limit_bytes,
                           input_pending=sum(c.input.pending_bytes for c in self.connections),
                           spool_bytes=self.manager.spool.disk_bytes if self.manager.spool else 0)


async def _cancel_on(wait: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
    """Cancel *scope* once *wait()* returns (the first of several waits wins)."""
    await wait()
    scope.cancel()


def _set_keepalive(sock: trio.socket.SocketType, settings: Settings) -> None:
    idle_s = max(1, round(settings.tcp_keepalive))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL,
                        min(KEEPALIVE_INTERVAL_S, idle_s))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                        max(1, round(settings.tcp_user_timeout * 1000)))
    except (OSError, AttributeError):  # not every platform has every option
        pass


async def serve(settings: Settings) -> None:
    """Run a server until SIGTERM or SIGINT, then shut it down in order (`ccx serve`).

    SIGTERM drains first (CCX_DRAIN_TIMEOUT); SIGINT, or a second SIGTERM during the drain,
    shuts down at once. A further SIGTERM or SIGINT once shutdown has begun SIGKILLs every
    group and escapee and ends the server within 2 s (PROTOCOL.md 6): the signals stay ours
    until the server has stopped, so none of them kills the server by its default action
    with children left.
    """
    settings.check_exposure()
    soft, hard = raise_fd_limit()
    log.info("fd_limit", soft=soft, hard=hard)
    server = Server(settings)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_obey_signals, server, signals)
            await server.run()
            nursery.cancel_scope.cancel()


async def _obey_signals(server: Server, signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if server.draining_to_stop:
            log.info("signal_received", signal=name, action="end the drain, shut down")
            server.stop()
        elif not server.stopping:
            log.info("signal_received", signal=name)
            if signum == signal.SIGTERM:
                server.terminate()
            else:
                server.stop()
        else:
            log.warning("signal_received_again", signal=name, action="SIGKILL every group")
            server.kill()


async def _self_check() -> None:
    """Boot on a free port: /health answers before any WebSocket, an unknown path gets 404,
    a session started over the WebSocket is ended by `stop()`, and `run` then returns."""
    import json

    import trio.testing
    import trio_websocket

    async def get(port: int, path: str) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            reply = b""
            while chunk := await stream.receive_some(4096):
                reply += chunk
        return reply

    async with trio.open_nursery() as nursery:
        server = await nursery.start(Server(Settings(port=0, state_dir="", kill_grace=0.5)).run)
        assert server.port
        health = await get(server.port, "/health")
        assert health.startswith(b"HTTP/1.1 200 ") and b'"status": "ok"' in health, health
        assert (await get(server.port, "/nope")).startswith(b"HTTP/1.1 404 ")
        async with trio_websocket.open_websocket_url(server.url) as ws:
            await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "execute",
                                              "params": {"command": ["sleep", "60"]}}))
            reply = json.loads(await ws.get_message())
            assert "session_id" in reply["result"], reply
            assert len(server.manager.running()) == 1
            server.stop()
    assert not server.manager.running(), "a group outlived the server"
    assert not server.connections, "a connection outlived the server"

    # The shutdown's wait for connections wakes on the last discard, not before.
    connections, first, second = Connections(), object(), object()
    connections.update([first, second])  # type: ignore[list-item]  # stand-ins
    emptied = trio.Event()

    async def wait_then_flag() -> None:
        await connections.wait_empty()
        emptied.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_then_flag)
            await trio.testing.wait_all_tasks_blocked()
            connections.discard(first)
            await trio.testing.wait_all_tasks_blocked()
            assert not emptied.is_set(), "woke with a connection left"
            connections.discard(second)
    assert emptied.is_set()
    print("ccx.server: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
