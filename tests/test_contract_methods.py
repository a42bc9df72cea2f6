"""Contract tests: PROTOCOL.md section 2 (native methods) and section 3 (notifications).

Written as an independent client checks the contract: a bare JSON-RPC client over a real
WebSocket, real child processes and real signals; nothing of ccx is mocked. Each test states
the part of the contract it checks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
from datetime import datetime
from typing import Any

import pytest
import trio
from conftest import (
    PY,
    RawClient,
    alive,
    completion,
    group_pids,
    join,
    proc_stat,
    py,
    session_events,
    start_ready,
    wait_for,
)

# A child that says "ready" once it runs, then sleeps (killed by CANCEL in the tests).
SLEEPER = py("import time; print('ready', flush=True); time.sleep(100)")
# A child that ignores SIGTERM (so only SIGKILL ends it), then says "ready".
TERM_IGNORER = py(
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(100)"
)
STATUS_FIELDS = {"session_id", "command", "pid", "pgid", "status", "started_at", "ended_at",
                 "exit_code", "signal", "stdout_bytes", "stderr_bytes"}
COMPLETED_FIELDS = {"session_id", "status", "exit_code", "signal", "duration_s",
                    "stdout_bytes", "stderr_bytes"}


def iso(value: str) -> datetime:
    assert isinstance(value, str), value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def assert_error(error: dict[str, Any], code: int) -> None:
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error


# ------------------------------------------------------------------------------ execute


async def test_execute_result_shape(client: RawClient) -> None:
    """Result {"session_id": str, "status": "started", "pid": int, "pgid": int}, pgid == pid."""
    result = await client.execute(["true"])
    assert isinstance(result["session_id"], str) and result["session_id"]
    assert result["status"] == "started"
    assert isinstance(result["pid"], int) and not isinstance(result["pid"], bool)
    assert result["pgid"] == result["pid"]
    _, completed = await client.run_to_completion(result["session_id"])
    assert completed["status"] == "exited"


async def test_execute_argv_array_is_used_as_is(client: RawClient) -> None:
    stdout, _, completed = await client.run(["printf", "%s|", "a b", "$HOME", "'q'", "x;y"])
    assert stdout == b"a b|$HOME|'q'|x;y|"
    assert completed["status"] == "exited" and completed["exit_code"] == 0


async def test_execute_string_is_split_like_posix_shell(client: RawClient) -> None:
    stdout, _, _ = await client.run("printf '%s|' 'a b' \"c d\" e\\ f g")
    assert stdout == b"a b|c d|e f|g|"


async def test_execute_string_runs_no_shell(client: RawClient) -> None:
    """No shell runs unless `shell` is true: `$HOME`, `;` and `>` reach argv literally."""
    stdout, _, completed = await client.run("echo $HOME; echo two > /dev/null")
    assert stdout == b"$HOME; echo two > /dev/null\n"
    assert completed["exit_code"] == 0


async def test_execute_command_string_shlex_argv_in_started(client: RawClient) -> None:
    """process.started carries the argv the string was split into."""
    started = await client.execute("printf '%s' 'one two'")
    events = await session_events(client, started["session_id"])
    first = events[0]
    assert first[0] == "process.started", events
    assert first[1]["command"] == ["printf", "%s", "one two"]


async def test_shell_refused_unless_allowed(client: RawClient) -> None:
    error = await client.error("execute", command="echo hi", shell=True)
    assert_error(error, -32001)
    sessions = await client.result("sessions")
    assert sessions["sessions"] == []


async def test_shell_runs_sh_c_when_allowed(start_server: Any, connect: Any) -> None:
    server = await start_server(allow_shell=True)
    client = await connect(server)
    stdout, _, completed = await client.run("echo $((1+2)) && echo ok; exit 4", shell=True)
    assert stdout == b"3\nok\n"
    assert completed["status"] == "exited" and completed["exit_code"] == 4


async def test_cwd_is_used(client: RawClient, tmp_path: Any) -> None:
    stdout, _, _ = await client.run(py("import os; print(os.getcwd())"), cwd=str(tmp_path))
    assert os.path.realpath(stdout.decode().strip()) == os.path.realpath(tmp_path)


async def test_cwd_missing_is_invalid_params(client: RawClient, tmp_path: Any) -> None:
    error = await client.error("execute", command=["true"], cwd=str(tmp_path / "missing"))
    assert_error(error, -32602)
    assert (await client.result("sessions"))["sessions"] == []


async def test_env_added_and_overridden(client: RawClient) -> None:
    code = ("import json, os; print(json.dumps({k: os.environ.get(k) for k in "
            "('CCX_TEST_ADDED', 'HOME', 'PATH')}))")
    stdout, _, _ = await client.run(py(code), env={"CCX_TEST_ADDED": "añadido €",
                                                   "HOME": "/override/home"})
    seen = json.loads(stdout)
    assert seen["CCX_TEST_ADDED"] == "añadido €"
    assert seen["HOME"] == "/override/home"
    assert seen["PATH"] == os.environ["PATH"]  # the rest of the environment is inherited


async def test_ccx_token_not_passed_to_children(start_server: Any, connect: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`CCX_TOKEN` is never passed to children (section 6)."""
    token = "s3cret-token-value"
    monkeypatch.setenv("CCX_TOKEN", token)
    server = await start_server(token=token)
    client = await connect(server, extra_headers=[(b"Authorization", f"Bearer {token}".encode())])
    stdout, _, _ = await client.run(py("import json, os; print(json.dumps(dict(os.environ)))"))
    env = json.loads(stdout)
    assert "CCX_TOKEN" not in env
    assert token not in json.dumps(env)


