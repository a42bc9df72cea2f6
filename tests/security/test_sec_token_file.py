"""The token on the command line (security finding 3): `--token` is readable by every local
user (ps, /proc/PID/cmdline). `CCX_TOKEN_FILE` / `--token-file` read it from a file
(surrounding whitespace stripped; unreadable or empty = start-up error), and `--token` logs a
warning.

Rules: real `ccx serve` processes on 127.0.0.1, port 0; raw handshakes with deadlines.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from sechelp import ccx_serve

CCX = str(Path(sys.executable).parent / "ccx")
UPGRADE = ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           "Sec-WebSocket-Version: 13\r\n{extra}\r\n")


async def _handshake_status(port: int, extra: str = "") -> int:
    with trio.fail_after(10):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(UPGRADE.format(port=port, extra=extra).encode())
            data = b""
            while b"\r\n" not in data:
                chunk = await stream.receive_some(4096)
                assert chunk, data
                data += chunk
    return int(data.split()[1])


@pytest.mark.parametrize("how", ["env", "flag"])
async def test_token_file_sets_the_token(tmp_path: Path, how: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  s3cret-from-file \n")
    env = {"CCX_TOKEN_FILE": str(token_file)} if how == "env" else {}
    args = ("--token-file", str(token_file)) if how == "flag" else ()
    with ccx_serve(tmp_path, env, args=args) as served:
        assert await _handshake_status(served.port) == 401  # before the fix: 101, no token
        assert await _handshake_status(served.port, "Authorization: Bearer s3cret-from-file\r\n") \
            == 101
        assert "s3cret-from-file" not in served.log_text()
        assert b"s3cret" not in Path(f"/proc/{served.process.pid}/cmdline").read_bytes()


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read it"), ("", "the file is empty"), (" \n\t", "the file is empty")])
def test_bad_token_file_is_a_start_up_error(tmp_path: Path, content: str | None,
                                            message: str) -> None:
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCX_")}
    env.update(CCX_TOKEN_FILE=str(token_file), CCX_STATE_DIR=str(tmp_path / "state"))
    result = subprocess.run([CCX, "serve", "--port", "0"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2, result
    assert f"CCX_TOKEN_FILE={str(token_file)!r}: {message}" in result.stderr, result.stderr


def test_token_and_token_file_together_are_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("a")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCX_")}
    env.update(CCX_TOKEN="b", CCX_TOKEN_FILE=str(token_file),
               CCX_STATE_DIR=str(tmp_path / "state"))
    result = subprocess.run([CCX, "serve", "--port", "0"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and "use one" in result.stderr, result


async def test_token_in_argv_is_warned_about(tmp_path: Path) -> None:
    with ccx_serve(tmp_path, args=("--token", "visible")) as served:
        warnings = [e for e in served.log() if e.get("event") == "token_in_argv"]
        assert warnings and warnings[0]["level"] == "warning", served.log_text()
        assert await _handshake_status(served.port, "Authorization: Bearer visible\r\n") == 101


async def test_children_do_not_learn_where_the_token_is(
        start_server: Any, connect: Any, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """Like CCX_TOKEN, CCX_TOKEN_FILE is not passed to sessions (before: it was)."""
    monkeypatch.setenv("CCX_TOKEN_FILE", str(tmp_path / "token"))
    client = await connect(await start_server())
    out, _, done = await client.run(["env"])
    assert done["exit_code"] == 0 and b"PATH=" in out
    assert b"CCX_TOKEN_FILE" not in out
