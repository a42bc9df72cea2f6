"""Shared fixtures for the ccx test suite.

Rules for every test here (as trio-websocket's tests state theirs):
- servers bind 127.0.0.1 on a port the OS picks (port 0); nothing leaves the machine;
- children are real processes (`sys.executable -c ...`, `sh -c ...`), signals are real;
- every test runs under a deadline (pytest-timeout, see pyproject), so a hang fails instead of
  stalling CI;
- every server fixture asserts at teardown that no process group it started is still alive.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio
import trio_websocket

from ccx.config import Settings
from ccx.process import group_members
from ccx.server import Server

PY = sys.executable
RELIABILITY_DIR = os.path.join(os.path.dirname(__file__), "reliability")
SECURITY_DIR = os.path.join(os.path.dirname(__file__), "security")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", default=False,
                     help="run the long (soak) variants of tests/reliability")


def pytest_configure(config: pytest.Config) -> None:
    """`-m container` asks for tests/test_container.py (image builds): it reads CCX_CONTAINER
    at import and otherwise skips as a whole, with one line.

    SIGINT and SIGQUIT get their usual dispositions back if this run was started with them
    ignored (`pytest &` in a script, nohup): the in-process servers' children would inherit
    SIG_IGN, and a shell on a PTY then keeps it for its jobs, so ^C reaches nothing."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    if "container" in (config.getoption("markexpr") or ""):
        os.environ.setdefault("CCX_CONTAINER", "1")


