"""PROTOCOL.md 10 with a real `ccx serve`: SIGTERM drains for CCX_DRAIN_TIMEOUT (a short job
finishes, a long one is cancelled at the deadline with `reason: "drain"`), a second SIGTERM
cuts the drain short (`reason: "shutdown"`), readers get every completion before their close
1001 and nothing is left; servers sharing one CCX_STATE_DIR, also as PID 1 of their own PID
namespaces, keep separate crash records and each recovers only dead servers' ones.

Rules: real servers (JSON log read by a thread; tests wait on its events), real children,
127.0.0.1 and port 0; every process a test starts is checked gone, killed in `finally`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
from conftest import RawClient, alive, close_code, http_get, py

CCX = str(Path(sys.executable).with_name("ccx"))
SLEEPS = py("import time; print('ready', flush=True); time.sleep(1000)")
UNTIL_LINE = py("import sys; print('ready', flush=True); sys.stdin.readline()")


class Serve:
    """A `ccx serve` subprocess (optionally under a *prefix* such as `unshare`); its JSON
    log events, read by a thread as they come."""

    def __init__(self, state_dir: Path, prefix: tuple[str, ...] = (), **env: str) -> None:
        self.state_dir = state_dir
        self.prefix = prefix
        self.proc = subprocess.Popen(
            [*prefix, CCX, "serve", "--port", "0"], stderr=subprocess.PIPE,
            env={**os.environ, "CCX_LOG_FORMAT": "json", "CCX_STATE_DIR": str(state_dir),
                 "CCX_KILL_GRACE": "1", **env})
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = int(self.wait_event("listening", timeout=20)["port"])

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "unparsed", "line": line.decode(errors="replace")}
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self.events.append({"event": "<eof>"})
            self._changed.notify_all()

    def wait_event(self, name: str, timeout: float = 15, **fields: object) -> dict[str, Any]:
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

    async def event(self, name: str, timeout: float = 15, **fields: object) -> dict[str, Any]:
        return await trio.to_thread.run_sync(
            lambda: self.wait_event(name, timeout, **fields))

    async def exited(self, timeout: float = 20) -> int:
        with trio.fail_after(timeout):
            while self.proc.poll() is None:
                await trio.sleep(0.02)
        return self.proc.returncode

    async def connect(self, nursery: trio.Nursery) -> RawClient:
        ws = await trio_websocket.connect_websocket(nursery, "127.0.0.1", self.port, "/ws",
                                                    use_ssl=False)
        return RawClient(ws)

    @property
    def pid(self) -> int:
        """The server's pid (in our PID namespace): under a prefix, the prefix's child."""
        if not self.prefix:
            return self.proc.pid
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            return int(f.read().split()[0])

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        if self.prefix and self.proc.poll() is None:
            try:
                self.signal(signal.SIGKILL)
            except (OSError, IndexError, ValueError):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    servers: list[Serve] = []

    def factory(state_dir: Path | None = None, prefix: tuple[str, ...] = (),
                **env: str) -> Serve:
        servers.append(Serve(state_dir or tmp_path / f"state{len(servers)}", prefix, **env))
        return servers[-1]

    yield factory
    for server in servers:
        server.kill()


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


async def _start(client: RawClient, command: list[str], **params: Any) -> dict[str, Any]:
    started = await client.execute(command, **params)
    with trio.fail_after(10):
        await client.notification("process.output", started["session_id"])
    return started


async def test_sigterm_drains_lets_a_short_job_finish_and_cancels_a_long_one(
        serve: Callable[..., Serve], nursery: trio.Nursery) -> None:
    server = serve(CCX_DRAIN_TIMEOUT="3", CCX_NODE_NAME="ccx-0")
    client = await server.connect(nursery)
    short = await _start(client, UNTIL_LINE, stdin=True)
    long = await _start(client, SLEEPS)
    try:
        server.proc.send_signal(signal.SIGTERM)
        await server.event("draining")
        status, _, body = await http_get(server.port, "/ready")
        assert (status, json.loads(body)) == (503, {"ready": False, "reason": "draining"})
        error = await client.error("execute", {"command": ["true"]})
        assert error["code"] == -32007 and error["data"] == {"node": "ccx-0"}
        await client.result("input", {"session_id": short["session_id"], "data": "go\n"})
        with trio.fail_after(10):
            done = await client.notification("process.completed", short["session_id"])
        assert done["status"] == "exited" and done["exit_code"] == 0 and "reason" not in done
        with trio.fail_after(15):
            done = await client.notification("process.completed", long["session_id"])
        assert done["status"] == "cancelled" and done["reason"] == "drain", done
        assert await close_code(client) == 1001
        assert await server.exited() == 0
        await server.event("drain_timeout")
        assert not alive(long["pid"])
    finally:
        _kill([short["pgid"], long["pgid"]])


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
async def test_second_signal_cuts_the_drain_short(
        serve: Callable[..., Serve], nursery: trio.Nursery, second: signal.Signals) -> None:
    server = serve(CCX_DRAIN_TIMEOUT="300")
    client = await server.connect(nursery)
    long = await _start(client, SLEEPS)
    try:
        server.proc.send_signal(signal.SIGTERM)
        await server.event("draining")
        server.proc.send_signal(second)
        with trio.fail_after(15):
            done = await client.notification("process.completed", long["session_id"])
        assert done["status"] == "cancelled" and done["reason"] == "shutdown", done
        assert await close_code(client) == 1001
        assert await server.exited() == 0
        await server.event("drain_cut_short")
        assert not alive(long["pid"])
    finally:
        _kill([long["pgid"]])


async def _stays_draining(client: RawClient, sessions: int) -> None:
    """A node that got SIGTERM (node name ccx-0): execute -32007, `draining: true`, and an
    undo is refused (-32007, `data.stopping`) without changing that."""
    refused = await client.error("drain", {"undo": True})
    assert refused["code"] == -32007 and "stopping" in refused["message"], refused
    assert refused["data"] == {"node": "ccx-0", "stopping": True}, refused
    error = await client.error("execute", {"command": ["true"]})
    assert error["code"] == -32007 and error["message"] == "node draining", error
    assert error["data"] == {"node": "ccx-0"}, error
    assert (await client.result("server.info"))["draining"] is True
    # a plain drain (what `ccx drain --wait` polls the count with) still answers
    assert await client.result("drain") == {"draining": True, "sessions": sessions}


IGNORES_TERM = py("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "print('ready', flush=True); time.sleep(1000)")


@pytest.mark.parametrize("drain_timeout", ["0", "300"])
async def test_a_node_that_got_sigterm_stays_draining(
        serve: Callable[..., Serve], nursery: trio.Nursery, drain_timeout: str) -> None:
    """Regressions: with CCX_DRAIN_TIMEOUT=0, SIGTERM went straight to the shutdown without
    draining (`execute` during it got -32003 "server is shutting down", `draining: false`);
    and `drain {"undo": true}` during SIGTERM's drain made the node ready again while it was
    stopping. A node that is going away is draining (PROTOCOL.md 10), for good."""
    # With 0, the session ignores SIGTERM: the shutdown waits CCX_KILL_GRACE for it, and
    # meanwhile the connection is still served (closed with 1001 only after the sessions).
    server = serve(CCX_DRAIN_TIMEOUT=drain_timeout, CCX_NODE_NAME="ccx-0",
                   CCX_KILL_GRACE="30" if drain_timeout == "0" else "1")
    client = await server.connect(nursery)
    session = await _start(client, IGNORES_TERM if drain_timeout == "0" else SLEEPS)
    try:
        server.signal(signal.SIGTERM)
        await server.event("shutting_down" if drain_timeout == "0" else "draining")
        await _stays_draining(client, sessions=1)
        if drain_timeout != "0":  # the listener is closed once the shutdown has begun
            status, _, body = await http_get(server.port, "/ready")
            assert (status, json.loads(body)) == (503, {"ready": False, "reason": "draining"})
        # ends the drain (300), or SIGKILLs during the shutdown (0)
        server.signal(signal.SIGTERM)
        with trio.fail_after(15):
            done = await client.notification("process.completed", session["session_id"])
        assert done["status"] == "cancelled" and done["reason"] == "shutdown", done
        assert await server.exited() == 0
        assert not alive(session["pid"])
    finally:
        _kill([session["pgid"]])


async def test_sigint_does_not_drain(
        serve: Callable[..., Serve], nursery: trio.Nursery) -> None:
    server = serve(CCX_DRAIN_TIMEOUT="300")
    client = await server.connect(nursery)
    long = await _start(client, SLEEPS)
    try:
        server.proc.send_signal(signal.SIGINT)
        with trio.fail_after(15):
            done = await client.notification("process.completed", long["session_id"])
        assert done["status"] == "cancelled" and done["reason"] == "shutdown", done
        assert await server.exited() == 0
        assert not any(e.get("event") == "draining" for e in server.events)
    finally:
        _kill([long["pgid"]])


async def _groups(state_dir: Path) -> dict[str, list[int]]:
    """Record file name -> pgids it lists."""
    found = {}
    for path in state_dir.glob("server-*.json"):
        found[path.name] = [g["pgid"] for g in json.loads(path.read_text())["groups"]]
    return found


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="PID namespaces need root and unshare(1)")
async def test_pid1_servers_sharing_a_state_dir_keep_and_recover_their_own_records(
        serve: Callable[..., Serve], nursery: trio.Nursery, tmp_path: Path) -> None:
    """Every server is PID 1 of its namespace: pids alike, records must not be."""
    shared = tmp_path / "shared"
    unshare = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child")
    dead = serve(shared, unshare, CCX_NODE_NAME="ccx-0")
    live = serve(shared, unshare, CCX_NODE_NAME="ccx-0")  # even the same node name
    dead_client, live_client = await dead.connect(nursery), await live.connect(nursery)
    await _start(dead_client, SLEEPS)
    survivor = await _start(live_client, SLEEPS)
    with trio.fail_after(10):
        while len(await _groups(shared)) < 2:
            await trio.sleep(0.05)
    records = await _groups(shared)
    assert len(records) == 2 and all(len(g) == 1 for g in records.values()), records
    info = await dead_client.result("server.info")
    dead_name = f"server-ccx-0-{info['incarnation']}.json"
    assert dead_name in records

    dead.signal(signal.SIGKILL)  # PID 1 of its namespace: every process there dies with it
    await dead.exited()
    third = serve(shared, unshare, CCX_NODE_NAME="ccx-1")
    recovered = await third.event("state_file_recovered")
    assert recovered["path"].endswith(dead_name), recovered
    remaining = await _groups(shared)
    assert dead_name not in remaining
    assert any(n.startswith("server-ccx-0-") for n in remaining)  # the live one's
    assert not any(e.get("event") == "state_file_recovered" and dead_name not in e["path"]
                   for e in third.events)
    # the live server's session was not touched
    status = await live_client.result("status", {"session_id": survivor["session_id"]})
    assert status["status"] == "running"
    for server in (live, third):
        server.signal(signal.SIGTERM)
        await server.event("stopped")
        assert await server.exited() == 0


async def test_servers_sharing_a_state_dir_recover_only_dead_ones_groups(
        serve: Callable[..., Serve], nursery: trio.Nursery, tmp_path: Path) -> None:
    """One PID namespace: a SIGKILLed server's children live on; the next start stops
    them, and leaves a live server's alone."""
    shared = tmp_path / "shared"
    dead, live = serve(shared), serve(shared)
    dead_client, live_client = await dead.connect(nursery), await live.connect(nursery)
    orphan = await _start(dead_client, SLEEPS)
    survivor = await _start(live_client, SLEEPS)
    try:
        with trio.fail_after(10):
            while sum(len(g) for g in (await _groups(shared)).values()) < 2:
                await trio.sleep(0.05)
        dead.proc.kill()
        await dead.exited()
        assert alive(orphan["pid"])
        third = serve(shared)
        stopped = await third.event("orphan_group_stopped")
        assert stopped["pgid"] == orphan["pgid"], stopped
        assert not alive(orphan["pid"])
        status = await live_client.result("status", {"session_id": survivor["session_id"]})
        assert status["status"] == "running" and alive(survivor["pid"])
        for server in (live, third):
            server.proc.send_signal(signal.SIGTERM)
            assert await server.exited() == 0
    finally:
        _kill([orphan["pgid"], survivor["pgid"]])


