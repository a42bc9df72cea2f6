"""The launch policy (`ccx.launch.LaunchPolicy`) as plain synchronous tests: execute params in,
a `Launch` or the documented error out (PROTOCOL.md section 2, docs/security.md). Real file
system and PATH; nothing is spawned."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from ccx.config import Settings
from ccx.errors import InvalidParams, NotAllowed, SpawnFailed
from ccx.launch import HIDDEN_FROM_CHILDREN, PTY_TERM, SHELL, LaunchPolicy
from ccx.params import ExecuteParams, PtySize

ECHO = shutil.which("echo")
assert ECHO is not None
OPEN = LaunchPolicy(Settings(state_dir=""))
ONLY_ECHO = LaunchPolicy(Settings(state_dir="", allowed_commands=("echo",)))


def test_a_command_string_is_split_like_a_shell_would_but_not_run_by_one() -> None:
    launch = OPEN.resolve(ExecuteParams("echo 'a b' $HOME"))
    assert launch.argv == ["echo", "a b", "$HOME"]
    assert os.path.basename(launch.executable) == "echo"


def test_an_allow_list_entry_by_name_allows_that_program_by_name_or_path() -> None:
    assert ONLY_ECHO.resolve(ExecuteParams(["echo", "x"])).argv == ["echo", "x"]
    assert ONLY_ECHO.resolve(ExecuteParams([ECHO])).executable == ONLY_ECHO.resolve(
        ExecuteParams(["echo"])).executable


@pytest.mark.parametrize("command", [["cat"], [sys.executable], ["/bin/sh", "-c", "echo"]])
def test_anything_else_is_not_allowed(command: list[str]) -> None:
    with pytest.raises(NotAllowed) as caught:
        ONLY_ECHO.resolve(ExecuteParams(command))
    assert caught.value.code == -32001 and "executable" in (caught.value.data or {})


def test_a_symlink_to_an_allowed_program_is_judged_by_its_own_name(tmp_path: Path) -> None:
    """A multi-call binary (busybox) must not pass for an allowed name: the file name is kept,
    only directory symlinks are resolved."""
    alias = tmp_path / "echo-alias"
    alias.symlink_to(ECHO)
    with pytest.raises(NotAllowed):
        ONLY_ECHO.resolve(ExecuteParams([str(alias)]))


def test_a_symlinked_directory_is_resolved_once_so_the_path_judged_is_the_path_run(
        tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    program = real / "tool"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    (tmp_path / "link").symlink_to(real)
    policy = LaunchPolicy(Settings(state_dir="", allowed_commands=(str(program),)))
    launch = policy.resolve(ExecuteParams([str(tmp_path / "link" / "tool")]))
    assert launch.executable == str(program)


@pytest.mark.parametrize("key", ["LD_PRELOAD", "PATH", "BASH_ENV", "BASH_FUNC_echo%%",
                                 "PYTHONSTARTUP", "GIT_CONFIG_PARAMETERS", "NODE_OPTIONS"])
def test_with_an_allow_list_env_keys_that_load_code_are_refused(key: str) -> None:
    with pytest.raises(NotAllowed) as caught:
        ONLY_ECHO.resolve(ExecuteParams(["echo"], env={key: "x"}))
    assert caught.value.data == {"env": key}


def test_the_operator_may_allow_such_a_key_and_without_an_allow_list_all_pass() -> None:
    allowed = LaunchPolicy(Settings(state_dir="", allowed_commands=("echo",),
                                    allowed_env=("PYTHONPATH",)))
    assert allowed.resolve(ExecuteParams(["echo"], env={"PYTHONPATH": "/x"})).env[
        "PYTHONPATH"] == "/x"
    assert OPEN.resolve(ExecuteParams(["echo"], env={"LD_PRELOAD": ""})).env["LD_PRELOAD"] == ""


def test_shell_needs_the_operator_and_a_string() -> None:
    with pytest.raises(NotAllowed):
        OPEN.resolve(ExecuteParams("echo hi", shell=True))
    shell = LaunchPolicy(Settings(state_dir="", allow_shell=True))
    assert shell.resolve(ExecuteParams("echo hi | cat", shell=True)).argv == [
        SHELL, "-c", "echo hi | cat"]
    with pytest.raises(InvalidParams):
        shell.resolve(ExecuteParams(["echo", "hi"], shell=True))


@pytest.mark.parametrize(("params", "words"), [
    (ExecuteParams(""), "empty"),
    (ExecuteParams(["", "x"]), "empty"),
    (ExecuteParams("echo 'unclosed"), "quotation"),
    (ExecuteParams(["echo", "a\0b"]), "NUL"),
    (ExecuteParams(["echo", "\ud800"]), "Unicode"),
    (ExecuteParams(["echo"], cwd="/no/such/dir"), "cwd"),
    (ExecuteParams(["echo"], env={"A=B": "x"}), "env"),
    (ExecuteParams(["echo"], env={"A": "x\0"}), "env"),
])
def test_bad_params_are_invalid_params(params: ExecuteParams, words: str) -> None:
    with pytest.raises(InvalidParams) as caught:
        OPEN.resolve(params)
    assert caught.value.code == -32602 and words in caught.value.message


def test_a_missing_executable_is_a_spawn_failure_unless_the_allow_list_refuses_first() -> None:
    with pytest.raises(SpawnFailed) as caught:
        OPEN.resolve(ExecuteParams(["no-such-program-ccx"]))
    assert caught.value.code == -32005
    with pytest.raises(NotAllowed):  # says nothing about what exists on the server
        ONLY_ECHO.resolve(ExecuteParams(["no-such-program-ccx"]))


def test_the_token_is_hidden_from_children_and_a_pty_gets_a_terminal_type(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in HIDDEN_FROM_CHILDREN:
        monkeypatch.setenv(name, "secret")
    launch = OPEN.resolve(ExecuteParams(["echo"], pty=PtySize(80, 24)))
    assert not set(HIDDEN_FROM_CHILDREN) & set(launch.env)
    assert launch.env["TERM"] == PTY_TERM
    mine = OPEN.resolve(ExecuteParams(["echo"], env={"TERM": "dumb"}, pty=PtySize(80, 24)))
    assert mine.env["TERM"] == "dumb"