async def test_unknown_extra_params_are_ignored(client: RawClient) -> None:
    stdout, _, completed = await client.run(["echo", "x"], frobnicate=True, extra={"a": 1})
    assert stdout == b"x\n" and completed["status"] == "exited"
    pong = await client.result("ping", {"whatever": 1})
    assert pong["pong"] is True


async def test_timeout_ends_with_status_timeout_and_group_gone(client: RawClient) -> None:
    started = await client.execute(["sh", "-c", "sleep 100 & sleep 100; wait"], timeout=0.5)
    completed = await completion(client, started["session_id"])
    assert completed["status"] == "timeout"
    assert not (completed["status"] == "exited" and completed["exit_code"] == 0)
    assert group_pids(started["pgid"]) == {}
    status = await client.result("status", session_id=started["session_id"])
    assert status["status"] == "timeout"


async def test_timeout_child_exiting_0_on_term_is_still_timeout(client: RawClient) -> None:
    """A timed-out session is never reported as `exited` with code 0."""
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
            "print('ready', flush=True); time.sleep(100)")
    started = await client.execute(py(code), timeout=1.0)
    completed = await completion(client, started["session_id"])
    assert completed["status"] == "timeout", completed


async def test_timeout_uses_kill_grace_escalation(client: RawClient) -> None:
    """timeout: 'same escalation as CANCEL': a TERM-ignoring child is SIGKILLed after grace."""
    started = await client.execute(TERM_IGNORER, timeout=0.5, kill_grace=0.3)
    completed = await completion(client, started["session_id"])
    assert completed["status"] == "timeout"
    assert group_pids(started["pgid"]) == {}


# ------------------------------------------------------------------------------ stdin / input


async def test_stdin_input_utf8_base64_and_eof(client: RawClient) -> None:
    started = await client.execute(["cat"], stdin=True)
    sid = started["session_id"]
    first = await client.result("input", session_id=sid, data="hello ")
    assert first == {"session_id": sid, "bytes": 6}
    raw = "wörld €\n".encode()
    second = await client.result("input", session_id=sid, data=base64.b64encode(raw).decode(),
                                 encoding="base64")
    assert second == {"session_id": sid, "bytes": len(raw)}
    binary = bytes([0, 255, 10])
    third = await client.result("input", session_id=sid, data=base64.b64encode(binary).decode(),
                                encoding="base64", eof=True)
    assert third["bytes"] == 3
    outputs, completed = await client.run_to_completion(sid)
    assert completed["status"] == "exited" and completed["exit_code"] == 0
    assert completed["stdout_bytes"] == 6 + len(raw) + 3
    assert join(outputs, "stdout") == "hello wörld €\n\x00\ufffd\n".encode()


async def test_input_eof_with_empty_data_closes_stdin(client: RawClient) -> None:
    started = await client.execute(py("import sys; print(len(sys.stdin.read()))"), stdin=True)
    reply = await client.result("input", session_id=started["session_id"], data="", eof=True)
    assert reply["bytes"] == 0
    outputs, completed = await client.run_to_completion(started["session_id"])
    assert join(outputs, "stdout") == b"0\n" and completed["exit_code"] == 0


async def test_stdin_is_dev_null_by_default(client: RawClient) -> None:
    stdout, _, _ = await client.run(py(
        "import os, sys; print(os.readlink('/proc/self/fd/0')); print(repr(sys.stdin.read()))"))
    assert stdout == b"/dev/null\n''\n"


async def test_input_without_stdin_is_invalid_state(client: RawClient) -> None:
    started = await start_ready(client, SLEEPER)
    error = await client.error("input", session_id=started["session_id"], data="x")
    assert_error(error, -32004)
    await client.result("control", session_id=started["session_id"], type="CANCEL")
    await completion(client, started["session_id"])


async def test_input_after_eof_is_invalid_state(client: RawClient) -> None:
    # The child keeps running after its stdin closes, so only "stdin closed" can explain -32004.
    code = "import sys, time; sys.stdin.read(); print('eof', flush=True); time.sleep(100)"
    started = await client.execute(py(code), stdin=True)
    sid = started["session_id"]
    await client.result("input", session_id=sid, data="a", eof=True)
    with trio.fail_after(10):
        await client.notification("process.output", sid)
    assert_error(await client.error("input", session_id=sid, data="b"), -32004)
    await client.result("control", session_id=sid, type="CANCEL")
    await completion(client, sid)


