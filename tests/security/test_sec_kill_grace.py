"""Finding 1: `kill_grace` had no upper bound, and nothing could shorten a grace once running.

Attack: `execute` of a child that ignores SIGTERM with `"kill_grace": 1e308`, then CANCEL (or
a disconnect, a timeout, the MCP `execute` tool): the session stayed `cancelling` forever.
SIGTERM to the server then logged `shutdown_timeout` and hung (PROTOCOL.md 5's bound broken),
and a second SIGTERM killed the server by the default action, leaving the child running.
Rules checked:
- `kill_grace` above `CCX_MAX_KILL_GRACE` (300), or not finite, is -32602 (MCP: `isError`,
  and the tools' schemas carry the `maximum`); `timeout` and `linger` must be finite too;
- shutdown's cap reaches a grace that is already running (exit within CCX_KILL_GRACE + 2 s);
- a CANCEL repeated at least `REPEAT_CANCEL_FORCES_S` after the first forces SIGKILL now
  (docs/protocol-notes.md); an immediate duplicate changes nothing;
- once shutdown has begun, a further SIGTERM or SIGINT SIGKILLs every group and every tracked
  escapee, and the server exits within 2 s (PROTOCOL.md 6).
Rules of these tests: 127.0.0.1, port 0; real children that trap SIGTERM; a real `ccx serve`
subprocess where signals to the server matter (its JSON log is read in a thread, and the
tests wait on its events and on its crash record, not on sleeps); every process a test
starts is checked gone, and killed in `finally` if a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
from conftest import RawClient, alive, group_alive, py, start_ready

from ccx.config import ConfigError, Settings
from ccx.server import Server
from ccx.session import REPEAT_CANCEL_FORCES_S

Connect = Callable[..., Awaitable[RawClient]]
StartServer = Callable[..., Awaitable[Server]]
CCX = str(Path(sys.executable).with_name("ccx"))
SLACK_S = 1.5  # a busy 2-core machine may add this much to a bound measured from outside
IGNORES_TERM = py("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "print('ready', flush=True); time.sleep(1000)")


# ------------------------------------------------------------------------- the bound itself


async def test_kill_grace_beyond_the_bound_or_not_finite_is_refused(
        start_server: StartServer, connect: Connect) -> None:
    server = await start_server(max_kill_grace=10.0)
    client = await connect(server)
    for grace in (1e308, 10.5):
        error = await client.error("execute", {"command": ["true"], "kill_grace": grace})
        assert error["code"] == -32602 and "kill_grace" in error["message"], error
    # JSON has no infinity, but 1e999 parses to one: refused, never a float('inf') grace.
    for name in ("kill_grace", "timeout", "linger"):
        await client.send(f'{{"jsonrpc": "2.0", "id": "{name}", "method": "execute", '
                          f'"params": {{"command": ["true"], "{name}": 1e999}}}}')
        reply = await client.response(name)
        assert reply["error"]["code"] == -32602 and name in reply["error"]["message"], reply
    _, _, completed = await client.run(["true"], kill_grace=10)  # the bound itself is fine
    assert completed["status"] == "exited"
    info = await client.result("server.info")
    assert info["limits"]["max_kill_grace"] == 10.0


async def test_mcp_tools_refuse_it_and_publish_the_maximum(
        start_server: StartServer, connect: Connect) -> None:
    server = await start_server(max_kill_grace=10.0)
    client = await connect(server, "/ws", subprotocols=["mcp"])
    await client.result("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                       "clientInfo": {"name": "raw", "version": "0"}})
    await client.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    tools = {t["name"]: t for t in (await client.result("tools/list"))["tools"]}
    for name in ("execute", "start"):
        schema = tools[name]["inputSchema"]["properties"]["kill_grace"]
        assert schema["maximum"] == 10.0, schema
        result = await client.result("tools/call", {"name": name, "arguments": {
            "command": IGNORES_TERM, "kill_grace": 1e308}})
        assert result["isError"] and "kill_grace" in result["content"][0]["text"], result


# ------------------------------------------------------------------------- cancel again


async def test_cancel_repeated_after_a_while_forces_sigkill(
        start_server: StartServer, connect: Connect) -> None:
    server = await start_server(max_kill_grace=300.0)
    client = await connect(server)
    started = await start_ready(client, IGNORES_TERM, kill_grace=300)
    sid = started["session_id"]
    first = await client.result("control", {"session_id": sid, "type": "CANCEL"})
    cancelled_at = trio.current_time()
    assert first["status"] == "cancelling"
    again = await client.result("control", {"session_id": sid, "type": "CANCEL"})
    assert again["status"] == "cancelling"  # an immediate duplicate (a retry) forces nothing
    await trio.sleep(REPEAT_CANCEL_FORCES_S / 2)
    assert group_alive(started["pgid"])  # the claim: still in its grace after the duplicate
    await trio.sleep_until(cancelled_at + REPEAT_CANCEL_FORCES_S)
    forced = await client.result("control", {"session_id": sid, "type": "CANCEL"})
    assert forced["status"] == "cancelling"
    with trio.fail_after(10):  # before the fix: never (the grace was 300 s)
        done = await client.notification("process.completed", sid)
    assert done["status"] == "cancelled" and done["signal"] == "SIGKILL", done
    assert not group_alive(started["pgid"])


# ------------------------------------------------------------------------- a real server


class Serve:
    """A `ccx serve` subprocess; its JSON log events, read by a thread as they come."""

    def __init__(self, state_dir: Path, **env: str) -> None:
        self.state_dir = state_dir
        self.proc = subprocess.Popen(
            [CCX, "serve", "--port", "0"], stderr=subprocess.PIPE,
            env={**os.environ, "CCX_LOG_FORMAT": "json", "CCX_STATE_DIR": str(state_dir),
                 "CCX_TRACK_INTERVAL": "0.1", **env})
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        listening = self.wait_event("listening", timeout=20)
        self.port = int(listening["port"])

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "unparsed", "line": line.decode("replace")}
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self.events.append({"event": "<eof>"})
            self._changed.notify_all()

    def wait_event(self, name: str, timeout: float = 10, **fields: object) -> dict[str, Any]:
        """The first log event called *name* (with *fields*), waiting for it (blocking)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events:
                    if event.get("event") == name and all(
                            event.get(k) == v for k, v in fields.items()):
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or any(e.get("event") == "<eof>" for e in self.events):
                    raise AssertionError(f"no {name} {fields} in the log: {self.events}")
                self._changed.wait(left)

    def escapees(self) -> set[int]:
        """Pids of escaped descendants in the server's crash record."""
        found: set[int] = set()
        for path in self.state_dir.glob("server-*.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):  # replaced while read
                continue
            for group in record.get("groups", []):
                found.update(pid for pid, _ in group.get("escapees", []))
        return found

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    servers: list[Serve] = []

    def factory(**env: str) -> Serve:
        servers.append(Serve(tmp_path / f"state{len(servers)}", **env))
        return servers[-1]

    yield factory
    for server in servers:
        server.kill()


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def _started(server: Serve, nursery: trio.Nursery, command: list[str],
                   **params: Any) -> tuple[RawClient, dict[str, Any], str]:
    """Connect, execute *command*, return the client, the result and the first output."""
    ws = await trio_websocket.connect_websocket(nursery, "127.0.0.1", server.port, "/ws",
                                                use_ssl=False)
    client = RawClient(ws)
    started = await client.execute(command, **params)
    with trio.fail_after(10):
        output = await client.notification("process.output", started["session_id"])
    return client, started, output["data"]


async def _exit_time(server: Serve, timeout: float) -> float:
    """Seconds until the server process exits (raises if it has not within *timeout*)."""
    started = time.monotonic()
    with trio.fail_after(timeout):
        while server.proc.poll() is None:
            await trio.sleep(0.02)
    return time.monotonic() - started


async def test_shutdown_cuts_a_grace_already_running(
        serve_factory: Callable[..., Serve], nursery: trio.Nursery) -> None:
    server = serve_factory(CCX_KILL_GRACE="1", CCX_MAX_KILL_GRACE="100000")
    client, started, _ = await _started(server, nursery, IGNORES_TERM, kill_grace=100000)
    try:
        await client.result("control", {"session_id": started["session_id"],
                                        "type": "CANCEL"})
        await trio.to_thread.run_sync(
            lambda: server.wait_event("signal_sent", pgid=started["pgid"]))  # grace runs
        server.proc.send_signal(signal.SIGTERM)
        took = await _exit_time(server, timeout=1 + 2 + 10)  # before the fix: forever
        assert took < 1 + 2 + SLACK_S, took
        assert server.proc.returncode == 0
        assert not alive(started["pid"])
    finally:
        kill_leftovers([started["pid"]])


ESCAPING = py(
    "import os, signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); "
    "time.sleep(1000)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(1000)\n")


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
async def test_second_signal_during_shutdown_kills_every_group_and_escapee(
        serve_factory: Callable[..., Serve], nursery: trio.Nursery,
        second: signal.Signals) -> None:
    server = serve_factory(CCX_KILL_GRACE="60")
    _, started, printed = await _started(server, nursery, ESCAPING)
    escapee = int(printed.split()[0])
    pids = [started["pid"], escapee]
    try:
        with trio.fail_after(10):  # the tracker has seen it leave the group
            while escapee not in server.escapees():
                await trio.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(
            lambda: server.wait_event("signal_sent", pgid=started["pgid"]))  # 60 s grace
        assert server.proc.poll() is None and alive(started["pid"]) and alive(escapee)
        server.proc.send_signal(second)
        took = await _exit_time(server, timeout=10)
        assert took < 2 + SLACK_S, took
        with trio.fail_after(5):  # SIGKILLed: gone (or a zombie) at once
            while any(alive(pid) for pid in pids):
                await trio.sleep(0.02)
        assert not group_alive(started["pgid"])
    finally:
        kill_leftovers(pids)


@pytest.mark.parametrize("env", [
    {"CCX_KILL_GRACE": "nan"}, {"CCX_KILL_GRACE": "inf"}, {"CCX_MAX_KILL_GRACE": "inf"},
    {"CCX_MAX_KILL_GRACE": "nan"}, {"CCX_KILL_GRACE": "10", "CCX_MAX_KILL_GRACE": "5"},
    {"CCX_RETENTION": "nan"},
])
def test_settings_refuse_graces_that_never_end(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env(env)
