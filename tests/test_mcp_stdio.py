"""`ccx mcp` (stdio) as a process: it runs in the same composition root as `ccx serve`
(`ccx.node.Node`: subreaper, crash recovery), obeys a second signal as `ccx serve` does, and
ends when its peer hangs up while a `send_input` line waits for input room.

Rules as in tests/conftest.py. Real `ccx mcp` and `ccx serve` subprocesses (JSON logs on
stderr, read by a thread), a private CCX_STATE_DIR per test; waits are on ccx's log events
and on the children's own state (/proc), with deadlines only as hang guards.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import group_alive, proc_stat, py

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "reliability"))
from relhelp import CCX, RawWs, Serve

DEADLINE_S = 30.0  # hang guard for every wait here
LONG_GRACE = "60"  # a kill grace no test may sit out


class McpStdio:
    """A `ccx mcp` subprocess: JSON-RPC lines in and out, its log events collected."""

    def __init__(self, state_dir: Path, **env: str) -> None:
        self.proc = subprocess.Popen(
            [CCX, "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "CCX_LOG_FORMAT": "json", "CCX_STATE_DIR": str(state_dir),
                 "CCX_TRACK_INTERVAL": "0.1", **env})
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        self.events: list[dict[str, Any]] = []
        self._logged = threading.Condition()
        threading.Thread(target=self._read_log, daemon=True).start()
        self.wait_event("mcp_stdio_ready")

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._logged:
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    self.events.append({"event": "unparsed", "line": line.decode("replace")})
                self._logged.notify_all()

    def wait_event(self, name: str) -> dict[str, Any]:
        deadline = time.monotonic() + DEADLINE_S
        with self._logged:
            while True:
                found = [e for e in self.events if e.get("event") == name]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                assert left > 0, f"no {name} in {self.events}"
                self._logged.wait(left)

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def call(self, n: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Send a request and read lines until its answer (notifications are skipped)."""
        assert self.proc.stdout is not None
        self.send({"jsonrpc": "2.0", "id": n, "method": method, "params": params})
        while True:
            line = self.proc.stdout.readline()
            assert line, "stdout closed"
            reply: dict[str, Any] = json.loads(line)
            if reply.get("id") == n:
                return reply

    def start(self, command: list[str], **arguments: Any) -> dict[str, Any]:
        self.call(0, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                    "clientInfo": {"name": "t", "version": "0"}})
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        reply = self.call(1, "tools/call", {"name": "start", "arguments": {
            "command": command, **arguments}})
        started: dict[str, Any] = reply["result"]["structuredContent"]
        return started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def wait_until(predicate: Any, what: str) -> None:
    """Poll the children's own state (/proc) until *predicate*; fail after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def ignores_sigterm(pid: int) -> bool:
    """Whether *pid* has installed SIG_IGN for SIGTERM (SigIgn in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(line for line in f if line.startswith("SigIgn:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


TERM_IGNORER = py("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                  "time.sleep(600)")


@pytest.mark.parametrize("first", ["SIGTERM", "SIGINT", "eof"])
def test_second_signal_sigkills_every_group_and_exits(tmp_path: Path, first: str) -> None:
    """Regression: `ccx mcp` stopped listening after its first signal, so a second one
    killed it by the default action and left its TERM-ignoring group running for good.
    Now, as `ccx serve` (PROTOCOL.md 6): once the shutdown has begun (first signal, or EOF),
    another SIGTERM SIGKILLs every group and the process ends within ~2 s, not kill_grace."""
    mcp = McpStdio(tmp_path, CCX_KILL_GRACE=LONG_GRACE)
    try:
        pgid = mcp.start(TERM_IGNORER)["pid"]
        wait_until(lambda: ignores_sigterm(pgid), "the child never ignored SIGTERM")
        if first == "eof":
            assert mcp.proc.stdin is not None
            mcp.proc.stdin.close()
            mcp.wait_event("stdin_closed")
        else:
            mcp.proc.send_signal(signal.Signals[first])
            mcp.wait_event("signal_received")
        mcp.wait_event("signal_sent")  # the shutdown's SIGTERM went out: it sits out the grace
        assert group_alive(pgid)
        started = time.monotonic()
        mcp.proc.send_signal(signal.SIGTERM)
        mcp.proc.wait(timeout=DEADLINE_S)
        took = time.monotonic() - started
        assert not group_alive(pgid), "the TERM-ignoring group outlived `ccx mcp`"
        assert mcp.proc.returncode == 0, mcp.events
        assert took < float(LONG_GRACE) / 2, f"{took:.1f} s: the second signal was not obeyed"
        assert any(e.get("event") == "signal_received_again" for e in mcp.events), mcp.events
    finally:
        mcp.kill()


@pytest.mark.parametrize("how", ["stdin_eof", "stdout_closed"])
def test_peer_hang_up_while_input_waits_ends_the_server(tmp_path: Path, how: str) -> None:
    """Regression: while the reader waited for input room (CCX_MAX_INPUT_BYTES; the child
    reads nothing) it read nothing, so EOF behind unread `send_input` lines, or a closed
    stdout, went unseen: `ccx mcp` and its session ran on forever. A hang-up now ends it."""
    limit = 64 * 1024
    mcp = McpStdio(tmp_path, CCX_MAX_INPUT_BYTES=str(limit))
    assert mcp.proc.stdin is not None and mcp.proc.stdout is not None
    try:
        started = mcp.start(["sleep", "600"], stdin=True)
        line = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "send_input", "arguments": {"session_id": started["session_id"],
                                                 "data": "x" * (limit * 5 // 8)}}})
        # 6 lines: the first fills the child's pipe, the second then holds its charge and
        # the third cannot fit; our pipe holds them all, so none of the writes blocks.
        fcntl.fcntl(mcp.proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        mcp.proc.stdin.write((line + "\n").encode() * 6)
        mcp.proc.stdin.flush()
        if how == "stdin_eof":
            mcp.proc.stdin.close()  # EOF behind lines the reader cannot take yet
        else:
            mcp.proc.stdout.close()  # nobody reads the answers any more; stdin stays open
        mcp.proc.wait(timeout=DEADLINE_S)
        assert not group_alive(started["pid"]), "the session outlived its peer"
        assert any(e.get("event") == "peer_hung_up" for e in mcp.events), mcp.events
    finally:
        mcp.kill()


DAEMON = ("import os, sys, time\n"
          "if os.fork() == 0:\n"
          "    os.setsid()\n"
          "    if os.fork() == 0:\n"
          "        open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)\n"
          "    os._exit(0)\n"
          "os.wait(); time.sleep(600)\n")


@pytest.mark.parametrize("entry", ["serve", "mcp"])
def test_both_entry_points_adopt_and_stop_escapees(tmp_path: Path, entry: str) -> None:
    """`ccx serve` and `ccx mcp` share one composition root (`ccx.node.Node`): each is the
    subreaper of what it starts, so a daemon that left its group is re-parented to it, and
    stopping the node stops the daemon too (recovery of crash records: test_rel_crash)."""
    pid_file = tmp_path / "daemon.pid"
    command = [sys.executable, "-c", DAEMON, str(pid_file)]
    if entry == "serve":
        server = Serve(tmp_path)
        ccx_pid = server.proc.pid

        async def start() -> None:
            # a hang guard that says what the server did (seen once: no reply at all)
            try:
                with trio.fail_after(DEADLINE_S):
                    raw = await RawWs.connect(server.port)
                    reply = await raw.request("execute", {"command": command, "linger": 60})
            except trio.TooSlowError:
                raise AssertionError(f"no answer; server log: {server.events}") from None
            assert "session_id" in reply["result"], reply
            await raw.aclose()

        trio.run(start)
        stop = server.stop
    else:
        mcp = McpStdio(tmp_path)
        ccx_pid = mcp.proc.pid
        mcp.start(command)

        def stop() -> None:
            assert mcp.proc.stdin is not None
            mcp.proc.stdin.close()
            mcp.proc.wait(timeout=DEADLINE_S)
    daemon = 0
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text() != "", "no daemon")
        daemon = int(pid_file.read_text())
        wait_until(lambda: (proc_stat(daemon) or ("", 0, 0))[1] == ccx_pid,
                   f"the daemon was not adopted by ccx {entry}")
        stop()
        stat = proc_stat(daemon)
        assert stat is None or stat[0] == "Z", f"the daemon outlived ccx {entry}: {stat}"
    finally:
        if daemon and proc_stat(daemon) is not None:
            os.kill(daemon, signal.SIGKILL)
        if entry == "serve":
            server.proc.kill()
        else:
            mcp.kill()
