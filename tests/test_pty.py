"""PTY sessions (PROTOCOL.md section 9) with real programs on a real pseudo-terminal.

Rules: as in conftest (127.0.0.1, port 0, real children, a deadline on every test, every server
fixture asserting its groups are empty). A PTY session's members are its whole session (a
job-control shell puts jobs in process groups of their own), so leftovers are looked for by
session id here, through /proc. Waits are for output, never fixed sleeps where output can say
when; each test stays well under a few seconds.
"""

from __future__ import annotations

import base64
import functools
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from conftest import PY, RawClient, py, wait_for

from ccx.server import Server

Connect = Callable[..., Awaitable[RawClient]]
SH = "/bin/sh"


def session_pids(sid: int) -> dict[int, str]:
    """{pid: state} of every live (non-zombie) process of session *sid*."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != b"Z":
            found[int(entry)] = fields[0].decode()
    return found


def all_stopped(sid: int) -> bool:
    """Every live process of session *sid* is stopped (PAUSE is done with it)."""
    return set(session_pids(sid).values()) <= {"T", "t"}


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class Terminal:
    """The client's view of one PTY session: what the screen received, and its keyboard."""

    def __init__(self, client: RawClient, started: dict[str, Any], *,
                 keep_text: bool = True) -> None:
        self.client = client
        self.keep_text = keep_text
        self.received_bytes = 0
        self.id: str = started["session_id"]
        self.pid: int = started["pid"]
        self.text = ""
        self.outputs: list[dict[str, Any]] = []
        self.completed: dict[str, Any] | None = None

    def _take(self, method: str, params: dict[str, Any]) -> None:
        if method == "process.output":
            assert params["stream"] == "pty", params
            self.outputs.append(params)
            if params.get("encoding") == "base64":
                data = base64.b64decode(params["data"])
            else:
                data = params["data"].encode()
            self.received_bytes += len(data)
            if self.keep_text:
                self.text += data.decode("utf-8", "replace")
        elif method == "process.completed":
            self.completed = params

    async def expect(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Read output until *pattern* (a regex) matches what arrived since the last match."""
        try:
            with trio.fail_after(timeout):
                while True:
                    found = re.search(pattern, self.text)
                    if found:
                        self.text = self.text[found.end():]
                        return found
                    if self.completed is not None:
                        raise AssertionError(f"ended before {pattern!r}; got {self.text!r}")
                    await self._read_one()
        except trio.TooSlowError:
            raise AssertionError(f"no {pattern!r} within {timeout} s; got {self.text!r}") from None

    async def _read_one(self) -> None:
        client = self.client
        for i, message in enumerate(client.notifications):
            if message.get("params", {}).get("session_id") == self.id:
                del client.notifications[i]
                self._take(message["method"], message["params"])
                return
        message = await client.receive()
        if isinstance(message, dict) and "method" in message:
            if message["params"].get("session_id") == self.id:
                self._take(message["method"], message["params"])
            else:
                client.notifications.append(message)
        elif isinstance(message, dict):
            client._responses[message.get("id")] = message

    async def type(self, data: str, **params: Any) -> dict[str, Any]:
        return await self.client.result("input", session_id=self.id, data=data, **params)

    async def wait(self, timeout: float = 10.0) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while self.completed is None:
                await self._read_one()
        assert [o["seq"] for o in self.outputs] == list(range(len(self.outputs)))
        return self.completed


async def start(client: RawClient, command: Any, cols: int = 80, rows: int = 24,
                keep_text: bool = True, **params: Any) -> Terminal:
    started = await client.execute(command, pty={"cols": cols, "rows": rows}, **params)
    return Terminal(client, started, keep_text=keep_text)


async def test_python_repl_round_trip(client: RawClient) -> None:
    term = await start(client, [PY, "-i", "-q"])
    await term.expect(">>> ")
    await term.type("print(6 * 7)\r")  # Enter is \r on a terminal in cooked mode
    await term.expect(r"print\(6 \* 7\)\r\n42\r\n>>> ")
    result = await term.type("", eof=True)  # ^D at the prompt leaves the REPL
    assert result == {"session_id": term.id, "bytes": 0}
    completed = await term.wait()
    assert completed["status"] == "exited" and completed["exit_code"] == 0
    total = sum(len(o["data"].encode()) for o in term.outputs)
    assert completed["stdout_bytes"] == total and completed["stderr_bytes"] == 0
    info = await client.result("status", session_id=term.id)
    assert info["pty"] == {"cols": 80, "rows": 24}
    assert session_pids(term.pid) == {}


async def test_program_sees_a_controlling_terminal(client: RawClient) -> None:
    code = ("import os, sys\n"
            "tty = all(s.isatty() for s in (sys.stdin, sys.stdout, sys.stderr))\n"
            "if tty: print('only-on-a-tty', os.environ['TERM'])\n"
            "print('session-leader', os.getsid(0) == os.getpid() == os.getpgrp())\n"
            "print('foreground', os.tcgetpgrp(0) == os.getpgrp())\n"
            "open('/dev/tty', 'rb').close(); print('dev-tty-ok')\n"
            "sys.stderr.write('to-stderr\\n')\n"
            "print('fds', sorted(os.listdir('/proc/self/fd')))\n")
    term = await start(client, py(code))
    completed = await term.wait()
    text = term.text
    assert "only-on-a-tty xterm-256color\r\n" in text
    assert "session-leader True" in text and "foreground True" in text and "dev-tty-ok" in text
    assert "to-stderr\r\n" in text  # stderr is the terminal too: merged into stream "pty"
    assert "fds ['0', '1', '2', '3']" in text  # nothing but the slave (and listdir's own fd)
    assert completed["status"] == "exited" and completed["exit_code"] == 0
    # The same program without a terminal prints nothing of the sort.
    stdout, _, _ = await client.run(py(code))
    assert b"only-on-a-tty" not in stdout and b"foreground" not in stdout


async def test_stty_size_and_resize_with_sigwinch(client: RawClient) -> None:
    term = await start(client, [SH, "-c", "stty size"], cols=77, rows=22)
    await term.expect("22 77\r\n")
    await term.wait()
    # The handler records the size it sees; the child waits in sleep(), not in a blocking
    # read: a Python handler for a signal that lands just before read(2) only runs after it.
    code = ("import os, signal, sys, time\n"
            "seen = []\n"
            "signal.signal(signal.SIGWINCH, lambda *_: seen.append(os.get_terminal_size(0)))\n"
            "c, r = os.get_terminal_size(0)\n"
            "print(f'start {c}x{r}', flush=True)\n"
            "while not seen:\n"
            "    time.sleep(0.01)\n"
            "c, r = seen[-1]\n"
            "print(f'winch {c}x{r}', flush=True)\n"
            "sys.stdin.readline()\n")
    term = await start(client, py(code), cols=100, rows=30)
    await term.expect("start 100x30")
    result = await client.result("resize", session_id=term.id, cols=132, rows=43)
    assert result == {"session_id": term.id, "cols": 132, "rows": 43}
    await term.expect("winch 132x43")
    info = await client.result("status", session_id=term.id)
    assert info["pty"] == {"cols": 132, "rows": 43}
    await term.type("\r")
    assert (await term.wait())["exit_code"] == 0


async def test_interactive_shell_ctrl_c_and_eof(client: RawClient) -> None:
    term = await start(client, [SH, "-i"], env={"PS1": "ccx$ ", "ENV": ""})
    await term.expect(r"ccx\$ ")
    await term.type("stty size; echo mark$((1 + 1))\r")
    await term.expect(r"24 80\r\nmark2\r\n")
    await client.result("resize", session_id=term.id, cols=120, rows=40)
    await term.type("stty size; echo mark$((2 + 1))\r")
    await term.expect(r"40 120\r\nmark3\r\n")
    await term.type("sleep 30\r")
    await wait_for(lambda: "S" in {s for p, s in session_pids(term.pid).items()
                                   if p != term.pid and _comm(p) == "sleep"})
    await term.type("\x03")
    await term.type("echo back$?\r")
    # The shell's own record, not timing: the job ended by SIGINT (status 128 + 2), so ^C
    # reached the foreground job; the sleep would have ended with 0.
    await term.expect(r"back130\r\n", timeout=25)
    assert not any(_comm(p) == "sleep" for p in session_pids(term.pid))
    await term.type("", eof=True)  # ^D on an empty line: the shell leaves
    completed = await term.wait()
    assert completed["status"] == "exited" and completed["exit_code"] == 0
    assert session_pids(term.pid) == {}


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


async def test_cat_line_discipline_and_eof(client: RawClient) -> None:
    term = await start(client, ["cat"], encoding="base64")
    await term.type("héllo\r")
    await term.expect("héllo\r\nhéllo\r\n")  # the terminal's echo, then cat's copy
    await term.type("", eof=True)
    completed = await term.wait()
    assert completed["status"] == "exited" and completed["exit_code"] == 0
    assert all(o["encoding"] == "base64" for o in term.outputs)


async def test_pause_resume_cancel(client: RawClient) -> None:
    code = "import time\nwhile True:\n    print('tick', flush=True)\n    time.sleep(0.02)\n"
    term = await start(client, py(code))
    await term.expect("tick")
    assert (await client.result("control", session_id=term.id, type="PAUSE"))["status"] == \
        "paused"
    await wait_for(functools.partial(all_stopped, term.pid))  # a busy disk delays some (D)
    await client.result("control", session_id=term.id, type="RESUME")
    await term.expect("tick")
    await client.result("control", session_id=term.id, type="CANCEL")
    completed = await term.wait()
    assert completed["status"] == "cancelled"
    assert session_pids(term.pid) == {}


async def test_pause_resume_leaves_a_shell_job_in_the_foreground(client: RawClient) -> None:
    # Had the shell seen its job stop, it would take the terminal back ("Stopped (tty
    # input)") and the resumed job would stop again at its first read.
    for _ in range(2):  # the race it guards against lost 8 times out of 10 without the fix
        term = await start(client, [SH, "-i"], env={"PS1": "ccx$ ", "ENV": ""}, kill_grace=0.2)
        await term.expect(r"ccx\$ ")
        await term.type(f"{PY} -c \"print('re' + 'ady'); print('got', input())\"\r")
        await term.expect("ready")  # from the job itself, not the echo of the command line
        await client.result("control", session_id=term.id, type="PAUSE")
        await wait_for(functools.partial(all_stopped, term.pid))
        await client.result("control", session_id=term.id, type="RESUME")
        await term.type("hello\r")
        await term.expect("got hello")
        await client.result("control", session_id=term.id, type="CANCEL")
        await term.wait()


async def test_cancel_reaches_every_job_of_a_shell(client: RawClient) -> None:
    # An interactive shell ignores SIGTERM (SIGKILL after the grace ends it) and puts each job
    # in a process group of its own: CANCEL must reach those too.
    term = await start(client, [SH, "-i"], env={"PS1": "ccx$ ", "ENV": ""}, kill_grace=0.3)
    await term.expect(r"ccx\$ ")
    await term.type("sleep 60 &\r")
    await wait_for(lambda: any(_comm(p) == "sleep" for p in session_pids(term.pid)))
    job = next(p for p in session_pids(term.pid) if _comm(p) == "sleep")
    assert os.getpgid(job) != term.pid  # its own job: not in the leader's process group
    await client.result("control", session_id=term.id, type="CANCEL")
    completed = await term.wait()
    assert completed["status"] == "cancelled" and completed["signal"] == "SIGKILL"
    assert session_pids(term.pid) == {}
    assert _comm(job) != "sleep"  # the job in its own process group is gone too


async def test_status_rules_as_for_pipes(client: RawClient) -> None:
    term = await start(client, ["sleep", "30"], timeout=0.3)
    completed = await term.wait()
    assert completed["status"] == "timeout" and completed["exit_code"] is None
    term = await start(client, py("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"))
    completed = await term.wait()
    assert (completed["status"], completed["signal"]) == ("killed", "SIGSEGV")
    term = await start(client, [SH, "-c", "echo bye; exit 3"])
    await term.expect("bye\r\n")
    completed = await term.wait()
    assert (completed["status"], completed["exit_code"]) == ("exited", 3)
    term = await start(client, py("import signal, sys, time\n"
                                  "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
                                  "print('armed', flush=True); time.sleep(30)\n"))
    await term.expect("armed")
    await client.result("control", session_id=term.id, type="CANCEL")
    completed = await term.wait()  # exits 0 on SIGTERM, yet it was cancelled
    assert completed["status"] == "cancelled"


async def test_slow_reader_throttles_the_child(start_server: Any, connect: Connect,
                                               tmp_path: Any) -> None:
    server = await start_server(replay_bytes=64 * 1024)
    client = await connect(server, max_message_size=16 * 1024 * 1024)
    marker = tmp_path / "done"
    total = 4 * 1024 * 1024  # far more than every buffer between child and test put together
    code = (f"import os\nblock = b'x' * 65536\n"
            f"for _ in range({total // 65536}):\n    os.write(1, block)\n"
            f"open({str(marker)!r}, 'w').close()\n")
    term = await start(client, py(code), keep_text=False)
    session = server.manager.get(term.id)
    await wait_for(lambda: session.stdout_bytes > 0)
    await trio.sleep(0.5)  # nobody reads: the child must be stuck in write(2)
    stalled = session.stdout_bytes
    await trio.sleep(0.3)
    assert session.stdout_bytes == stalled < total
    assert not marker.exists()
    assert session_pids(term.pid)  # still there, blocked
    completed = await term.wait(timeout=60)
    assert completed["status"] == "exited" and completed["stdout_bytes"] == total
    assert term.received_bytes == total
    assert marker.exists()
    await client.ws.aclose()  # before its server stops, or the close handshake costs 2 s


async def test_attach_replays_a_pty_session(server: Server, connect: Connect) -> None:
    first = await connect(server)
    code = ("import sys\nprint('one', flush=True)\nline = sys.stdin.readline()\n"
            "print('got', line.strip(), flush=True)\n")
    term = await start(first, py(code), linger=30)
    await term.expect("one")
    await first.ws.aclose()
    session = server.manager.get(term.id)
    await wait_for(lambda: session.owner is None)
    second = await connect(server)
    result = await second.result("attach", session_id=term.id, since_seq=-1)
    assert result["status"] == "running" and result["next_seq"] >= 1
    again = Terminal(second, {"session_id": term.id, "pid": term.pid})
    await again.expect("one\r\n")  # replayed from seq 0
    await second.result("resize", session_id=term.id, cols=90, rows=20)
    await again.type("two\r")
    await again.expect("got two")
    completed = await again.wait()
    assert completed["status"] == "exited"
    assert again.outputs[0]["seq"] == 0


async def test_resize_and_input_errors(client: RawClient) -> None:
    pipe = await client.execute(py("import time; time.sleep(30)"))
    error = await client.error("resize", session_id=pipe["session_id"], cols=80, rows=24)
    assert error["code"] == -32004
    error = await client.error("resize", session_id="nope", cols=80, rows=24)
    assert error["code"] == -32002
    for bad in ({"cols": 0, "rows": 24}, {"cols": 80, "rows": 70000}, {"cols": "80", "rows": 1},
                {"cols": 80}):
        error = await client.error("resize", session_id=pipe["session_id"], **bad)
        assert error["code"] == -32602, bad
        error = await client.error("execute", command="true", pty=bad)
        assert error["code"] == -32602, bad
    await client.result("control", session_id=pipe["session_id"], type="CANCEL")
    term = await start(client, ["true"])
    await term.wait()
    error = await client.error("resize", session_id=term.id, cols=80, rows=24)
    assert error["code"] == -32004 and error["data"]["status"] == "exited"
    info = await client.result("server.info")
    assert {"pty", "resize"} <= set(info["capabilities"])


async def test_no_fd_or_process_leak(server: Server, connect: Connect, tmp_path: Any) -> None:
    client = await connect(server)
    await (await start(client, ["true"])).wait()  # warm up lazily opened fds (epoll, wakeup)
    before = open_fds()
    broken = tmp_path / "broken"
    broken.write_text("#!/no/such/interpreter\n")
    broken.chmod(0o755)
    error = await client.error("execute", command=[str(broken)], pty={"cols": 80, "rows": 24})
    assert error["code"] == -32005  # exec failed after openpty: both ends closed again
    assert open_fds() <= before
    pids = []
    for command in (["true"], [SH, "-c", "echo hi; exit 3"], ["sleep", "30"]):
        term = await start(client, command)
        pids.append(term.pid)
        if command[0] == "sleep":
            await client.result("control", session_id=term.id, type="CANCEL")
        await term.wait()
    await wait_for(lambda: open_fds() <= before, timeout=5)
    assert all(session_pids(pid) == {} for pid in pids)


async def test_client_library_pty(server: Server) -> None:
    from ccx.client import Output, connect

    code = "import os\nprint('size', *os.get_terminal_size())\nprint('got', input())\n"
    async with connect(f"ws://127.0.0.1:{server.port}/ws") as remote:
        session = await remote.execute(py(code), pty={"cols": 90, "rows": 25})
        seen = b""
        async for event in session.events():
            if isinstance(event, Output):
                assert event.stream == "pty"
                seen += event.data
                if b"size 90 25\r\n" in seen:
                    break
        assert await session.resize(91, 26) == {"session_id": session.id, "cols": 91,
                                                "rows": 26}
        assert await session.send("hey\r") == 4
        result = await session.wait()
        assert (result.status, result.exit_code) == ("exited", 0)
        assert (await remote.status(session.id))["pty"] == {"cols": 91, "rows": 26}
