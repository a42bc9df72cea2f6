"""The `ccx` command as users run it: a real `ccx serve` process and `ccx run/ps/...` processes.

Rules: servers bind 127.0.0.1 on port 0 (the port is read from the "listening" log line);
every test has a deadline; the server fixture SIGTERMs the server and checks it exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CCX = str(Path(sys.executable).with_name("ccx"))
PY = sys.executable


class ServeProcess:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/ws"

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "CCX_URL": self.url, **extra}


def start_serve(*args: str, env: dict[str, str] | None = None) -> ServeProcess:
    proc = subprocess.Popen(
        [CCX, "serve", "--port", "0", *args], stderr=subprocess.PIPE,
        env={**os.environ, "CCX_LOG_FORMAT": "json", **(env or {})},
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        event = json.loads(line)
        if event.get("event") == "listening":
            return ServeProcess(proc, int(event["port"]))
    proc.kill()
    raise AssertionError("ccx serve did not start")


def stop_serve(server: ServeProcess) -> list[dict[str, object]]:
    server.proc.send_signal(signal.SIGTERM)
    _, err = server.proc.communicate(timeout=15)
    assert server.proc.returncode == 0, err
    return [json.loads(line) for line in err.splitlines() if line.strip()]


@pytest.fixture
def serve() -> Iterator[ServeProcess]:
    server = start_serve("--kill-grace", "1")
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            stop_serve(server)


def ccx(server: ServeProcess, *args: str, input: bytes | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([CCX, *args], env=server.env(), input=input, capture_output=True,
                          timeout=timeout)


def test_run_streams_byte_exact_and_passes_exit_code(serve: ServeProcess) -> None:
    code = "import sys; sys.stdout.buffer.write(bytes(range(256))*100); sys.stderr.write('e'); sys.exit(5)"
    done = ccx(serve, "run", "--", PY, "-c", code)
    assert done.stdout == bytes(range(256)) * 100
    assert done.stderr == b"e"
    assert done.returncode == 5


def test_run_forwards_piped_stdin(serve: ServeProcess) -> None:
    done = ccx(serve, "run", "--", "cat", input=b"hi\n" * 1000)
    assert done.stdout == b"hi\n" * 1000 and done.returncode == 0


def test_run_pipe_is_exact(serve: ServeProcess) -> None:
    done = subprocess.run(f"{CCX} run -- seq 1 1000000 | tail -1", shell=True,
                          env=serve.env(), capture_output=True, timeout=60)
    assert done.stdout == b"1000000\n"


def test_run_into_closed_pipe_cancels_quietly(serve: ServeProcess) -> None:
    done = subprocess.run(f"{CCX} run -- yes | head -1", shell=True, env=serve.env(),
                          capture_output=True, timeout=30)
    assert done.stdout == b"y\n"
    assert b"Traceback" not in done.stderr
    listing = json.loads(ccx(serve, "ps", "--json").stdout)
    deadline = time.monotonic() + 10
    while any(s["status"] in ("running", "cancelling") for s in listing):
        assert time.monotonic() < deadline, listing
        time.sleep(0.1)
        listing = json.loads(ccx(serve, "ps", "--json").stdout)
    assert [s["status"] for s in listing] == ["cancelled"]


def test_run_signal_and_timeout_exit_codes(serve: ServeProcess) -> None:
    killed = ccx(serve, "run", "--", PY, "-c", "import os, signal; os.kill(os.getpid(), 9)")
    assert killed.returncode == 128 + 9
    timed_out = ccx(serve, "run", "--timeout", "0.5", "--", "sleep", "30")
    assert timed_out.returncode == 124


def test_ctrl_c_cancels_remote_session(serve: ServeProcess) -> None:
    proc = subprocess.Popen([CCX, "run", "--", "sh", "-c", "echo ready; sleep 100 & wait"],
                            env=serve.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    pid = json.loads(ccx(serve, "ps", "--json").stdout)[0]["pgid"]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=15)
    assert proc.returncode == 130
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, "remote group survived Ctrl-C"
        time.sleep(0.05)


@pytest.mark.parametrize("on_term", ["dies", "exits_0"])
def test_run_reports_a_cancel_from_elsewhere(serve: ServeProcess, on_term: str) -> None:
    """Regression: `ccx run` printed nothing when its session was cancelled by someone else
    (`ccx cancel`, drain, shutdown), and exited 0 when the job trapped SIGTERM and exited 0.
    Now: one status line on stderr and exit 128 + the signal (143 without one)."""
    trap = "trap 'exit 0' TERM; " if on_term == "exits_0" else ""
    proc = subprocess.Popen([CCX, "run", "--", "sh", "-c", f"{trap}echo ready; sleep 100 & wait"],
                            env=serve.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"ready\n"
    sid = json.loads(ccx(serve, "ps", "--json").stdout)[0]["session_id"]
    assert ccx(serve, "cancel", sid).stdout == b"cancelling\n"
    proc.wait(timeout=15)
    stderr = proc.stderr.read().decode()
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, stderr)
    assert f"ccx: session {sid} was cancelled" in stderr, stderr
    ending = "ended by SIGTERM" if on_term == "dies" else "exited with 0"
    assert ending in stderr and len(stderr.splitlines()) == 1, stderr


def test_ps_status_pause_resume_cancel(serve: ServeProcess) -> None:
    proc = subprocess.Popen([CCX, "run", "--", "sleep", "100"], env=serve.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (listing := json.loads(ccx(serve, "ps", "--json").stdout)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        sid = listing[0]["session_id"]
        assert ccx(serve, "pause", sid).stdout == b"paused\n"
        assert json.loads(ccx(serve, "status", sid, "--json").stdout)["status"] == "paused"
        assert ccx(serve, "resume", sid).stdout == b"running\n"
        table = ccx(serve, "ps").stdout.decode()
        assert sid in table and "sleep 100" in table
        assert ccx(serve, "cancel", sid).stdout == b"cancelling\n"
        proc.wait(timeout=10)
        assert ccx(serve, "status", "nope").returncode == 1
    finally:
        proc.kill()


def test_health(serve: ServeProcess) -> None:
    done = ccx(serve, "health")
    assert done.returncode == 0 and json.loads(done.stdout)["status"] == "ok"
    unreachable = subprocess.run([CCX, "health", "--url", "ws://127.0.0.1:1/ws"],
                                 capture_output=True, timeout=10)
    assert unreachable.returncode != 0


def test_serve_sigterm_cancels_sessions_and_exits_zero() -> None:
    server = start_serve("--kill-grace", "1")
    proc = subprocess.Popen(
        [CCX, "run", "--", PY, "-c",
         "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('ready', flush=True); time.sleep(100)"],
        env=server.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    pgid = json.loads(ccx(server, "ps", "--json").stdout)[0]["pgid"]
    started = time.monotonic()
    events = stop_serve(server)
    assert time.monotonic() - started < 1 + 2  # kill_grace + 2 s
    assert not os.path.exists(f"/proc/{pgid}")
    proc.wait(timeout=10)
    assert proc.returncode != 0  # the run client saw its session cancelled
    assert proc.stderr is not None and b"cancelled (reason: shutdown)" in proc.stderr.read()
    completed = [e for e in events if e.get("event") == "completed"]
    assert completed and completed[0]["status"] == "cancelled"


def test_serve_refuses_public_bind_without_token() -> None:
    done = subprocess.run([CCX, "serve", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, timeout=15,
                          env={k: v for k, v in os.environ.items() if k != "CCX_TOKEN"})
    assert done.returncode == 2 and b"CCX_TOKEN" in done.stderr


def test_serve_help_lists_every_option() -> None:
    from ccx.config import OPTIONS

    text = subprocess.run([CCX, "serve", "--help"], capture_output=True, timeout=15).stdout
    for option in OPTIONS:
        assert option.env.encode() in text, option.env


def test_selftest_passes() -> None:
    done = subprocess.run([CCX, "selftest"], capture_output=True, timeout=60)
    lines = done.stdout.decode().splitlines()
    assert done.returncode == 0, done.stdout.decode()
    assert lines[-1].endswith("0 failed") and not any(li.startswith("FAIL") for li in lines)


def test_run_linger_survives_a_killed_client_and_attach_rejoins(serve: ServeProcess) -> None:
    """`ccx run --linger` outlives its terminal; `ccx attach` gets every byte and the exit code."""
    code = ("import sys, time\nfor i in range(30):\n    print(i, flush=True)\n"
            "    time.sleep(0.05)\nsys.exit(3)")
    run = subprocess.Popen([CCX, "run", "--linger", "60", "--tag", "job1", "--", PY, "-c", code],
                           env=serve.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert run.stdout is not None
    assert run.stdout.readline() == b"0\n"
    run.kill()  # the terminal is gone, without a word to the server
    run.wait(timeout=10)
    listed = json.loads(ccx(serve, "ps", "--tag", "job1", "--json").stdout)
    assert [s["tag"] for s in listed] == ["job1"]
    assert ccx(serve, "ps", "--tag", "nope", "--json").stdout.strip() == b"[]"
    done = ccx(serve, "attach", listed[0]["session_id"])
    assert done.stdout == b"".join(b"%d\n" % i for i in range(30)), done.stderr
    assert done.returncode == 3
    again = ccx(serve, "attach", listed[0]["session_id"])  # an ended session, attached again
    assert again.returncode == 3 and again.stdout == done.stdout


def test_attach_unknown_session(serve: ServeProcess) -> None:
    done = ccx(serve, "attach", "nope")
    assert done.returncode == 1
    assert done.stderr == b"ccx attach: unknown session: nope\n"


def test_drain_wait_timeout_undo_and_ps_node_column() -> None:
    server = start_serve("--kill-grace", "1", env={"CCX_NODE_NAME": "ccx-3"})
    runner = subprocess.Popen([CCX, "run", "--", "sh", "-c", "echo ready; sleep 1000"],
                              env=server.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert runner.stdout is not None and runner.stdout.readline() == b"ready\n"
        table = ccx(server, "ps").stdout.decode().splitlines()
        assert table[0].startswith("NODE ") and table[1].startswith("ccx-3  ccx-3."), table
        done = ccx(server, "drain", "--wait", "--timeout", "1")
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert lines[0] == {"draining": True, "sessions": 1}
        assert lines[-1] == {"draining": True, "sessions": 0}
        runner.wait(timeout=15)  # its session was cancelled by the drain timeout
        refused = ccx(server, "run", "--", "true")
        assert refused.returncode != 0 and b"draining" in refused.stderr, refused.stderr
        undone = ccx(server, "drain", "--undo")
        assert json.loads(undone.stdout) == {"draining": False, "sessions": 0}
        assert ccx(server, "run", "--", "true").returncode == 0
        assert ccx(server, "drain", "--undo", "--wait").returncode == 2
    finally:
        if runner.poll() is None:
            runner.kill()
        stop_serve(server)




def test_drain_wait_stops_when_the_drain_is_undone() -> None:
    # Regression: `--wait` polled with `drain {}`, which drains again: an operator's
    # `ccx drain --undo` meanwhile was silently reverted and the wait went on. It now polls
    # without side effects, and stops (exit 1, saying why) once the node no longer drains.
    server = start_serve("--kill-grace", "1")
    runner = subprocess.Popen([CCX, "run", "--", "sh", "-c", "echo ready; sleep 1000"],
                              env=server.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    waiter = None
    try:
        assert runner.stdout is not None and runner.stdout.readline() == b"ready\n"
        waiter = subprocess.Popen([CCX, "drain", "--wait"], env=server.env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert waiter.stdout is not None
        assert json.loads(waiter.stdout.readline()) == {"draining": True, "sessions": 1}
        undone = ccx(server, "drain", "--undo")
        assert json.loads(undone.stdout) == {"draining": False, "sessions": 1}
        _, err = waiter.communicate(timeout=30)
        assert waiter.returncode == 1, err
        assert b"no longer draining" in err, err
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/ready",
                                    timeout=10) as ready:  # the undo held
            assert json.loads(ready.read()) == {"ready": True}
        assert ccx(server, "run", "--", "true").returncode == 0
    finally:
        for proc in (runner, waiter):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=15)
        stop_serve(server)


ENDLESS = "import sys\nwhile True: sys.stdout.buffer.write(b'y' * 65536)"
STALL_BOUND = 64 << 20  # held by the server (8 MiB), both socket buffers, the client (4 MiB)


def _run_into_a_stalled_pipe(server: ServeProcess) -> tuple[subprocess.Popen[bytes], str]:
    """`ccx run` of an endless writer, its stdout a pipe nobody reads; return it and the
    session id once the child stands still (ccx's own count stops moving below the bound)."""
    runner = subprocess.Popen([CCX, "run", "--", PY, "-c", ENDLESS], env=server.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    rows: list[bytes] = []
    while len(rows) < 2:  # the header and its session
        assert time.monotonic() < deadline and runner.poll() is None
        rows = ccx(server, "ps").stdout.splitlines()
    sid = rows[1].split()[0].decode()
    seen = -1
    while True:  # until the child stands still (nobody reads: it must, soon)
        assert time.monotonic() < deadline, f"still growing: {seen} bytes"
        status = json.loads(ccx(server, "status", "--json", sid).stdout)
        assert status["status"] == "running", status
        assert status["stdout_bytes"] < STALL_BOUND, status
        if status["stdout_bytes"] == seen:
            return runner, sid
        seen = status["stdout_bytes"]
        time.sleep(1.0)  # a second of no progress at all, between two ccx reads


def test_run_into_a_stalled_pipe_throttles_the_child(serve: ServeProcess) -> None:
    # `ccx run ... | consumer` where the consumer stops reading: the client must stop reading
    # the connection (bounded buffering), so the server's send blocks and the child is
    # throttled, as with any slow client (PROTOCOL.md 8). A client that buffers everything
    # lets the child run on and its own memory grow without bound.
    runner, _ = _run_into_a_stalled_pipe(serve)
    runner.kill()
    runner.wait(timeout=15)


def test_drain_wait_exits_1_when_a_session_is_still_busy_at_the_deadline(
        serve: ServeProcess) -> None:
    # An owner that stopped reading keeps its session busy after the drain timeout cancels
    # it: its completion is still owed. `--wait` then gives up at T + kill grace + margin and
    # says so (exit 1), as a preStop hook needs.
    runner, _ = _run_into_a_stalled_pipe(serve)
    try:
        done = ccx(serve, "drain", "--wait", "--timeout", "0.5")
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert b"1 sessions still live at the deadline" in done.stderr, done.stderr
        assert json.loads(done.stdout.splitlines()[0]) == {"draining": True, "sessions": 1}
    finally:
        runner.kill()
        runner.wait(timeout=15)