async def test_shutdown_of_many_sessions_leaves_nothing_and_readers_get_completions(
        serve: Callable[..., Serve], nursery: trio.Nursery) -> None:
    """Shutdown runs every kill path at once: plain children, ones that ignore SIGTERM,
    PTY sessions, and an owner that never reads (its socket full). Timing is the
    benchmark's business (bench/shutdown.py); here: nothing left, completions, 1001."""
    server = serve(CCX_MAX_SESSIONS="100", CCX_MAX_SESSIONS_PER_CONNECTION="50")
    reader, idle = await server.connect(nursery), await server.connect(nursery)
    ignores = ["sh", "-c", "trap '' TERM; echo ready; sleep 1000"]
    noisy = ["sh", "-c", "head -c 262144 /dev/zero | tr '\\0' x; sleep 1000"]
    started = []
    for index in range(24):
        pty = {"pty": {"cols": 80, "rows": 24}} if index % 4 == 0 else {}
        started.append(await _start(reader, ignores if index % 4 == 1 else SLEEPS, **pty))
    unread = [await idle.execute(noisy) for _ in range(8)]
    pgids = [s["pgid"] for s in started + unread]
    try:
        server.signal(signal.SIGTERM)
        assert await close_code(reader, timeout=20) == 1001
        completed = {m["params"]["session_id"] for m in reader.notifications
                     if m.get("method") == "process.completed"}
        assert completed == {s["session_id"] for s in started}
        for message in reader.notifications:
            if message.get("method") == "process.completed":
                assert message["params"]["reason"] == "shutdown", message
        assert await server.exited() == 0
        left = []
        for pgid in pgids:
            try:
                os.killpg(pgid, 0)
                left.append(pgid)
            except ProcessLookupError:
                pass
        assert left == []
    finally:
        _kill(pgids)