async def test_input_from_another_connection(server: Any, client: RawClient,
                                             connect: Any) -> None:
    """Any connection may send input to any session by id; output goes to the owner only."""
    other = await connect(server)
    started = await client.execute(["cat"], stdin=True)
    sid = started["session_id"]
    reply = await other.result("input", session_id=sid, data="from other\n", eof=True)
    assert reply["bytes"] == 11
    outputs, completed = await client.run_to_completion(sid)
    assert join(outputs, "stdout") == b"from other\n"
    assert completed["status"] == "exited"
    await other.result("ping")
    assert other.notifications == []


# ------------------------------------------------------------------------------ encodings


async def test_utf8_character_split_across_reads(client: RawClient) -> None:
    """A multi-byte character split across reads is never corrupted (both streams)."""
    code = (
        "import sys, time\n"
        "o, e = sys.stdout.buffer, sys.stderr.buffer\n"
        "euro, smile = '€'.encode(), '😀'.encode()\n"
        "o.write(b'a' + euro[:1]); o.flush(); e.write(smile[:2]); e.flush(); time.sleep(0.1)\n"
        "o.write(euro[1:2]); o.flush(); e.write(smile[2:3]); e.flush(); time.sleep(0.1)\n"
        "o.write(euro[2:] + b'b'); o.flush(); e.write(smile[3:] + b'!'); e.flush()\n"
    )
    started = await client.execute(py(code))
    outputs, completed = await client.run_to_completion(started["session_id"])
    assert completed["status"] == "exited" and completed["exit_code"] == 0
    assert all("\ufffd" not in o["data"] for o in outputs), outputs
    assert join(outputs, "stdout").decode() == "a€b"
    assert join(outputs, "stderr").decode() == "😀!"
    assert completed["stdout_bytes"] == 5 and completed["stderr_bytes"] == 5


async def test_utf8_multibyte_across_chunk_boundaries(client: RawClient) -> None:
    """1 MiB of 3-byte characters: 64 KiB chunk limits fall inside characters."""
    count = 350_000  # 1.05 MB: not a multiple of 64 KiB, and 65536 is not a multiple of 3
    started = await client.execute(py(
        f"import sys; sys.stdout.buffer.write('€'.encode() * {count})"))
    outputs, completed = await client.run_to_completion(started["session_id"])
    assert [o["seq"] for o in outputs] == list(range(len(outputs)))
    text = "".join(o["data"] for o in outputs if o["stream"] == "stdout")
    assert text == "€" * count
    assert completed["stdout_bytes"] == 3 * count


async def test_invalid_utf8_bytes_become_replacement_character(client: RawClient) -> None:
    code = ("import sys; o = sys.stdout.buffer; "
            "o.write(b'a\\xffb\\xc3(c\\xed\\xa0\\x80d'); o.flush()")
    started = await client.execute(py(code))
    outputs, _ = await client.run_to_completion(started["session_id"])
    text = "".join(o["data"] for o in outputs)
    # Python's (WHATWG-conforming) decoder: one U+FFFD per maximal invalid subsequence.
    assert text == "a\ufffdb\ufffd(c\ufffd\ufffd\ufffdd", repr(text)


async def test_truncated_character_at_eof_becomes_replacement(client: RawClient) -> None:
    code = "import sys; o = sys.stdout.buffer; o.write('x€'.encode()[:-1]); o.flush()"
    started = await client.execute(py(code))
    outputs, completed = await client.run_to_completion(started["session_id"])
    text = "".join(o["data"] for o in outputs)
    assert text.startswith("x\ufffd") and set(text[1:]) == {"\ufffd"}, repr(text)
    assert completed["stdout_bytes"] == 3


async def test_base64_two_mib_random_bytes_exact(client: RawClient) -> None:
    code = ("import hashlib, os, sys; data = os.urandom(2 * 1024 * 1024); "
            "sys.stdout.buffer.write(data); sys.stdout.flush(); "
            "sys.stderr.write(hashlib.sha256(data).hexdigest())")
    started = await client.execute(py(code), encoding="base64")
    outputs, completed = await client.run_to_completion(started["session_id"])
    assert [o["seq"] for o in outputs] == list(range(len(outputs)))
    assert all(o["encoding"] == "base64" for o in outputs)
    for o in outputs:
        assert len(base64.b64decode(o["data"], validate=True)) <= 64 * 1024
    stdout = join(outputs, "stdout")
    assert len(stdout) == 2 * 1024 * 1024
    assert hashlib.sha256(stdout).hexdigest() == join(outputs, "stderr").decode()
    assert completed["stdout_bytes"] == 2 * 1024 * 1024
    assert completed["stderr_bytes"] == 64


async def test_base64_carries_invalid_utf8_exactly(client: RawClient) -> None:
    raw = b"\xff\x00\xe2\x82" + bytes(range(256))
    started = await client.execute(py(
        f"import sys; sys.stdout.buffer.write({raw!r})"), encoding="base64")
    outputs, _ = await client.run_to_completion(started["session_id"])
    assert join(outputs, "stdout") == raw


