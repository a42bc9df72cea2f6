"""Finding 2: the allow-list could be raced with a directory symlink.

Attack: `CCX_ALLOWED_COMMANDS=echo`; a local loop flips a directory symlink `link` between
`/usr/bin` (or wherever `echo` lives) and a folder holding a script named `echo`. `execute`
of `echo` found through the link (on `PATH`, or as `./link/echo` relative to `cwd`) was
checked as the resolved `/usr/bin/echo` but exec'd as `link/echo`: the script ran on the 5th
try or so.
Rule checked (PROTOCOL.md 6): the file checked is the file executed, whatever the link points
at in between; so across many tries the script never runs (a try may be refused when the
check sees the script's folder: that is the allow-list working).
Rules of these tests: in-process server on 127.0.0.1, port 0; the flipper is a separate
process (a real concurrent attacker, not a thread of the event loop's interpreter); bounded
number of tries; the shared fixtures assert that no process group outlives its server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from conftest import RawClient

from ccx.server import Server

Connect = Callable[..., Awaitable[RawClient]]
StartServer = Callable[..., Awaitable[Server]]
TRIES = 150
PWNED = "PWNED-by-race"

FLIPPER = """
import os, sys
link, a, b = sys.argv[1:4]
tmp = link + ".new"
while True:
    for target in (a, b):
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(target, tmp)
        os.replace(tmp, link)  # atomic: the link always exists, pointing at a or b
"""


@pytest.fixture
def flipping_link(tmp_path: Path) -> Iterator[Path]:
    """`tmp_path/link`, flipped without pause between echo's real folder and a fake one."""
    echo = shutil.which("echo")
    assert echo is not None
    real_dir = os.path.dirname(os.path.realpath(echo))
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    fake = fake_dir / "echo"
    fake.write_text(f"#!/bin/sh\necho {PWNED}\n")
    fake.chmod(0o755)
    link = tmp_path / "link"
    os.symlink(real_dir, link)
    flipper = subprocess.Popen([sys.executable, "-c", FLIPPER, str(link), str(fake_dir),
                                real_dir])
    try:
        yield link
    finally:
        flipper.kill()
        flipper.wait(timeout=10)


async def _try_many(client: RawClient, command: list[str], **params: object) -> tuple[int, int]:
    """Run *command* TRIES times; fail on the script's output; return (ran, refused)."""
    ran = refused = 0
    for _ in range(TRIES):
        reply = await client.request("execute", {"command": command, **params})
        if "error" in reply:
            assert reply["error"]["code"] == -32001, reply
            refused += 1
            continue
        stdout = b""
        outputs, completed = await client.run_to_completion(reply["result"]["session_id"])
        for output in outputs:
            stdout += output["data"].encode()
        assert PWNED.encode() not in stdout, f"the swapped-in script ran: {completed}"
        assert stdout == b"x\n", f"not the checked echo ran: {stdout!r} {completed}"
        ran += 1
    return ran, refused


async def test_symlinked_dir_on_path_cannot_swap_the_executable(
        flipping_link: Path, start_server: StartServer, connect: Connect) -> None:
    server = await start_server(allowed_commands=("echo",), allowed_env=("PATH",))
    client = await connect(server)
    ran, _ = await _try_many(client, ["echo", "x"], env={"PATH": str(flipping_link)})
    assert ran > 0  # the race was reached: the check passed while the link flipped


async def test_cwd_relative_symlinked_dir_cannot_swap_the_executable(
        flipping_link: Path, start_server: StartServer, connect: Connect) -> None:
    """The same race without any env: `./link/echo` relative to cwd."""
    server = await start_server(allowed_commands=("echo",))
    client = await connect(server)
    ran, _ = await _try_many(client, ["./link/echo", "x"], cwd=str(flipping_link.parent))
    assert ran > 0


async def test_symlinked_file_keeps_its_name(tmp_path: Path, start_server: StartServer,
                                             connect: Connect) -> None:
    """The older rule stays: a symlinked *file* is judged by its own name (a multi-call
    binary must not pass for any of its names), and what runs is that link."""
    echo = shutil.which("echo")
    assert echo is not None
    alias = tmp_path / "notecho"
    os.symlink(echo, alias)
    server = await start_server(allowed_commands=("echo",))
    client = await connect(server)
    error = await client.error("execute", {"command": [str(alias), "x"]})
    assert error["code"] == -32001
