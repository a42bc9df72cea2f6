"""`ccx run --tty` under a real terminal: tmux runs it, keys are sent, the pane is read.

Rules: as in test_cli (a real `ccx serve` on 127.0.0.1, port 0, SIGTERMed at the end and
checked to exit 0); tmux runs on a private socket in the test's tmp dir with no config file,
and is killed at the end. Skipped, saying why, when tmux is not installed (`.ci/run` installs
it when apt-get can).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import CCX, PY, ServeProcess, ccx, start_serve, stop_serve

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install "
                                "tmux): `ccx run --tty` needs a real terminal to be tested")


class Tmux:
    """One detached tmux session on a private server socket."""

    def __init__(self, socket: Path) -> None:
        assert TMUX is not None
        self.base = [TMUX, "-S", str(socket), "-f", "/dev/null"]

    def __call__(self, *args: str) -> str:
        done = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def pane(self) -> str:
        return self("capture-pane", "-p", "-J", "-S", "-200", "-t", "ccx")

    def size(self) -> tuple[int, int]:
        cols, rows = self("display-message", "-p", "-t", "ccx",
                          "#{pane_width} #{pane_height}").split()
        return int(cols), int(rows)

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.pane())
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} never showed; pane:\n{self.pane()}")
            time.sleep(0.05)

    def keys(self, *keys: str) -> None:
        self("send-keys", "-t", "ccx", *keys)


@pytest.fixture
def serve() -> Iterator[ServeProcess]:
    server = start_serve("--kill-grace", "1")
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            stop_serve(server)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    terminal = Tmux(tmp_path / "tmux.sock")
    try:
        yield terminal
    finally:
        subprocess.run([*terminal.base, "kill-server"], capture_output=True, timeout=10)


def test_ccx_run_tty_python_repl_in_tmux(serve: ServeProcess, tmux: Tmux,
                                         tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text(
        f"CCX_URL={shlex.quote(serve.url)} {shlex.quote(CCX)} run --tty -- "
        f"{shlex.quote(PY)} -i -q\n"
        "echo EXIT=$?\n"
        "stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo "
        "| tr '\\n' ' '; echo ':MODES'\n"
        "sleep 60\n")
    tmux("new-session", "-d", "-s", "ccx", "-x", "100", "-y", "30", f"sh {script}")
    tmux("set-option", "-t", "ccx", "status", "off")
    tmux.wait_for(">>> ")
    size = "import os; print('size', *os.get_terminal_size())"
    tmux.keys(size, "Enter")
    cols, rows = tmux.size()
    tmux.wait_for(rf"size {cols} {rows}\n")

    tmux("resize-window", "-t", "ccx", "-x", "120", "-y", "40")
    assert tmux.size() == (120, 40)
    for _ in range(20):  # SIGWINCH -> resize races the keys typed next; try again briefly
        tmux("clear-history", "-t", "ccx")
        tmux.keys("C-l", size, "Enter")
        tmux.wait_for(r"size \d+ \d+\n")
        if re.search(r"size 120 40\n", tmux.pane()):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the remote never saw 120x40:\n{tmux.pane()}")

    tmux.keys("import time; time.sleep(30)", "Enter")
    time.sleep(0.3)
    tmux.keys("C-c")  # a keystroke for the remote REPL, not a signal for the local ccx
    tmux.wait_for(r"KeyboardInterrupt\n>>> ", timeout=5)
    # Python exits by SIGINT if the last statement was interrupted: run one more first.
    tmux.keys("print('after', 6 * 7)", "Enter")
    tmux.wait_for(r"after 42\n")
    tmux.keys("C-d")
    tmux.wait_for(r"EXIT=0\n")
    modes = tmux.wait_for(r"(.*):MODES").group(1).split()
    assert "icanon" in modes and "echo" in modes, modes  # the terminal is cooked again


def test_ccx_run_tty_passes_exit_code_and_restores_terminal_on_error(
        serve: ServeProcess, tmux: Tmux, tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text(
        f"export CCX_URL={shlex.quote(serve.url)}\n"
        f"{shlex.quote(CCX)} run --tty -- sh -c 'test -t 0 && test -t 1 && exit 7'\n"
        "echo FIRST=$?\n"
        f"{shlex.quote(CCX)} run --tty --tag pty-cli -- sleep 30\n"
        "echo SECOND=$?\n"
        "stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon | tr '\\n' ' '; "
        "echo ':MODES'\n"
        "sleep 60\n")
    tmux("new-session", "-d", "-s", "ccx", "-x", "80", "-y", "24", f"sh {script}")
    tmux.wait_for(r"FIRST=7\n")
    deadline = time.monotonic() + 10
    while not (found := json.loads(ccx(serve, "ps", "--json", "--tag", "pty-cli").stdout)):
        assert time.monotonic() < deadline, "the second session never started"
        time.sleep(0.05)
    assert found[0]["pty"] == {"cols": 80, "rows": 24}
    assert ccx(serve, "cancel", found[0]["session_id"]).returncode == 0  # ends it remotely
    tmux.wait_for(r"SECOND=143\n")  # 128 + SIGTERM; the terminal was raw until then
    assert "icanon" in tmux.wait_for(r"(.*):MODES").group(1).split()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def test_ccx_attach_takes_a_lingering_pty_session_over(serve: ServeProcess, tmux: Tmux,
                                                       tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text(f"CCX_URL={shlex.quote(serve.url)} exec {shlex.quote(CCX)} run --tty "
                      f"--linger 30 --tag pty-attach -- {shlex.quote(PY)} -i -q\n")
    tmux("new-session", "-d", "-s", "ccx", "-x", "80", "-y", "24", f"sh {script}")
    tmux.wait_for(">>> ")
    tmux.keys("x = 6 * 7", "Enter")
    tmux.wait_for(">>> .*\n>>> ")
    client = int(tmux("display-message", "-p", "-t", "ccx", "#{pane_pid}"))
    assert _children(client) == [] and "ccx" in Path(f"/proc/{client}/cmdline").read_text()
    os.kill(client, signal.SIGKILL)  # the connection drops; the session lingers
    [info] = json.loads(ccx(serve, "ps", "--json", "--tag", "pty-attach").stdout)
    script.write_text(f"CCX_URL={shlex.quote(serve.url)} {shlex.quote(CCX)} attach "
                      f"{info['session_id']}\necho EXIT=$?\nsleep 60\n")
    subprocess.run([*tmux.base, "kill-server"], capture_output=True, timeout=10)  # if alive
    tmux("new-session", "-d", "-s", "ccx", "-x", "90", "-y", "20", f"sh {script}")
    tmux.wait_for(r"x = 6 \* 7\n")  # the replay of what the first terminal showed
    tmux.keys("print(x, *__import__('os').get_terminal_size())", "Enter")
    tmux.wait_for(r"\n42 90 20\n")  # same interpreter, resized to the new terminal
    tmux.keys("C-d")
    tmux.wait_for(r"EXIT=0\n")


def test_ccx_run_tty_restores_terminal_when_the_server_dies(tmux: Tmux, tmp_path: Path) -> None:
    server = start_serve("--kill-grace", "1")
    try:
        script = tmp_path / "run.sh"
        script.write_text(
            f"CCX_URL={shlex.quote(server.url)} {shlex.quote(CCX)} run --tty -- "
            f"{shlex.quote(PY)} -c \"print('remote-' + 'up'); import time; time.sleep(30)\"\n"
            "echo CODE=$?\n"
            "stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon | tr '\\n' ' '; "
            "echo ':MODES'\n"
            "sleep 60\n")
        tmux("new-session", "-d", "-s", "ccx", "-x", "80", "-y", "24", f"sh {script}")
        tmux.wait_for("remote-up")
    finally:
        server.proc.kill()  # no goodbye: the connection just breaks (the PTY hangs up too)
        server.proc.communicate(timeout=10)
    code = int(tmux.wait_for(r"CODE=(\d+)\n").group(1))
    assert code != 0
    assert "icanon" in tmux.wait_for(r"(.*):MODES").group(1).split()