def soak_enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("--soak")) or os.environ.get("CCX_SOAK", "") not in ("", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark everything under tests/reliability and tests/security; skip soak variants unless
    asked for."""
    soak = soak_enabled(config)
    for item in items:
        if str(item.path).startswith(RELIABILITY_DIR + os.sep):
            item.add_marker(pytest.mark.reliability)
        if str(item.path).startswith(SECURITY_DIR + os.sep):
            item.add_marker(pytest.mark.security)
        if "soak" in item.keywords and not soak:
            item.add_marker(pytest.mark.skip(reason="soak variant: run with --soak or CCX_SOAK=1"))


@pytest.fixture(scope="session", autouse=True)
def private_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`ccx serve` processes started by tests keep their crash record (CCX_STATE_DIR) in a
    private directory, not in the user's runtime directory."""
    previous = os.environ.get("CCX_STATE_DIR")
    os.environ["CCX_STATE_DIR"] = str(tmp_path_factory.mktemp("ccx-state"))
    yield
    if previous is None:
        os.environ.pop("CCX_STATE_DIR", None)
    else:
        os.environ["CCX_STATE_DIR"] = previous


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    """True when the long variants were asked for (--soak or CCX_SOAK=1)."""
    return soak_enabled(request.config)


def py(code: str) -> list[str]:
    """argv running *code* in a fresh Python interpreter."""
    return [PY, "-c", code]


def alive(pid: int) -> bool:
    """True if *pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2 :].split()[0] != b"Z"


def group_alive(pgid: int) -> bool:
    return any(m.state != "Z" for m in group_members(pgid))


class RawClient:
    """A bare JSON-RPC client over trio-websocket: what an independent client would do."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self._next_id = 0
        self.notifications: list[dict[str, Any]] = []
        self._responses: dict[Any, dict[str, Any]] = {}

    async def send(self, message: Any) -> None:
        await self.ws.send_message(message if isinstance(message, str | bytes)
                                   else json.dumps(message))

    async def receive(self) -> Any:
        return json.loads(await self.ws.get_message())

    async def request(self, method: str, params: Any = None, **kw: Any) -> dict[str, Any]:
        """Send one request; return its whole response; keep notifications seen meanwhile."""
        self._next_id += 1
        request_id = self._next_id
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None or kw:
            message["params"] = {**(params or {}), **kw}
        await self.send(message)
        return await self.response(request_id)

    async def response(self, request_id: Any) -> dict[str, Any]:
        while request_id not in self._responses:
            message = await self.receive()
            if isinstance(message, dict) and "method" in message:
                self.notifications.append(message)
            elif isinstance(message, dict):
                self._responses[message.get("id")] = message
            else:
                raise AssertionError(f"unexpected batch: {message}")
        return self._responses.pop(request_id)

    async def result(self, method: str, params: Any = None, **kw: Any) -> dict[str, Any]:
        reply = await self.request(method, params, **kw)
        assert "result" in reply, reply
        return reply["result"]  # type: ignore[no-any-return]

    async def error(self, method: str, params: Any = None, **kw: Any) -> dict[str, Any]:
        reply = await self.request(method, params, **kw)
        assert "error" in reply, reply
        return reply["error"]  # type: ignore[no-any-return]

    async def notification(self, method: str, session_id: str | None = None) -> dict[str, Any]:
        """The next notification called *method* (for *session_id*), waiting if needed."""
        while True:
            for i, message in enumerate(self.notifications):
                params = message.get("params", {})
                if message["method"] == method and session_id in (None, params.get("session_id")):
                    del self.notifications[i]
                    return params  # type: ignore[no-any-return]
            message = await self.receive()
            if isinstance(message, dict) and "method" in message:
                self.notifications.append(message)
            elif isinstance(message, dict):
                self._responses[message.get("id")] = message

    async def run_to_completion(
        self, session_id: str
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Every process.output of *session_id* in arrival order, and its process.completed."""
        outputs: list[dict[str, Any]] = []
        pending = [m for m in self.notifications
                   if m.get("params", {}).get("session_id") == session_id]
        self.notifications = [m for m in self.notifications if m not in pending]
        while True:
            if pending:
                message = pending.pop(0)
            else:
                message = await self.receive()
            if not isinstance(message, dict) or "method" not in message:
                if isinstance(message, dict):
                    self._responses[message.get("id")] = message
                continue
            params = message["params"]
            if params.get("session_id") != session_id:
                self.notifications.append(message)
                continue
            if message["method"] == "process.output":
                outputs.append(params)
            elif message["method"] == "process.completed":
                return outputs, params

    async def execute(self, command: Any, **params: Any) -> dict[str, Any]:
        return await self.result("execute", {"command": command, **params})

    async def run(self, command: Any, **params: Any) -> tuple[bytes, bytes, dict[str, Any]]:
        """Execute and collect: (stdout, stderr, completed), checking seq is contiguous."""
        started = await self.execute(command, **params)
        outputs, completed = await self.run_to_completion(started["session_id"])
        assert [o["seq"] for o in outputs] == list(range(len(outputs)))
        return join(outputs, "stdout"), join(outputs, "stderr"), completed


def join(outputs: list[dict[str, Any]], stream: str) -> bytes:
    import base64

    parts = []
    for o in outputs:
        if o["stream"] != stream:
            continue
        if o.get("encoding") == "base64":
            parts.append(base64.b64decode(o["data"]))
        else:
            parts.append(o["data"].encode("utf-8"))
    return b"".join(parts)


ServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start_server(nursery: trio.Nursery,
                       tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServerFactory]:
    """Start in-process servers with given settings; at teardown stop them and check that
    every process group they started is empty. Each test gets its own CCX_STATE_DIR."""
    servers: list[Server] = []
    state_dir = str(tmp_path_factory.mktemp("state"))

    async def factory(**overrides: Any) -> Server:
        settings = Settings(**{"port": 0, "kill_grace": 2.0, "state_dir": state_dir,
                               **overrides})
        server: Server = await nursery.start(Server(settings).run)
        servers.append(server)
        return server

    yield factory
    with trio.fail_after(30):
        for server in servers:
            server.stop()
        for server in servers:
            while server.port is not None and server.manager.live():
                await trio.sleep(0.01)
    for server in servers:
        for session in server.manager.all():
            assert not group_alive(session.group.pgid), f"leftover group {session.group.pgid}"


@pytest.fixture
async def server(start_server: ServerFactory) -> Server:
    return await start_server()


@pytest.fixture
async def connect(
    nursery: trio.Nursery, start_server: ServerFactory
) -> AsyncIterator[Callable[..., Awaitable[RawClient]]]:
    """Open raw WebSocket clients; at teardown close them (before their servers stop: taking
    `start_server` orders the teardowns, also for servers a test starts itself)."""
    opened: list[trio_websocket.WebSocketConnection] = []

    async def factory(server: Server, path: str = "/ws", **kw: Any) -> RawClient:
        ws = await trio_websocket.connect_websocket(
            nursery, "127.0.0.1", server.port or 0, path, use_ssl=False, **kw
        )
        opened.append(ws)
        return RawClient(ws)

    yield factory
    # Close them as a client would: aclose() discards notifications the test left unread,
    # which would otherwise keep trio-websocket's reader from answering the server's close
    # handshake at shutdown (the server then waits its close timeout for each connection).
    with trio.move_on_after(10):
        for ws in opened:
            await ws.aclose()


@pytest.fixture
async def client(server: Server, connect: Callable[..., Awaitable[RawClient]]) -> RawClient:
    return await connect(server)


def env_without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}


# ---------------------------------------------------------------------------------------------
# Helpers added for the contract tests (tests/test_contract_*.py). They look at the system the
# way an outside observer would (/proc, raw TCP), independently of ccx's own helpers.


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of *pid* from /proc/<pid>/stat, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), int(fields[2])


def group_pids(pgid: int, *, zombies: bool = False) -> dict[int, str]:
    """{pid: state} of every process whose process group is *pgid* (zombies only if asked)."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = proc_stat(int(entry))
        if stat is not None and stat[2] == pgid and (zombies or stat[0] != "Z"):
            found[int(entry)] = stat[0]
    return found


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0,
                   interval: float = 0.02) -> None:
    """Poll *predicate* until true; fail (trio.TooSlowError) after *timeout* seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(interval)


async def session_events(client: RawClient, session_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Every notification of *session_id* in arrival order (already buffered ones first), up
    to and including its process.completed. Other messages stay buffered in *client*."""
    events: list[tuple[str, dict[str, Any]]] = []
    keep: list[dict[str, Any]] = []
    for message in client.notifications:
        if message.get("params", {}).get("session_id") == session_id:
            events.append((message["method"], message["params"]))
        else:
            keep.append(message)
    client.notifications = keep
    while not any(method == "process.completed" for method, _ in events):
        message = await client.receive()
        if isinstance(message, dict) and "method" in message:
            if message.get("params", {}).get("session_id") == session_id:
                events.append((message["method"], message["params"]))
            else:
                client.notifications.append(message)
        elif isinstance(message, dict):
            client._responses[message.get("id")] = message
    return events


async def close_code(client: RawClient, timeout: float = 10.0) -> int | None:
    """Read (and keep) messages until the server closes the WebSocket; return its close code."""
    with trio.fail_after(timeout):
        while True:
            try:
                message = await client.receive()
            except trio_websocket.ConnectionClosed as exc:
                return exc.reason.code if exc.reason is not None else None
            if isinstance(message, dict) and "method" in message:
                client.notifications.append(message)
            elif isinstance(message, dict):
                client._responses[message.get("id")] = message


async def http_exchange(port: int, request: bytes,
                        timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw *request* bytes on a fresh TCP connection; return (status, headers, body)."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise AssertionError(f"connection closed inside the head: {data!r}")
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "-1"))
            while length < 0 or len(body) < length:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                body += chunk
    return status, headers, body


async def http_get(port: int, target: str, headers: dict[str, str] | None = None,
                   method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines += ["Connection: close", "", ""]
    return await http_exchange(port, "\r\n".join(lines).encode("latin-1"))


async def start_ready(client: RawClient, command: Any, **params: Any) -> dict[str, Any]:
    """Execute *command* and wait for its first output (the child's 'ready')."""
    started = await client.execute(command, **params)
    with trio.fail_after(10):
        await client.notification("process.output", started["session_id"])
    return started


async def completion(client: RawClient, session_id: str, timeout: float = 15) -> dict[str, Any]:
    """The session's `process.completed` params, within *timeout* seconds."""
    with trio.fail_after(timeout):
        return await client.notification("process.completed", session_id)
