"""The real Claude Code CLI through the `ccx` command, as a person runs it: `ccx run` (print
mode, a failing run, a connection killed and `ccx attach`), and `ccx run --tty -- claude` typed
at in a real terminal (tmux, as in tests/test_pty_cli.py).

Rules: see tests/e2e/conftest.py; a real `ccx serve` process (port 0), SIGTERMed at the end
and checked to exit 0; waits are on the mock's recorded requests, on output and on the screen.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from test_cli import CCX, ServeProcess, ccx
from test_pty_cli import TMUX, Tmux

from .conftest import Claude
from .helpers import events, marked, result_event, unique
from .mock_anthropic import MockAnthropic, Reply

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
RUN_S = 120  # Claude Code starts in 1-2 s; this is for a 2-core machine with both cores busy


def ccx_run(serve: ServeProcess, claude: Claude, *argv: str,
            **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([CCX, "run", "--cwd", str(claude.work), *claude.env_flags(), "--",
                           *argv], env=serve.env(), capture_output=True, timeout=RUN_S, **kw)


def story(stdout: bytes) -> list[tuple[str, str, str]]:
    """What a stream-json run said, without its ids and timings: each event's type and
    subtype, and the text or tool call or tool output it carried."""
    told = []
    for event in events(stdout):
        blocks = event.get("message", {}).get("content", []) if "message" in event else []
        said = [b.get("text") or b.get("input", {}).get("command") or str(b.get("content"))
                for b in blocks if isinstance(b, dict)]
        told.append((event["type"], event.get("subtype", ""),
                     event.get("result", "") + "|".join(said)))
    return told


def test_ccx_run_print_mode(claude: Claude, mock: MockAnthropic, serve: ServeProcess) -> None:
    marker = mock.script(unique("run"), Reply.say("Hello from `ccx run`."))
    done = ccx_run(serve, claude, *claude.print_argv(f"Hello. {marker}"))
    assert done.returncode == 0, done.stderr
    assert result_event(done.stdout)["result"] == "Hello from `ccx run`."
    [info] = json.loads(ccx(serve, "ps", "--json").stdout)
    assert (info["status"], info["exit_code"]) == ("exited", 0)


def test_ccx_run_exits_with_claudes_exit_code(claude: Claude, mock: MockAnthropic,
                                              serve: ServeProcess) -> None:
    marker = mock.script(unique("fail"), Reply.error(400, "scripted refusal"))
    argv = claude.print_argv(f"Fail. {marker}")
    direct = subprocess.run(argv, cwd=claude.work, env={**os.environ, **claude.env},
                            capture_output=True, timeout=RUN_S)
    assert direct.returncode != 0  # the reference: Claude Code run without ccx
    done = ccx_run(serve, claude, *argv)
    assert done.returncode == direct.returncode, done.stderr
    result = result_event(done.stdout)
    assert result["is_error"] is True and "scripted refusal" in result["result"]


def test_ccx_attach_after_the_run_was_killed(claude: Claude, mock: MockAnthropic,
                                             serve: ServeProcess, tmp_path: Path) -> None:
    release = claude.work / "release"
    command = f"echo waiting; while [ ! -e {release} ]; do sleep 0.05; done; echo released"
    marker = mock.script(unique("attach"), Reply.bash(command, then="Still here after SIGKILL."))
    first_out = tmp_path / "first.out"
    with first_out.open("wb") as sink:
        run = subprocess.Popen([CCX, "run", "--linger", "120", "--tag", marker, "--cwd",
                                str(claude.work), *claude.env_flags(), "--",
                                *claude.print_argv(f"Wait. {marker}")],
                               env=serve.env(), stdout=sink, stderr=subprocess.PIPE)
        try:
            mock.wait_for(lambda rs: any(r.reply == f"bash:{marker}" for r in rs), RUN_S)
            deadline = time.monotonic() + RUN_S
            while b'"tool_use"' not in first_out.read_bytes():  # the client got that far
                assert time.monotonic() < deadline, first_out.read_bytes()
                time.sleep(0.05)
        finally:
            run.kill()  # no goodbye from the client; the session lingers
            run.communicate(timeout=30)
    release.touch()
    [info] = json.loads(ccx(serve, "ps", "--json", "--tag", marker).stdout)
    attached = ccx(serve, "attach", info["session_id"], timeout=RUN_S)
    assert attached.returncode == 0, attached.stderr
    first = first_out.read_bytes()
    assert attached.stdout.startswith(first)  # the replay: byte for byte what was shown
    assert len(attached.stdout) > len(first)
    assert result_event(attached.stdout)["result"] == "Still here after SIGKILL."
    [info] = json.loads(ccx(serve, "ps", "--json", "--tag", marker).stdout)
    assert info["stdout_bytes"] == len(attached.stdout)
    # A direct run (no ccx; the tool is not held back now) tells the same story: ids and
    # timings differ from run to run, the events and what they say do not.
    direct = subprocess.run(claude.print_argv(f"Wait. {marker}"), cwd=claude.work,
                            env={**os.environ, **claude.env}, capture_output=True, timeout=RUN_S)
    assert direct.returncode == 0, direct.stderr
    told = story(attached.stdout)
    assert told == story(direct.stdout)
    assert ("user", "", "waiting\nreleased") in told, told  # the tool's output, whole


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux): "
                    "interactive Claude Code needs a real terminal to be tested")
def test_interactive_claude_in_a_terminal(claude: Claude, mock: MockAnthropic,
                                          serve: ServeProcess, tmp_path: Path) -> None:
    marker = mock.script(unique("tty"), Reply.say("Hello, terminal person."))
    tmux = Tmux(tmp_path / "tmux.sock")
    script = tmp_path / "run.sh"
    flags = " ".join(shlex.quote(flag) for flag in claude.env_flags())
    script.write_text(
        f"CCX_URL={shlex.quote(serve.url)} {shlex.quote(CCX)} run --tty --tag {marker} "
        f"--cwd {shlex.quote(str(claude.work))} {flags} -- {shlex.quote(claude.bin)}\n"
        "echo EXIT=$?\n"
        "sleep 60\n")
    try:
        tmux("new-session", "-d", "-s", "ccx", "-x", "100", "-y", "30", f"sh {script}")
        tmux("set-option", "-t", "ccx", "status", "off")
        tmux.wait_for(r"shift\+tab", timeout=RUN_S)  # the prompt's status line: ready for keys
        tmux.keys(f"Say hello {marker}", "Enter")
        tmux.wait_for(r"● Hello, terminal person\.", timeout=RUN_S)
        tmux.keys("/exit")
        tmux.wait_for(r"❯ /exit", timeout=30)
        tmux.keys("Enter")
        tmux.wait_for(r"EXIT=0\n", timeout=RUN_S)
    finally:
        subprocess.run([*tmux.base, "kill-server"], capture_output=True, timeout=10)
    [info] = json.loads(ccx(serve, "ps", "--json", "--tag", marker).stdout)
    assert (info["status"], info["exit_code"]) == ("exited", 0)
    assert f"text:{marker}" in mock.replies()
    assert marked(claude.mark) == {}, "Claude Code left processes behind"


