"""`ccx selftest`: boot a private server on a free loopback port and check the product for real.

Inputs: none (uses this Python to make child processes).
Outputs: one `PASS name` / `FAIL name: why` line per check, then `N passed, N failed`; the
exit code is 0 only if every check passed. Runs in about 10 s (more on a loaded machine).
Docs: ../shared/PROTOCOL.md, ../shared/DESIGN.md
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable

import trio
import trio_websocket

from ccx.client import Client, Output, ServerError, connect
from ccx.config import Settings
from ccx.process import group_members
from ccx.procfs import snapshot
from ccx.server import Server

PY = sys.executable
# A hang guard per check, not a measure: the slow-reader check moves 48 MiB through one
# process and took over 10 s on a loaded 2-core machine (three test suites at once).
CHECK_TIMEOUT_S = 30.0
FLOOD_BYTES = 48 * 1024 * 1024  # what the slow-reader child writes
RSS_BUDGET_BYTES = 64 * 1024 * 1024


def _alive(pgid: int) -> bool:
    return any(m.state != "Z" for m in group_members(pgid))


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def _gone(pgid: int, timeout: float = 5.0) -> bool:
    with trio.move_on_after(timeout):
        while _alive(pgid):
            await trio.sleep(0.01)
        return True
    return False


async def check_stream_exact(server: Server, client: Client) -> None:
    code = ("import os, sys\n"
            "data = bytes(range(256)) * 4096\n"
            "sys.stdout.buffer.write(data); sys.stdout.flush()\n"
            "sys.stderr.buffer.write('é€😀'.encode()[:5]); sys.stderr.flush()\n"
            "import time; time.sleep(0.05)\n"
            "sys.stderr.buffer.write('é€😀'.encode()[5:])\n")
    session = await client.execute([PY, "-c", code], encoding="base64")
    out = [e async for e in session.events() if isinstance(e, Output)]
    stdout = b"".join(e.data for e in out if e.stream == "stdout")
    assert stdout == bytes(range(256)) * 4096, f"stdout differs ({len(stdout)} bytes)"
    assert [e.seq for e in out] == list(range(len(out))), "seq not contiguous"
    session = await client.execute([PY, "-c", code])
    text = b"".join(e.data for e in [e async for e in session.events()]
                    if isinstance(e, Output) and e.stream == "stderr").decode()
    assert text == "é€😀", f"split UTF-8 corrupted: {text!r}"


async def check_exit_code(server: Server, client: Client) -> None:
    session = await client.execute([PY, "-c", "raise SystemExit(7)"])
    result = await session.wait()
    assert (result.status, result.exit_code) == ("exited", 7), result


async def check_pause_resume(server: Server, client: Client) -> None:
    """Waits on ccx's own state only (output events, the paused status, byte counts across
    status round trips), so a loaded machine cannot make it fail: no fixed sleep decides."""
    # The leader and a child in a session of its own (as Claude Code runs its Bash tool)
    # write "<who> <time>" every 10 ms (one write(2) each: lines never interleave).
    code = ("import os, time\nwho = 'L'\nif os.fork() == 0:\n    os.setsid(); who = 'C'\n"
            "while True:\n    os.write(1, f'{who} {time.time()}\\n'.encode()); time.sleep(0.01)")
    session = await client.execute([PY, "-c", code])
    lines: list[tuple[str, float]] = []
    pending = b""

    async def printed_since(moment: float) -> None:
        """Read output until both processes printed a line stamped after *moment*."""
        nonlocal pending
        if {who for who, at in lines if at > moment} == {"L", "C"}:
            return
        async for event in session.events():
            if isinstance(event, Output):
                pending += event.data
                *done, pending = pending.split(b"\n")
                lines.extend((w.decode(), float(t)) for w, t in (d.split() for d in done))
                if {who for who, at in lines if at > moment} == {"L", "C"}:
                    return
        raise AssertionError("the session ended")

    await printed_since(0.0)  # both run: the escapee exists
    assert await session.pause() == "paused"
    stopped_at = time.time()  # nothing either process prints may carry a later stamp...
    states = {m.state for m in group_members(session.pgid)}
    assert states <= {"T", "t"}, f"group not stopped: {states}"
    escapees = [p for p in snapshot().values()
                if p.ppid == session.pid and p.pgid != session.pgid]
    assert escapees and {p.state for p in escapees} <= {"T", "t"}, f"escapee runs: {escapees}"
    assert (await client.status(session.id))["status"] == "paused"
    # Output settles: what was in the pipe when the tree stopped gets read, then the count
    # stays put across a status round trip (a tree that went on writing never settles).
    before, after = -1, (await client.status(session.id))["stdout_bytes"]
    while after != before:
        before, after = after, (await client.status(session.id))["stdout_bytes"]
    resumed_at = time.time()  # ...before this one
    assert await session.resume() == "running"
    await printed_since(resumed_at)  # both print again after RESUME
    during = [(who, at) for who, at in lines if stopped_at < at < resumed_at]
    assert not during, f"output continued while paused: {during[:3]}"
    await session.cancel()
    assert (await session.wait()).status == "cancelled"


async def check_cancel_tree(server: Server, client: Client) -> None:
    session = await client.execute(["sh", "-c", "sleep 100 & sleep 100 & wait"])
    while len([m for m in group_members(session.pgid) if m.state != "Z"]) < 3:
        await trio.sleep(0.01)  # the shell forks its two children (bounded by the check's deadline)
    assert await session.cancel() == "cancelling"
    result = await session.wait()
    assert result.status == "cancelled", result
    assert not _alive(session.pgid), "survivors after process.completed"


async def check_term_ignored(server: Server, client: Client) -> None:
    code = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\ntime.sleep(100)")
    session = await client.execute([PY, "-c", code], kill_grace=0.5)
    async for event in session.events():
        if isinstance(event, Output):
            break
    started = time.monotonic()
    await session.cancel()
    result = await session.wait()
    elapsed = time.monotonic() - started
    assert result.status == "cancelled" and result.signal == "SIGKILL", result
    assert 0.4 < elapsed < 5, f"killed after {elapsed:.2f} s, grace was 0.5 s"
    assert not _alive(session.pgid)


async def check_slow_reader(server: Server, client: Client) -> None:
    code = (f"import sys\nchunk = b'x' * 65536\n"
            f"for _ in range({FLOOD_BYTES // 65536}):\n    sys.stdout.buffer.write(chunk)\n")
    rss_before = _rss_bytes()
    async with trio_websocket.open_websocket_url(server.url) as ws:
        request = {"jsonrpc": "2.0", "id": 1, "method": "execute",
                   "params": {"command": [PY, "-c", code], "encoding": "base64"}}
        await ws.send_message(json.dumps(request))
        session_id = json.loads(await ws.get_message())["result"]["session_id"]
        await trio.sleep(1.0)  # read nothing: the child must block
        stalled = (await client.status(session_id))["stdout_bytes"]
        assert stalled < FLOOD_BYTES // 2, f"child not throttled ({stalled} bytes read)"
        received, digest = 0, hashlib.sha256()
        import base64
        while True:
            message = json.loads(await ws.get_message())
            if message.get("method") == "process.output":
                data = base64.b64decode(message["params"]["data"])
                received += len(data)
                digest.update(data)
            elif message.get("method") == "process.completed":
                break
    growth = _rss_bytes() - rss_before
    assert received == FLOOD_BYTES, f"lost bytes: {FLOOD_BYTES - received}"
    expected = hashlib.sha256(b"x" * FLOOD_BYTES).hexdigest()
    assert digest.hexdigest() == expected, "bytes corrupted"
    assert growth < RSS_BUDGET_BYTES, f"RSS grew {growth >> 20} MiB"


async def check_allow_list(server: Server, client: Client) -> None:
    settings = Settings(port=0, allowed_commands=("echo",))
    async with trio.open_nursery() as nursery:
        strict = await nursery.start(Server(settings).run)
        async with connect(strict.url) as other:
            for command in (["cat"], ["/bin/cat"], [PY, "-c", "print(1)"]):
                try:
                    await other.execute(command)
                except ServerError as exc:
                    assert exc.code == -32001, exc
                else:
                    raise AssertionError(f"{command} was allowed")
            result = await (await other.execute(["echo", "ok"])).wait()
            assert result.exit_code == 0
        strict.stop()


async def check_disconnect_kills(server: Server, client: Client) -> None:
    async with connect(server.url) as other:
        session = await other.execute(["sh", "-c", "sleep 100 & sleep 100"])
        await trio.sleep(0.1)
    assert await _gone(session.pgid), "sessions of a closed connection survived"


async def check_pty(server: Server, client: Client) -> None:
    # No output from the SIGWINCH handler itself: the child reports after reading a line.
    code = ("import os, signal, sys, time\n"
            "winched = []\n"
            "signal.signal(signal.SIGWINCH, lambda *_: winched.append(1))\n"
            "print('tty', sys.stdin.isatty(), *os.get_terminal_size(), flush=True)\n"
            "line = sys.stdin.readline().strip()\n"
            "time.sleep(0.01)  # a pending handler runs by now\n"
            "print('echo', line, *os.get_terminal_size(), bool(winched), flush=True)\n")
    session = await client.execute([PY, "-c", code], pty=(100, 30))
    seen = b""

    async def until(text: bytes) -> None:
        nonlocal seen
        with trio.move_on_after(CHECK_TIMEOUT_S / 2):
            async for event in session.events():
                if isinstance(event, Output):
                    assert event.stream == "pty", event
                    seen += event.data
                    if text in seen:
                        return
        raise AssertionError(f"no {text!r} in {seen!r}")

    await until(b"tty True 100 30\r\n")
    assert await session.resize(120, 40) == {"session_id": session.id, "cols": 120, "rows": 40}
    await session.send("hi\r")
    await until(b"echo hi 120 40 True\r\n")
    result = await session.wait()
    assert (result.status, result.exit_code) == ("exited", 0), result


CHECKS: list[tuple[str, Callable[[Server, Client], Awaitable[None]]]] = [
    ("execute streams output byte-exact (base64 and split UTF-8)", check_stream_exact),
    ("non-zero exit code is reported", check_exit_code),
    ("PAUSE stops the tree (a setsid child too) and output, RESUME restarts it",
     check_pause_resume),
    ("CANCEL kills a 3-process tree with no survivors", check_cancel_tree),
    ("a TERM-ignoring child is SIGKILLed after the grace", check_term_ignored),
    ("a slow reader throttles the child: bounded RSS, no byte lost", check_slow_reader),
    ("the allow-list refuses what it must", check_allow_list),
    ("a closed connection kills its sessions", check_disconnect_kills),
    ("a PTY session: terminal, keystrokes, resize with SIGWINCH", check_pty),
]


async def run_checks() -> tuple[int, int]:
    passed = failed = 0
    async with trio.open_nursery() as nursery:
        server = await nursery.start(Server(Settings(port=0, kill_grace=2.0)).run)
        async with connect(server.url) as client:
            for name, check in CHECKS:
                try:
                    with trio.fail_after(CHECK_TIMEOUT_S):
                        await check(server, client)
                except Exception as exc:
                    failed += 1
                    print(f"FAIL {name}: {exc!r}", flush=True)
                else:
                    passed += 1
                    print(f"PASS {name}", flush=True)
        server.stop()
    return passed, failed


def main() -> int:
    from ccx.log import configure

    configure(os.environ.get("CCX_LOG_LEVEL", "critical").lower(), "console")
    passed, failed = trio.run(run_checks)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
