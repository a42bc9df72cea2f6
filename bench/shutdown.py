"""The `shutdown` workload: SIGTERM to a `ccx serve` running N sessions; how long until it
exits, what is left, and whether the owners that read got every completion before 1001.

Run as `python -m bench.shutdown N [N ...]` (one JSON line per N on stdout), or through
`bench/run.py --only shutdown`. Inputs: this checkout's ccx, run as a separate process with
CCX_KILL_GRACE=1 (so PROTOCOL.md 5's bound is 3 s) and the session limits raised to N.
The N sessions (`sleep 1000` children, spread over connections of 50 sessions each):
every 10th on a PTY, every 10th (others) in a shell that ignores SIGTERM (so it needs the
SIGKILL at the end of the grace), and one connection in five an owner that never reads
after its execute responses, with sessions that wrote 256 KiB first (so its socket is full).
Set CCX_BENCH_LOG=FILE (and CCX_LOG_LEVEL=info) to keep the server's log.
Outputs: per N the seconds from SIGTERM to exit, the process groups still alive after it,
and for the reading owners the completions received and the close codes.
Docs: ../shared/PROTOCOL.md sections 5, 10; docs/performance.md.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import trio
import trio_websocket

KILL_GRACE_S = 1.0
PER_CONNECTION = 50
SLEEP = ["sleep", "1000"]
IGNORES_TERM = ["sh", "-c", "trap '' TERM; sleep 1000"]
NOISY = ["sh", "-c", "head -c 262144 /dev/zero | tr '\\0' x; sleep 1000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Owner:
    """One connection and its sessions."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, reads: bool) -> None:
        self.ws = ws
        self.reads = reads
        self.sessions: dict[str, int] = {}  # session id -> pgid
        self.completed: set[str] = set()
        self.close_code: int | None = None

    async def start(self, commands: list[tuple[list[str], bool]]) -> None:
        for index, (command, pty) in enumerate(commands):
            params: dict[str, Any] = {"command": command}
            if pty:
                params["pty"] = {"cols": 80, "rows": 24}
            await self.ws.send_message(json.dumps(
                {"jsonrpc": "2.0", "id": index, "method": "execute", "params": params}))
        while len(self.sessions) < len(commands):
            message = json.loads(await self.ws.get_message())
            if "id" in message and "result" in message:
                self.sessions[message["result"]["session_id"]] = message["result"]["pgid"]
            elif "id" in message:
                raise RuntimeError(f"execute failed: {message}")

    async def read_to_close(self) -> None:
        try:
            while True:
                message = json.loads(await self.ws.get_message())
                if message.get("method") == "process.completed":
                    self.completed.add(message["params"]["session_id"])
        except trio_websocket.ConnectionClosed as exc:
            self.close_code = exc.reason.code if exc.reason is not None else None


def _start_server(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log_path = os.environ.get("CCX_BENCH_LOG")  # the server's log, for a closer look
    with open(log_path or os.devnull, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", "import sys; from ccx.cli import main; "
             "sys.exit(main(sys.argv[1:]))", "serve", "--port", str(port)],
            env=env, stderr=log)


async def measure(count: int) -> dict[str, Any]:
    port = _free_port()
    state = tempfile.mkdtemp(prefix="ccx-bench-shutdown-")
    env = {**os.environ, "CCX_KILL_GRACE": str(KILL_GRACE_S),
           "CCX_LOG_LEVEL": os.environ.get("CCX_LOG_LEVEL", "warning"),
           "CCX_MAX_SESSIONS": str(count + 10),
           "CCX_MAX_SESSIONS_PER_CONNECTION": str(PER_CONNECTION), "CCX_STATE_DIR": state}
    server = _start_server(port, env)
    owners: list[Owner] = []
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(20):
                while True:
                    try:
                        await trio.open_tcp_stream("127.0.0.1", port)
                        break
                    except OSError:
                        await trio.sleep(0.05)
            commands: list[tuple[list[str], bool]] = []
            for index in range(count):
                pty = index % 10 == 0
                commands.append((IGNORES_TERM if index % 10 == 1 else SLEEP, pty))
            kinds = Counter("pty" if pty else "ignores_term" if cmd is IGNORES_TERM
                            else "plain" for cmd, pty in commands)
            chunks = [commands[i:i + PER_CONNECTION]
                      for i in range(0, count, PER_CONNECTION)]
            for number, chunk in enumerate(chunks):
                reads = number % 5 != 4 or len(chunks) == 1
                ws = await trio_websocket.connect_websocket(
                    nursery, "127.0.0.1", port, "/ws", use_ssl=False,
                    message_queue_size=100000)
                owner = Owner(ws, reads)
                if not reads:
                    chunk = [(NOISY if cmd is SLEEP else cmd, pty) for cmd, pty in chunk]
                owners.append(owner)
                await owner.start(chunk)
            for owner in owners:
                if owner.reads:
                    nursery.start_soon(owner.read_to_close)
            started = time.monotonic()
            server.send_signal(15)
            with trio.fail_after(60):
                while server.poll() is None:
                    await trio.sleep(0.005)
            exit_s = time.monotonic() - started
            with trio.move_on_after(5):
                while any(o.reads and o.close_code is None for o in owners):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        shutil.rmtree(state, ignore_errors=True)
    pgids = [pgid for owner in owners for pgid in owner.sessions.values()]
    left = [pgid for pgid in pgids if _group_alive(pgid)]
    readers = [o for o in owners if o.reads]
    return {
        "sessions": count, "kinds": dict(kinds),
        "unread_sessions": sum(len(o.sessions) for o in owners if not o.reads),
        "exit_s": round(exit_s, 3), "bound_s": KILL_GRACE_S + 2,
        "exit_code": server.returncode, "groups_left": len(left),
        "reader_completions": sum(len(o.completed) for o in readers),
        "reader_sessions": sum(len(o.sessions) for o in readers),
        "reader_close_codes": dict(Counter(str(o.close_code) for o in readers)),
    }


def main(argv: list[str]) -> int:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    for count in [int(a) for a in argv] or [10, 100, 1000]:
        print(json.dumps(trio.run(measure, count)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
