"""Finding 3: `env` defeated the allow-list. The allowed file ran, but ran anything.

Attacks (each worked before the fix, against a server whose allow-list holds a bash script,
`echo` or `git`): `BASH_ENV` and `BASH_FUNC_name%%` make an allowed bash script run the
client's code; `LD_PRELOAD` / `LD_AUDIT` make any dynamically linked program (`echo`) load the
client's library; `PATH`, `PYTHON*`, `PERL5*`, `GIT_CONFIG_*` and the rest of PROTOCOL.md
section 2's list do the same for their programs.
Rule checked (PROTOCOL.md 2, 7): with an allow-list set, those keys are refused with -32001
(the message names the key), unless listed in `CCX_ALLOWED_ENV`; MCP tools refuse them with an
`isError` result. Without an allow-list nothing is refused (any command may run anyway).
Rules of these tests: in-process servers on 127.0.0.1, port 0; real children; the shared
fixtures assert that no process group outlives its server.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import RawClient

from ccx.server import Server

Connect = Callable[..., Awaitable[RawClient]]
StartServer = Callable[..., Awaitable[Server]]

# One key per pattern of PROTOCOL.md section 2 (prefix patterns twice: the bare prefix and a
# real variable).
REFUSED_KEYS = (
    "PATH", "LD_PRELOAD", "LD_AUDIT", "LD_LIBRARY_PATH", "LD_", "DYLD_INSERT_LIBRARIES",
    "BASH_FUNC_date%%", "BASH_FUNC_echo()", "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4",
    "GCONV_PATH", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PERL5OPT", "PERL5LIB",
    "RUBYOPT", "NODE_OPTIONS", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT", "GIT_DIR",
    "JAVA_TOOL_OPTIONS",
)
HARMLESS_KEYS = ("FOO", "LANG", "TERM", "HOME", "MY_PATH", "XPATH", "ENVIRONMENT", "GITHUB")
PWNED = "PWNED-by-env"


def allowed_script(tmp_path: Path) -> Path:
    """An allowed bash script that prints ok, then the date (a function can replace `date`)."""
    script = tmp_path / "tool.sh"
    script.write_text("#!/bin/bash\necho ok\ndate\n")
    script.chmod(0o755)
    return script


async def run_text(client: RawClient, command: list[str], **params: Any) -> tuple[str, dict]:
    """Execute; return stdout and the completion, or raise AssertionError with the error."""
    stdout, _, completed = await client.run(command, **params)
    return stdout.decode(), completed


async def test_every_listed_key_is_refused_with_an_allow_list(
        start_server: StartServer, connect: Connect) -> None:
    server = await start_server(allowed_commands=("echo",))
    client = await connect(server)
    wrong = []
    for key in REFUSED_KEYS:
        reply = await client.request("execute", {"command": ["echo", "x"],
                                                 "env": {key: "/nonexistent"}})
        error = reply.get("error")
        if error is None or error["code"] != -32001 or key not in error["message"]:
            wrong.append((key, reply))
    assert not wrong, wrong
    for key in HARMLESS_KEYS:
        stdout, completed = await run_text(client, ["echo", "x"], env={key: "v"})
        assert stdout == "x\n" and completed["status"] == "exited", (key, completed)


async def test_allowed_env_opts_in_and_no_allow_list_refuses_nothing(
        start_server: StartServer, connect: Connect) -> None:
    opted = await start_server(allowed_commands=("echo",), allowed_env=("PYTHONPATH", "PS4"))
    client = await connect(opted)
    for key in ("PYTHONPATH", "PS4"):
        stdout, _ = await run_text(client, ["echo", "x"], env={key: "/nonexistent"})
        assert stdout == "x\n"
    error = await client.error("execute", {"command": ["echo", "x"],
                                           "env": {"PYTHONSTARTUP": "/x"}})
    assert error["code"] == -32001  # exact names: PYTHONPATH does not open PYTHON*

    open_server = await start_server()
    client = await connect(open_server)
    stdout, _ = await run_text(client, ["echo", "x"], env={"BASH_ENV": "/nonexistent"})
    assert stdout == "x\n"


async def test_bash_env_and_exported_function_on_an_allowed_script(
        tmp_path: Path, start_server: StartServer, connect: Connect) -> None:
    """The end-to-end attack: before the fix both printed PWNED from an allowed script."""
    script = allowed_script(tmp_path)
    payload = tmp_path / "payload.sh"
    payload.write_text(f"echo {PWNED}\n")
    attacks = {
        "BASH_ENV": {"BASH_ENV": str(payload)},
        "BASH_FUNC": {"BASH_FUNC_date%%": f"() {{ echo {PWNED}; }}"},
    }
    # The attacks are real: with no allow-list (where running anything is allowed anyway)
    # they do run the payload, so a refusal below is what stops them.
    open_client = await connect(await start_server())
    for env in attacks.values():
        stdout, _ = await run_text(open_client, [str(script)], env=env)
        assert PWNED in stdout, stdout

    client = await connect(await start_server(allowed_commands=(str(script),)))
    stdout, _ = await run_text(client, [str(script)])
    assert stdout.startswith("ok\n") and PWNED not in stdout  # the allowed script runs
    for name, env in attacks.items():
        reply = await client.request("execute", {"command": [str(script)], "env": env})
        assert "error" in reply, (name, reply)  # before the fix: PWNED on stdout
        assert reply["error"]["code"] == -32001 and next(iter(env)) in reply["error"]["message"]


def _build_preload(tmp_path: Path) -> Path | None:
    """A shared object whose constructor prints PWNED, or None without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = tmp_path / "evil.c"
    source.write_text('#include <unistd.h>\n__attribute__((constructor)) static void evil(void)'
                      f' {{ write(1, "{PWNED}\\n", {len(PWNED) + 1}); }}\n')
    library = tmp_path / "evil.so"
    built = subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)],
                           capture_output=True, timeout=60)
    return library if built.returncode == 0 else None


async def test_ld_preload_on_allowed_echo(tmp_path: Path, start_server: StartServer,
                                          connect: Connect) -> None:
    library = _build_preload(tmp_path)
    if library is None:
        pytest.skip("no C compiler: the -32001 for LD_* is checked above")
    echo = shutil.which("echo")
    assert echo is not None
    open_client = await connect(await start_server())
    stdout, _ = await run_text(open_client, [echo, "x"], env={"LD_PRELOAD": str(library)})
    assert PWNED in stdout  # the attack is real
    client = await connect(await start_server(allowed_commands=("echo",)))
    for key in ("LD_PRELOAD", "LD_AUDIT"):
        reply = await client.request("execute", {"command": ["echo", "x"],
                                                 "env": {key: str(library)}})
        assert "error" in reply and reply["error"]["code"] == -32001, reply


async def test_mcp_tools_share_the_env_rule(tmp_path: Path, start_server: StartServer,
                                            connect: Connect) -> None:
    script = allowed_script(tmp_path)
    server = await start_server(allowed_commands=(str(script),))
    client = await connect(server, "/ws", subprotocols=["mcp"])
    await client.result("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                       "clientInfo": {"name": "raw", "version": "0"}})
    await client.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    for tool in ("execute", "start"):
        result = await client.result("tools/call", {"name": tool, "arguments": {
            "command": [str(script)], "env": {"BASH_ENV": "/dev/null"}}})
        assert result["isError"], result
        assert "BASH_ENV" in result["content"][0]["text"]
    fine = await client.result("tools/call", {"name": "execute", "arguments": {
        "command": [str(script)], "env": {"FOO": "1"}}})
    assert not fine["isError"] and fine["structuredContent"]["stdout"].startswith("ok\n")