async def test_seq_contiguous_from_zero_across_both_streams(client: RawClient) -> None:
    code = (
        "import sys, time\n"
        "for i in range(40):\n"
        "    s = sys.stdout if i % 2 == 0 else sys.stderr\n"
        "    s.write(f'{i}\\n'); s.flush(); time.sleep(0.005)\n"
    )
    started = await client.execute(py(code))
    outputs, completed = await client.run_to_completion(started["session_id"])
    assert [o["seq"] for o in outputs] == list(range(len(outputs)))
    assert {o["stream"] for o in outputs} == {"stdout", "stderr"}
    assert join(outputs, "stdout") == "".join(f"{i}\n" for i in range(0, 40, 2)).encode()
    assert join(outputs, "stderr") == "".join(f"{i}\n" for i in range(1, 40, 2)).encode()
    assert completed["exit_code"] == 0


@pytest.mark.parametrize("encoding", ["utf-8", "base64"])
async def test_each_chunk_at_most_64_kib_raw(client: RawClient, encoding: str) -> None:
    code = ("import sys; sys.stdout.buffer.write(b'o' * 1_000_000); sys.stdout.flush(); "
            "sys.stderr.buffer.write('é'.encode() * 300_000)")
    started = await client.execute(py(code), encoding=encoding)
    outputs, completed = await client.run_to_completion(started["session_id"])
    for o in outputs:
        raw = base64.b64decode(o["data"]) if encoding == "base64" else o["data"].encode()
        assert len(raw) <= 64 * 1024, (o["seq"], len(raw))
    assert join(outputs, "stdout") == b"o" * 1_000_000
    assert join(outputs, "stderr") == "é".encode() * 300_000
    assert completed["stdout_bytes"] == 1_000_000 and completed["stderr_bytes"] == 600_000


# ------------------------------------------------------------------------------ kill_grace


async def test_kill_grace_per_session_param(start_server: Any, connect: Any) -> None:
    """kill_grace (param) overrides CCX_KILL_GRACE: a TERM-ignoring child is SIGKILLed after
    ~0.5 s, although the server's grace is 20 s."""
    server = await start_server(kill_grace=20.0)
    client = await connect(server)
    started = await start_ready(client, TERM_IGNORER, kill_grace=0.5)
    begin = trio.current_time()
    reply = await client.result("control", session_id=started["session_id"], type="CANCEL")
    assert reply["status"] == "cancelling"
    completed = await completion(client, started["session_id"], timeout=10)
    elapsed = trio.current_time() - begin
    assert completed["status"] == "cancelled"
    assert elapsed >= 0.4, f"SIGKILL came before the grace ran out ({elapsed:.2f}s)"
    assert not alive(started["pid"])


async def test_kill_grace_zero_kills_at_once(client: RawClient) -> None:
    started = await start_ready(client, TERM_IGNORER, kill_grace=0)
    await client.result("control", session_id=started["session_id"], type="CANCEL")
    completed = await completion(client, started["session_id"], timeout=10)
    assert completed["status"] == "cancelled"
    assert group_pids(started["pgid"]) == {}


# ------------------------------------------------------------------------------ control


async def test_pause_resume_cancel_and_their_idempotency(client: RawClient) -> None:
    code = ("import itertools, time\nprint('ready', flush=True)\n"
            "for i in itertools.count():\n    print(i, flush=True); time.sleep(0.02)\n")
    started = await start_ready(client, py(code))
    sid, pid = started["session_id"], started["pid"]

    assert await client.result("control", session_id=sid, type="PAUSE") == \
        {"session_id": sid, "status": "paused"}
    await wait_for(lambda: (proc_stat(pid) or ("?",))[0] == "T", timeout=3)
    assert await client.result("control", session_id=sid, type="PAUSE") == \
        {"session_id": sid, "status": "paused"}
    assert (await client.result("status", session_id=sid))["status"] == "paused"

    assert await client.result("control", session_id=sid, type="RESUME") == \
        {"session_id": sid, "status": "running"}
    await wait_for(lambda: (proc_stat(pid) or ("T",))[0] != "T", timeout=3)
    assert await client.result("control", session_id=sid, type="RESUME") == \
        {"session_id": sid, "status": "running"}
    assert (await client.result("status", session_id=sid))["status"] == "running"

    assert await client.result("control", session_id=sid, type="CANCEL") == \
        {"session_id": sid, "status": "cancelling"}
    again = await client.result("control", session_id=sid, type="CANCEL")
    assert again["session_id"] == sid and again["status"] in ("cancelling", "cancelled")

    events = await session_events(client, sid)
    lifecycle = [m for m, _ in events if m not in ("process.output", "process.started")]
    # Pause of a paused session and resume of a running one are no-ops: no extra notification.
    assert lifecycle == ["process.paused", "process.resumed", "process.completed"], lifecycle
    paused = next(params for method, params in events if method == "process.paused")
    assert paused == {"session_id": sid}
    assert events[-1][1]["status"] == "cancelled"
    assert group_pids(started["pgid"]) == {}


