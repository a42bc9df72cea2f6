"""Launch policy: what an `execute` may run and how (PROTOCOL.md section 2, docs/security.md).

Inputs: `Settings` (CCX_ALLOWED_COMMANDS, CCX_ALLOW_SHELL, CCX_ALLOWED_ENV) and validated
`ExecuteParams`. Outputs: a `Launch` (argv, the executable that will be exec'd, cwd, the
child's environment), or the documented error: -32001 (not allowed: command, shell, an env
key that makes an allowed program run other code), -32602 (bad command, cwd or env),
-32005 (no such executable). Pure: it reads the file system and PATH, spawns nothing.
Docs: https://docs.python.org/3/library/shlex.html#shlex.split
      https://docs.python.org/3/library/os.path.html#os.path.realpath
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping

import attrs

from ccx.config import Settings
from ccx.errors import InvalidParams, NotAllowed, SpawnFailed
from ccx.params import ExecuteParams
from ccx.process import resolve_executable

SHELL = "/bin/sh"
HIDDEN_FROM_CHILDREN = ("CCX_TOKEN", "CCX_TOKEN_FILE")  # where the token is: not theirs
PTY_TERM = "xterm-256color"  # TERM of a PTY session unless execute's env sets one
# With an allow-list, `env` keys that make an allowed program run other code (PROTOCOL.md 2):
# the loader's (LD_*, DYLD_*), the shells' (BASH_FUNC_*, BASH_ENV, ENV, ...), interpreters'
# start-up hooks and git's config injection. Refused unless named in CCX_ALLOWED_ENV.
CODE_LOADING_ENV = frozenset({"PATH", "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4",
                              "GCONV_PATH", "RUBYOPT", "NODE_OPTIONS", "JAVA_TOOL_OPTIONS"})
CODE_LOADING_ENV_PREFIXES = ("LD_", "DYLD_", "BASH_FUNC_", "PYTHON", "PERL5", "GIT_")


def _normalize(path: str) -> str:
    """Resolve symlinked directories (/bin -> /usr/bin) but not the file itself.

    Following a symlinked file would let a multi-call binary (busybox) pass for any of its
    names, so the file name is kept as written. The result is both what the allow-list
    judges and what is exec'd: a directory symlink flipped after the check cannot change it.
    """
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(directory), name)


def _encodable(text: str) -> bool:
    """Whether *text* can reach the OS (a JSON string may hold a lone surrogate, \\ud800)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@attrs.frozen
class Launch:
    """What execute resolved: the argv, the executable that will run, cwd and environment."""

    argv: list[str]
    executable: str
    cwd: str | None
    env: dict[str, str]


@attrs.frozen
class LaunchPolicy:
    """The server's rules for `execute`, applied by `resolve`."""

    settings: Settings

    def _allowed_paths(self) -> set[str]:
        allowed: set[str] = set()
        for entry in self.settings.allowed_commands or ():
            if "/" in entry:
                allowed.add(_normalize(entry))
            else:
                found = resolve_executable(entry, path=os.environ.get("PATH"), cwd=None)
                if found:
                    allowed.add(_normalize(found))
        return allowed

    def resolve(self, params: ExecuteParams) -> Launch:
        """Turn execute params into a `Launch`, or raise the documented error."""
        if params.shell:
            if not self.settings.allow_shell:
                raise NotAllowed("shell is not allowed on this server (CCX_ALLOW_SHELL=0)")
            if not isinstance(params.command, str):
                raise InvalidParams("Invalid params: shell=true needs command as a string")
            argv = [SHELL, "-c", params.command]
        elif isinstance(params.command, str):
            try:
                argv = shlex.split(params.command)
            except ValueError as exc:
                raise InvalidParams(f"Invalid params: command: {exc}") from None
        else:
            argv = list(params.command)
        if not argv or not argv[0]:
            raise InvalidParams("Invalid params: command is empty")
        if any("\0" in part for part in argv):
            raise InvalidParams("Invalid params: command contains a NUL byte")
        if not all(_encodable(part) for part in argv) or (
                params.cwd is not None and not _encodable(params.cwd)):
            raise InvalidParams("Invalid params: command or cwd is not valid Unicode "
                                "(a lone surrogate cannot become a file name or argument)")
        cwd = params.cwd
        if cwd is not None and not os.path.isdir(cwd):
            raise InvalidParams(f"Invalid params: cwd does not exist: {cwd}", {"cwd": cwd})
        self._check_env_policy(params.env)
        env = self._child_env(params.env)
        if params.pty is not None:  # the server's own TERM describes its terminal, not this one
            env["TERM"] = params.env.get("TERM", PTY_TERM)
        found = resolve_executable(argv[0], path=env.get("PATH"), cwd=cwd)
        # Directory symlinks are resolved once, here; the path judged is the path exec'd.
        executable = _normalize(found) if found is not None else None
        if self.settings.allowed_commands is not None and (
            executable is None or executable not in self._allowed_paths()
        ):
            raise NotAllowed(f"command not allowed: {argv[0]}",
                             {"executable": executable or argv[0]})
        if executable is None:
            raise SpawnFailed(f"executable not found: {argv[0]}", {"executable": argv[0]})
        return Launch(argv, executable, cwd, env)

    def _check_env_policy(self, extra: Mapping[str, str]) -> None:
        """With an allow-list, refuse `env` keys that make an allowed program run other code
        (PROTOCOL.md 2), unless the operator listed them in CCX_ALLOWED_ENV."""
        if self.settings.allowed_commands is None:
            return
        for key in extra:
            if key in self.settings.allowed_env:
                continue
            if key in CODE_LOADING_ENV or key.startswith(CODE_LOADING_ENV_PREFIXES):
                raise NotAllowed(f"env variable not allowed: {key} (it can make an allowed "
                                 "program run other code; see CCX_ALLOWED_ENV)", {"env": key})

    @staticmethod
    def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in HIDDEN_FROM_CHILDREN}
        for key, value in extra.items():
            if (not key or "=" in key or "\0" in key or "\0" in value
                    or not _encodable(key) or not _encodable(value)):
                raise InvalidParams(f"Invalid params: env: bad variable {key!r}")
            env[key] = value
        return env


if __name__ == "__main__":
    import sys

    open_policy = LaunchPolicy(Settings(state_dir=""))
    launch = open_policy.resolve(ExecuteParams("echo 'a b'"))
    assert launch.argv == ["echo", "a b"] and os.path.basename(launch.executable) == "echo"
    strict = LaunchPolicy(Settings(state_dir="", allowed_commands=(sys.executable,)))
    assert strict.resolve(ExecuteParams([sys.executable, "-V"])).argv[0] == sys.executable
    refusals = ((strict, ExecuteParams(["echo"]), NotAllowed),
                (strict, ExecuteParams([sys.executable], env={"LD_PRELOAD": "x"}), NotAllowed),
                (open_policy, ExecuteParams("true", shell=True), NotAllowed),  # CCX_ALLOW_SHELL=0
                (open_policy, ExecuteParams(""), InvalidParams),
                (open_policy, ExecuteParams(["no-such-program-ccx"]), SpawnFailed))
    for policy, params, error in refusals:
        try:
            policy.resolve(params)
        except (NotAllowed, InvalidParams, SpawnFailed) as exc:
            assert isinstance(exc, error), (params, exc)
        else:
            raise AssertionError(f"{params} must be refused with {error.__name__}")
    print("ccx.launch: PASS")