async def test_control_type_is_case_insensitive(client: RawClient) -> None:
    started = await start_ready(client, SLEEPER)
    sid = started["session_id"]
    assert (await client.result("control", session_id=sid, type="pause"))["status"] == "paused"
    assert (await client.result("control", session_id=sid, type="Resume"))["status"] == "running"
    assert (await client.result("control", session_id=sid, type="cAnCeL"))["status"] == \
        "cancelling"
    assert (await completion(client, sid))["status"] == "cancelled"


async def test_control_session_id_omitted_when_one_owned(client: RawClient) -> None:
    started = await start_ready(client, SLEEPER)
    sid = started["session_id"]
    assert await client.result("control", type="PAUSE") == {"session_id": sid, "status": "paused"}
    assert await client.result("control", type="RESUME") == {"session_id": sid,
                                                              "status": "running"}
    assert await client.result("control", type="CANCEL") == {"session_id": sid,
                                                             "status": "cancelling"}
    assert (await completion(client, sid))["status"] == "cancelled"


async def test_control_session_id_omitted_is_refused_when_ambiguous(
    server: Any, client: RawClient, connect: Any
) -> None:
    """With two live sessions (or none) the omission cannot be resolved: an error, and
    neither session is touched. (The contract names no code for this; we only check it is
    an error.)"""
    a = await start_ready(client, SLEEPER)
    b = await start_ready(client, SLEEPER)
    reply = await client.request("control", type="PAUSE")
    assert "error" in reply, reply
    other = await connect(server)  # owns nothing: omitting the id cannot reach client's
    reply = await other.request("control", type="CANCEL")
    assert "error" in reply, reply
    for started in (a, b):
        status = await client.result("status", session_id=started["session_id"])
        assert status["status"] == "running"
        await client.result("control", session_id=started["session_id"], type="CANCEL")
        await completion(client, started["session_id"])
    reply = await client.request("control", type="PAUSE")  # owns no live session now
    assert "error" in reply, reply


async def test_cancel_of_ended_session_returns_its_final_status(client: RawClient) -> None:
    started = await client.execute(["sh", "-c", "exit 7"])
    sid = started["session_id"]
    completed = await completion(client, sid)
    assert completed["status"] == "exited" and completed["exit_code"] == 7
    assert await client.result("control", session_id=sid, type="CANCEL") == \
        {"session_id": sid, "status": "exited"}
    # and it stays ended: no second completion
    await client.result("ping")
    assert [m for m in client.notifications if m["params"].get("session_id") == sid
            and m["method"] == "process.completed"] == []


async def test_cancel_of_cancelled_session_returns_cancelled(client: RawClient) -> None:
    started = await start_ready(client, SLEEPER)
    sid = started["session_id"]
    await client.result("control", session_id=sid, type="CANCEL")
    await completion(client, sid)
    assert await client.result("control", session_id=sid, type="CANCEL") == \
        {"session_id": sid, "status": "cancelled"}


@pytest.mark.parametrize("kind", ["PAUSE", "RESUME"])
async def test_pause_resume_of_ended_session_is_invalid_state(client: RawClient,
                                                              kind: str) -> None:
    started = await client.execute(["true"])
    sid = started["session_id"]
    await completion(client, sid)
    error = await client.error("control", session_id=sid, type=kind)
    assert_error(error, -32004)
    assert error["data"]["status"] == "exited"


async def test_unknown_session_is_32002(client: RawClient) -> None:
    for method, params in [
        ("control", {"session_id": "no-such-session", "type": "PAUSE"}),
        ("control", {"session_id": "no-such-session", "type": "CANCEL"}),
        ("input", {"session_id": "no-such-session", "data": "x"}),
        ("status", {"session_id": "no-such-session"}),
    ]:
        assert_error(await client.error(method, params), -32002)


async def test_any_connection_controls_but_only_owner_is_notified(
    server: Any, client: RawClient, connect: Any
) -> None:
    other = await connect(server)
    started = await start_ready(client, SLEEPER)
    sid = started["session_id"]
    assert (await other.result("control", session_id=sid, type="PAUSE"))["status"] == "paused"
    assert (await other.result("status", session_id=sid))["status"] == "paused"
    assert (await other.result("control", session_id=sid, type="RESUME"))["status"] == "running"
    assert (await other.result("control", session_id=sid, type="CANCEL"))["status"] == \
        "cancelling"
    events = await session_events(client, sid)
    assert [m for m, _ in events if m not in ("process.output", "process.started")] == \
        ["process.paused", "process.resumed", "process.completed"]
    assert events[-1][1]["status"] == "cancelled"
    await other.result("ping")
    assert other.notifications == [], "only the owner receives notifications"


# ------------------------------------------------------------------------------ sessions, status


def check_info(info: dict[str, Any]) -> None:
    assert set(info) >= STATUS_FIELDS, STATUS_FIELDS - set(info)
    assert isinstance(info["session_id"], str)
    assert isinstance(info["command"], list) and all(isinstance(a, str) for a in info["command"])
    assert isinstance(info["pid"], int) and info["pgid"] == info["pid"]
    assert isinstance(info["status"], str)
    iso(info["started_at"])
    assert info["ended_at"] is None or isinstance(iso(info["ended_at"]), datetime)
    assert info["exit_code"] is None or isinstance(info["exit_code"], int)
    assert info["signal"] is None or isinstance(info["signal"], str)
    assert isinstance(info["stdout_bytes"], int) and isinstance(info["stderr_bytes"], int)


async def test_status_fields_running_paused_and_ended(client: RawClient) -> None:
    command = py("import sys, time; print('ready', flush=True); sys.stderr.write('ee'); "
                 "sys.stderr.flush(); sys.stdin.read(); sys.exit(3)")
    started = await client.execute(command, stdin=True)
    sid = started["session_id"]
    with trio.fail_after(10):
        while True:
            running = await client.result("status", session_id=sid)
            if running["stdout_bytes"] == 6 and running["stderr_bytes"] == 2:
                break
            await trio.sleep(0.02)
    check_info(running)
    assert running["session_id"] == sid
    assert running["command"] == command
    assert running["pid"] == started["pid"] and running["pgid"] == started["pgid"]
    assert running["status"] == "running"
    assert running["ended_at"] is None and running["exit_code"] is None
    assert running["signal"] is None

    await client.result("control", session_id=sid, type="PAUSE")
    assert (await client.result("status", session_id=sid))["status"] == "paused"
    await client.result("control", session_id=sid, type="RESUME")

    await client.result("input", session_id=sid, data="", eof=True)
    await completion(client, sid)
    ended = await client.result("status", session_id=sid)
    check_info(ended)
    assert ended["status"] == "exited" and ended["exit_code"] == 3 and ended["signal"] is None
    assert iso(ended["ended_at"]) >= iso(ended["started_at"])
    assert ended["stdout_bytes"] == 6 and ended["stderr_bytes"] == 2


async def test_status_of_killed_session_has_signal(client: RawClient) -> None:
    started = await client.execute(py("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    await completion(client, started["session_id"])
    info = await client.result("status", session_id=started["session_id"])
    check_info(info)
    assert info["status"] == "killed" and info["signal"] == "SIGKILL"
    assert info["exit_code"] is None


async def test_sessions_lists_running_and_ended_from_every_connection(
    server: Any, client: RawClient, connect: Any
) -> None:
    other = await connect(server)
    ended = await client.execute(["true"])
    await completion(client, ended["session_id"])
    running = await start_ready(other, SLEEPER)
    for viewer in (client, other):
        listed = (await viewer.result("sessions"))["sessions"]
        by_id = {info["session_id"]: info for info in listed}
        assert set(by_id) == {ended["session_id"], running["session_id"]}
        for info in listed:
            check_info(info)
        ended_status = await viewer.result("status", session_id=ended["session_id"])
        assert by_id[ended["session_id"]] == ended_status  # "each info is as in status"
        assert by_id[ended["session_id"]]["status"] == "exited"
        assert by_id[running["session_id"]]["status"] == "running"
    await other.result("control", session_id=running["session_id"], type="CANCEL")
    await completion(other, running["session_id"])


async def test_ping(client: RawClient) -> None:
    result = await client.result("ping")
    assert result["pong"] is True
    iso(result["time"])


async def test_server_info(client: RawClient) -> None:
    info = await client.result("server.info")
    assert info["name"] == "ccx"
    assert isinstance(info["version"], str) and info["version"]
    assert info["protocol"] == 1
    assert isinstance(info["limits"], dict)
    assert isinstance(info["capabilities"], list)


# ------------------------------------------------------------------------------ notifications


async def test_process_started_notification(client: RawClient) -> None:
    command = ["echo", "hi"]
    started = await client.execute(command)
    events = await session_events(client, started["session_id"])
    methods = [m for m, _ in events]
    assert methods.count("process.started") == 1
    params = events[methods.index("process.started")][1]
    assert params == {"session_id": started["session_id"], "pid": started["pid"],
                      "pgid": started["pgid"], "command": command}
    # (process.started is expected first: it is what 'started' means, though section 3 does
    # not spell out its position)
    assert methods[0] == "process.started", methods


async def test_completed_exited_nonzero(client: RawClient) -> None:
    stdout, stderr, completed = await client.run(
        py("import sys; print('out'); sys.stderr.write('err!'); sys.exit(42)"))
    assert set(completed) >= COMPLETED_FIELDS
    assert completed["status"] == "exited" and completed["exit_code"] == 42
    assert completed["signal"] is None
    assert isinstance(completed["duration_s"], int | float) and completed["duration_s"] >= 0
    assert (completed["stdout_bytes"], completed["stderr_bytes"]) == (4, 4)
    assert stdout == b"out\n" and stderr == b"err!"


@pytest.mark.parametrize("sig", ["SIGSEGV", "SIGKILL", "SIGTERM", "SIGABRT"])
async def test_completed_killed_by_own_signal(client: RawClient, sig: str) -> None:
    """A signal nobody asked for (not CANCEL or timeout): status killed, signal named."""
    code = ("import os, resource, signal; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
            f"os.kill(os.getpid(), signal.{sig})")
    started = await client.execute(py(code))
    completed = await completion(client, started["session_id"])
    assert completed["status"] == "killed", completed
    assert completed["signal"] == sig
    assert completed["exit_code"] is None


async def test_completed_killed_by_outside_signal(client: RawClient) -> None:
    started = await start_ready(client, SLEEPER)
    os.kill(started["pid"], signal.SIGKILL)
    completed = await completion(client, started["session_id"])
    assert completed["status"] == "killed" and completed["signal"] == "SIGKILL"


async def test_completed_cancelled_even_if_child_exits_0_on_term(client: RawClient) -> None:
    """A cancelled session is never reported as `exited` with code 0."""
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
            "print('ready', flush=True); time.sleep(100)")
    started = await start_ready(client, py(code))
    await client.result("control", session_id=started["session_id"], type="CANCEL")
    completed = await completion(client, started["session_id"])
    assert completed["status"] == "cancelled", completed


async def test_execute_result_arrives_before_any_notification(client: RawClient) -> None:
    for attempt in range(15):
        request_id = f"exec-{attempt}"
        await client.send({"jsonrpc": "2.0", "id": request_id, "method": "execute",
                           "params": {"command": ["echo", str(attempt)]}})
        with trio.fail_after(10):
            first = await client.receive()
            assert first.get("id") == request_id and "result" in first, \
                f"a message came before the execute result: {first}"
            sid = first["result"]["session_id"]
            events = await session_events(client, sid)
        assert events[-1][0] == "process.completed"


async def test_execute_result_first_inside_a_batch(client: RawClient) -> None:
    await client.send([{"jsonrpc": "2.0", "id": 1, "method": "execute",
                        "params": {"command": ["echo", "batched"]}},
                       {"jsonrpc": "2.0", "id": 2, "method": "ping"}])
    with trio.fail_after(10):
        first = await client.receive()
    assert isinstance(first, list), f"a message came before the batch answer: {first}"
    by_id = {reply["id"]: reply for reply in first}
    sid = by_id[1]["result"]["session_id"]
    outputs, completed = await client.run_to_completion(sid)
    assert join(outputs, "stdout") == b"batched\n" and completed["status"] == "exited"


async def test_completed_exactly_once_after_every_output(client: RawClient) -> None:
    code = ("import sys\nfor i in range(300):\n"
            "    sys.stdout.write('o' * 1000 + '\\n'); sys.stderr.write('e' * 700 + '\\n')\n"
            "    sys.stdout.flush(); sys.stderr.flush()\n")
    started = await client.execute(py(code))
    sid = started["session_id"]
    events = await session_events(client, sid)
    methods = [m for m, _ in events]
    assert methods[-1] == "process.completed"
    outputs = [p for m, p in events if m == "process.output"]
    completed = events[-1][1]
    assert join(outputs, "stdout") == ("o" * 1000 + "\n").encode() * 300
    assert join(outputs, "stderr") == ("e" * 700 + "\n").encode() * 300
    assert completed["stdout_bytes"] == 1001 * 300 and completed["stderr_bytes"] == 701 * 300
    # Nothing of the session may follow its completion.
    await trio.sleep(0.3)
    await client.result("ping")
    late = [m for m in client.notifications if m.get("params", {}).get("session_id") == sid]
    assert late == [], late


async def test_notification_params_are_for_their_session_only(client: RawClient) -> None:
    """Two sessions of one connection at once: each gets its own seq from 0, its own data."""
    code = "import sys, time\nfor i in range(20):\n    print('{}', i, flush=True); time.sleep(0.01)\n"
    a = await client.execute(py(code.format("A")))
    b = await client.execute(py(code.format("B")))
    out_a, done_a = await client.run_to_completion(a["session_id"])
    out_b, done_b = await client.run_to_completion(b["session_id"])
    assert [o["seq"] for o in out_a] == list(range(len(out_a)))
    assert [o["seq"] for o in out_b] == list(range(len(out_b)))
    assert join(out_a, "stdout") == "".join(f"A {i}\n" for i in range(20)).encode()
    assert join(out_b, "stdout") == "".join(f"B {i}\n" for i in range(20)).encode()
    assert done_a["status"] == done_b["status"] == "exited"


async def test_python_child_sees_its_argv(client: RawClient) -> None:
    stdout, _, _ = await client.run([PY, "-c", "import sys; print(sys.argv[1:])", "a b", "c"])
    assert stdout == b"['a b', 'c']\n"


async def test_execute_result_first_while_connection_is_busy(client: RawClient) -> None:
    """Even while another session of the connection floods it with output, a new session's
    execute result precedes that session's notifications."""
    flood = await client.execute(py(
        "import sys\nfor i in range(200):\n    sys.stdout.buffer.write(b'f' * 65536)\n"))
    await trio.sleep(0.3)  # let the flood back up
    await client.send({"jsonrpc": "2.0", "id": "second", "method": "execute",
                       "params": {"command": ["echo", "second"]}})
    second_sid = None
    with trio.fail_after(30):
        while second_sid is None:
            message = await client.receive()
            if isinstance(message, dict) and message.get("id") == "second":
                second_sid = message["result"]["session_id"]
            elif isinstance(message, dict) and "method" in message:
                assert message["params"]["session_id"] == flood["session_id"], \
                    f"notification of the new session before its execute result: {message}"
                client.notifications.append(message)
        outputs, _completed = await client.run_to_completion(second_sid)
        assert join(outputs, "stdout") == b"second\n"
        _flood_out, flood_done = await client.run_to_completion(flood["session_id"])
    assert flood_done["stdout_bytes"] == 200 * 65536


async def test_utf8_outputs_carry_no_base64_marker(client: RawClient) -> None:
    started = await client.execute(["echo", "plain"])
    outputs, _ = await client.run_to_completion(started["session_id"])
    assert outputs and all(o.get("encoding", "utf-8") == "utf-8" for o in outputs), outputs


async def test_input_after_session_ended_is_invalid_state(client: RawClient) -> None:
    started = await client.execute(["cat"], stdin=True)
    sid = started["session_id"]
    await client.result("input", session_id=sid, data="x", eof=True)
    await completion(client, sid)
    assert_error(await client.error("input", session_id=sid, data="y"), -32004)


async def test_large_input_is_written_completely(client: RawClient) -> None:
    """input awaits the pipe (64 KiB) while the child is slow to read; nothing is lost."""
    payload = os.urandom(600 * 1024)
    code = ("import hashlib, sys, time; time.sleep(0.5); data = sys.stdin.buffer.read(); "
            "print(len(data), hashlib.sha256(data).hexdigest())")
    started = await client.execute(py(code), stdin=True)
    sid = started["session_id"]
    reply = await client.result("input", session_id=sid,
                                data=base64.b64encode(payload).decode(), encoding="base64",
                                eof=True)
    assert reply["bytes"] == len(payload)
    outputs, completed = await client.run_to_completion(sid)
    assert join(outputs, "stdout").decode().split() == \
        [str(len(payload)), hashlib.sha256(payload).hexdigest()]
    assert completed["exit_code"] == 0


async def test_cancel_of_paused_child_delivers_sigterm_it_can_handle(client: RawClient) -> None:
    """CANCEL: SIGCONT if paused, SIGTERM, and only after kill_grace SIGKILL. A paused child
    that handles SIGTERM gets to run its handler (its output still arrives) and ends long
    before a 10 s grace."""
    code = ("import signal, sys, time\n"
            "def bye(*_):\n    print('got term', flush=True); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, bye)\nprint('ready', flush=True)\ntime.sleep(100)\n")
    started = await start_ready(client, py(code), kill_grace=10)
    sid = started["session_id"]
    await client.result("control", session_id=sid, type="PAUSE")
    await wait_for(lambda: (proc_stat(started["pid"]) or ("?",))[0] == "T", timeout=3)
    await client.result("control", session_id=sid, type="CANCEL")
    with trio.fail_after(8):
        events = await session_events(client, sid)
    text = "".join(p["data"] for m, p in events if m == "process.output")
    assert "got term" in text
    assert events[-1][1]["status"] == "cancelled"


async def test_timeout_of_a_paused_session(client: RawClient) -> None:
    started = await start_ready(client, ["sh", "-c", "echo ready; sleep 100 & sleep 100; wait"],
                                timeout=1.0)
    await client.result("control", session_id=started["session_id"], type="PAUSE")
    completed = await completion(client, started["session_id"])
    assert completed["status"] == "timeout"
    assert group_pids(started["pgid"]) == {}


async def test_duration_is_plausible(client: RawClient) -> None:
    _, _, completed = await client.run(py("import time; time.sleep(0.5)"))
    assert 0.4 <= completed["duration_s"] < 30, completed


async def test_node_name_prefixes_session_ids(start_server: Any, connect: Any) -> None:
    """CCX_NODE_NAME (a pod name) starts every session id, so an id tells where it lives."""
    server = await start_server(node_name="ccx-7d9f8-x2k4q")
    client = await connect(server)
    started = await client.execute(["true"])
    assert started["session_id"].startswith("ccx-7d9f8-x2k4q.")
    assert (await client.result("server.info"))["node"] == "ccx-7d9f8-x2k4q"
    await completion(client, started["session_id"])
    status = await client.result("status", session_id=started["session_id"])
    assert status["status"] == "exited"


def test_node_name_is_checked() -> None:
    from ccx.config import ConfigError, Settings

    with pytest.raises(ConfigError, match="CCX_NODE_NAME"):
        Settings.from_env({"CCX_NODE_NAME": "bad name/with slash"})


@pytest.mark.parametrize("params", [
    {"command": ["echo", "a\ud800"]},
    {"command": "echo \udc80"},
    {"command": ["echo"], "env": {"X": "\ud800"}},
    {"command": ["echo"], "env": {"\ud800": "x"}},
    {"command": ["echo"], "cwd": "/tmp/\ud800"},
])
async def test_lone_surrogates_are_bad_params(client: RawClient, params: dict[str, Any]) -> None:
    """JSON can carry a lone surrogate; an argv, env or cwd cannot (regression: -32603 with
    a logged traceback instead of -32602)."""
    assert_error(await client.error("execute", params), -32602)
    assert (await client.result("ping"))["pong"] is True
