"""The image, built from this working tree and run for real with podman (marker `container`).

tests/test_deploy.py checks the deployment files without an engine; this module builds
deploy/Dockerfile with podman (rootful, runc) and runs the image: its configuration and size,
the refusal without a token, /health and the HEALTHCHECK (also against a SIGSTOPped server),
tini as PID 1 and nobody root, a session streaming through the published port (ccx's own
client and `ccx run --url`), the token kept out of sessions' environment, `podman stop`
cancelling sessions and exiting 0 with nothing left, compose's hardening flags (read from
deploy/compose.yaml) with the image's user and with another uid, and `claude --version` in a
session of the INSTALL_CLAUDE=1 variant.

Opt-in: building images is not cheap, so these run only with `pytest -m container` (or
CCX_CONTAINER=1); `nox -s container` and .ci/container run them. Without podman (or when it
cannot start a container here) every test skips with one line saying why.

Machine facts (see .ci/container): no registry, so the base images are made locally by
.ci/container-base (debootstrap + python3; Node.js 22 from PyPI) once and kept in podman's
store and /var/cache/ccx-ci; builds use `--format docker` (the HEALTHCHECK) and the host's
network; containers run with runc, explicit nofile/nproc limits, and slirp4netns publishing
a port on 127.0.0.1. Every container and volume started here is removed at teardown.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from ccx.client import Completed, Output, Started, connect

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"
BASE_SCRIPT = ROOT / ".ci" / "container-base"
CCX = str(Path(sys.executable).parent / "ccx")

PYTHON_IMAGE = os.environ.get("CCX_CI_PYTHON_IMAGE", "localhost/ccx-ci/python:3.11-bookworm")
NODE_IMAGE = os.environ.get("CCX_CI_NODE_IMAGE", "localhost/ccx-ci/node:22-bookworm")
# One tag per working tree: CI runs of two checkouts on one machine do not test each other's
# image (the layer cache is still shared).
TREE = hashlib.sha1(str(ROOT).encode()).hexdigest()[:8]
IMAGE = f"localhost/ccx:ci-{TREE}"
CLAUDE_IMAGE = f"localhost/ccx:ci-{TREE}-claude"
# runc: crun fails on this machine's hybrid cgroup layout. podman's default nofile limit is
# above the hard limit here, so the limits are explicit.
RUNTIME = os.environ.get("CCX_CONTAINER_RUNTIME", "runc")
LIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
RUN_FLAGS = ["--runtime", RUNTIME, *LIMITS]
# What the image may add on top of its base: ccx's virtualenv and tini (~115 MB today);
# with Claude Code also Node.js, git and the ~400 MB claude binary (~865 MB today).
CCX_BUDGET_MB = 160
CLAUDE_BUDGET_MB = 1000
UID = 10001
KILL_GRACE_S = 2

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]


# ---------------------------------------------------------------------------- podman helpers


def podman(*args: str, check: bool = True,
           timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def last_error_line(text: str) -> str:
    lines = [line for line in text.splitlines()
             if line.strip() and "systemd connection" not in line]
    return lines[-1].strip() if lines else "no output"


def why_not() -> str | None:
    """Why these tests cannot run here, or None. Checked once, at import: the module then
    skips as a whole with one line."""
    if os.environ.get("CCX_CONTAINER", "") in ("", "0"):  # conftest sets it for -m container
        return ("container tests build and run an image: run `pytest -m container` "
                "(or CCX_CONTAINER=1; `nox -s container`)")
    if shutil.which("podman") is None:
        return ("podman not installed (apt-get install podman runc slirp4netns debootstrap; "
                ".ci/container does it)")
    if os.geteuid() != 0:
        return "these tests use rootful podman: run them as root"
    for tool in (RUNTIME, "slirp4netns"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install {tool})"
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    if info.returncode != 0:
        return f"podman cannot run here: {last_error_line(info.stderr)}"
    return None


if (reason := why_not()) is not None:
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="session")
def base_images(pytestconfig: pytest.Config) -> Callable[[str], str]:
    """`.ci/container-base WHAT` once per image kind (cached in podman's store and on disk);
    returns the tag. Skips when the base cannot be made here (no debootstrap), or when a
    container of it cannot start (the runtime does not work on this machine)."""
    made: dict[str, str] = {}

    def make(what: str) -> str:
        if what not in made:
            tag = PYTHON_IMAGE if what == "python" else NODE_IMAGE
            if podman("image", "exists", tag, check=False).returncode != 0:
                if shutil.which("debootstrap") is None:
                    pytest.skip(f"no {tag} and no debootstrap to make it "
                                "(apt-get install debootstrap)")
                started = time.monotonic()
                done = subprocess.run(["bash", str(BASE_SCRIPT), what], capture_output=True,
                                      text=True, timeout=1200)
                assert done.returncode == 0, f"{BASE_SCRIPT.name} {what}:\n{done.stderr}"
                elapsed = time.monotonic() - started
                report(pytestconfig, f"base image {tag} made in {elapsed:.0f} s")
            probe = podman("run", "--rm", *RUN_FLAGS, "--network", "none", tag, "true",
                           check=False, timeout=120)
            if probe.returncode != 0:
                pytest.skip(f"podman cannot run a container here: "
                            f"{last_error_line(probe.stderr)}")
            made[what] = tag
        return made[what]

    return make


def report(config: pytest.Config, line: str) -> None:
    """A line on the terminal even under output capture (timings for CI logs)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_line(f"[container] {line}")


def build(config: pytest.Config, tag: str, *build_args: str) -> None:
    """podman build of the working tree; layers are cached by podman between runs."""
    started = time.monotonic()
    podman("build", "--format", "docker", "--network", "host", "--runtime", RUNTIME, *LIMITS,
           "-f", str(DOCKERFILE), *[f"--build-arg={arg}" for arg in build_args],
           "-t", tag, str(ROOT), timeout=1500)
    report(config, f"built {tag} in {time.monotonic() - started:.0f} s")


@pytest.fixture(scope="session")
def image(pytestconfig: pytest.Config, base_images: Callable[[str], str]) -> str:
    build(pytestconfig, IMAGE, "INSTALL_CLAUDE=0", f"PYTHON_IMAGE={base_images('python')}")
    return IMAGE


@pytest.fixture(scope="session")
def claude_image(pytestconfig: pytest.Config, base_images: Callable[[str], str]) -> str:
    build(pytestconfig, CLAUDE_IMAGE, "INSTALL_CLAUDE=1", f"PYTHON_IMAGE={base_images('python')}",
          f"NODE_IMAGE={base_images('node')}")
    return CLAUDE_IMAGE


def image_info(tag: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(podman("image", "inspect", tag).stdout)[0]
    return info


# --------------------------------------------------------------------------------- containers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Container:
    name: str
    port: int
    token: str

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(podman("inspect", self.name).stdout)[0]
        return info

    def host_pid(self) -> int:
        return int(self.state()["State"]["Pid"])

    def processes(self) -> list[int]:
        """Host pids of every process in the container: PID 1's tree (ccx is a subreaper for
        its sessions and tini reaps the rest, so nothing leaves that tree)."""
        pids, todo = [], [self.host_pid()]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*"):  # a thread's children are its own
                try:
                    todo.extend(int(child) for child in (task / "children").read_text().split())
                except OSError:
                    continue
        return pids

    def wait_healthy(self, timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if not self.state()["State"]["Running"]:
                logs = podman("logs", self.name, check=False)
                raise AssertionError(f"{self.name} stopped: {logs.stdout}{logs.stderr}")
            try:
                status, body = http_get(self.http + "/health")
                if status == 200:
                    health: dict[str, Any] = json.loads(body)
                    return health
                last = status
            except OSError as exc:  # not listening (or slirp4netns not forwarding) yet
                last = exc
            time.sleep(0.2)
        raise AssertionError(f"/health of {self.name} did not answer in {timeout} s: {last}")


@dataclass
class Containers:
    """Starts containers (detached, published on 127.0.0.1) and removes them all at the end."""

    names: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    def start(self, tag: str, *flags: str, env: dict[str, str] | None = None,
              wait: bool = True) -> Container:
        token = secrets.token_hex(16)
        environment = [f"--env={key}={value}"
                       for key, value in {"CCX_TOKEN": token, **(env or {})}.items()]
        for attempt in range(3):  # the free port may be taken before podman binds it
            name = f"ccx-test-{secrets.token_hex(4)}"
            port = free_port()
            self.names.append(name)
            started = podman("run", "-d", "--name", name, *RUN_FLAGS, "--network", "slirp4netns",
                             "-p", f"127.0.0.1:{port}:8003", *environment, *flags, tag,
                             check=False, timeout=120)
            if started.returncode == 0:
                break
            if attempt == 2 or "address already in use" not in started.stderr:
                raise AssertionError(f"podman run {tag} exited {started.returncode}:\n"
                                     f"{started.stderr[-3000:]}")
        container = Container(name, port, token)
        if wait:
            container.wait_healthy()
        return container

    def volume(self) -> str:
        name = f"ccx-test-{secrets.token_hex(4)}"
        self.volumes.append(name)
        return name

    def cleanup(self) -> None:
        for name in self.names:
            podman("rm", "-f", "-v", "-t", "0", name, check=False, timeout=120)
        for name in self.volumes:
            podman("volume", "rm", "-f", name, check=False, timeout=120)


@pytest.fixture(scope="module")
def containers() -> Iterator[Containers]:
    made = Containers()
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture(scope="module")
def server(image: str, containers: Containers) -> Container:
    """One container for the checks that leave it as they found it."""
    return containers.start(image, env={"CCX_KILL_GRACE": str(KILL_GRACE_S)})


async def run_session(container: Container, command: list[str],
                      **options: Any) -> tuple[list[Output], Completed]:
    async with connect(container.url, container.token) as client:
        session = await client.execute(command, **options)
        outputs: list[Output] = []
        completed = None
        async for event in session.events():
            if isinstance(event, Output):
                outputs.append(event)
            elif isinstance(event, Completed):
                completed = event
        assert completed is not None
        return outputs, completed


async def started(session: Any) -> None:
    """Wait for the session's process.started."""
    async with contextlib.aclosing(session.events()) as events:
        async for event in events:
            assert isinstance(event, Started), event
            return


def start_time(pid: int) -> str | None:
    """When *pid* started (field 22 of /proc/PID/stat), None if there is no such process: a
    pid reused by another process on a busy machine does not count as a survivor."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def text(outputs: list[Output]) -> str:
    return b"".join(o.data for o in outputs).decode()


def compose_flags(containers: Containers, binds: dict[str, Path] | None = None) -> list[str]:
    """deploy/compose.yaml's hardening and limits as podman run flags, with fresh named
    volumes, or host folders for the targets in *binds*."""
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed (pip install '.[deploy]')")
    service = yaml.safe_load(COMPOSE.read_text())["services"]["ccx"]
    flags: list[str] = []
    if service.get("read_only"):
        flags.append("--read-only")
    flags += [f"--cap-drop={cap}" for cap in service.get("cap_drop", [])]
    flags += [f"--security-opt={opt}" for opt in service.get("security_opt", [])]
    flags += [f"--tmpfs={path}" for path in service.get("tmpfs", [])]
    if "pids_limit" in service:
        flags.append(f"--pids-limit={service['pids_limit']}")
    flags += [f"--env={key}={value}" for key, value in service.get("environment", {}).items()]
    for volume in service.get("volumes", []):
        source, _, target = volume.partition(":")
        if target in (binds or {}):
            flags.append(f"--volume={(binds or {})[target]}:{target}")
        elif source in ("workspace", "home"):  # named volumes: fresh, as on a first `up`
            flags.append(f"--volume={containers.volume()}:{target}")
    assert {"--read-only", "--cap-drop=ALL"} <= set(flags), flags
    assert any(flag.startswith("--security-opt=no-new-privileges") for flag in flags), flags
    return flags


# ------------------------------------------------------------------------------------ image


def test_image_config(image: str) -> None:
    info = image_info(image)
    config = info["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["/usr/bin/tini", "--"]
    assert config["Cmd"] == ["ccx", "serve"]
    assert "8003/tcp" in config["ExposedPorts"]
    assert "/workspace" in config["Volumes"]
    assert config["WorkingDir"] == "/workspace"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["CCX_HOST"] == "0.0.0.0" and env["CCX_PORT"] == "8003"
    assert env["HOME"] == "/home/ccx" and "CCX_TOKEN" not in env
    # --format docker keeps the HEALTHCHECK (an OCI image would drop it).
    check = info.get("Healthcheck") or {}
    assert "ccx health" in " ".join(check.get("Test", [])), info.get("Healthcheck")
    assert check["Timeout"] == 5 * 10**9 and check["Retries"] == 3


def test_image_size_budget(image: str, base_images: Callable[[str], str]) -> None:
    size = image_info(image)["Size"]
    base = image_info(base_images("python"))["Size"]
    added_mb = (size - base) / 1e6
    assert added_mb < CCX_BUDGET_MB, f"ccx adds {added_mb:.0f} MB to its base"


def test_refuses_to_start_without_token(image: str) -> None:
    done = podman("run", "--rm", *RUN_FLAGS, "--network", "none", image, check=False,
                  timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "refusing to bind 0.0.0.0 without CCX_TOKEN" in done.stderr


# ----------------------------------------------------------------------- a running server


def test_health_and_healthcheck(server: Container) -> None:
    health = server.wait_healthy()
    assert health["status"] == "ok"
    check = podman("healthcheck", "run", server.name, check=False, timeout=60)
    assert check.returncode == 0, (check.stdout, check.stderr)


def test_healthcheck_catches_a_stopped_server(server: Container) -> None:
    """A SIGSTOPped ccx fails the HEALTHCHECK with ccx's own message: `ccx health` gives up
    (3 s) before the runtime's 5 s timeout would kill it."""
    pids = server.processes()
    ccx_pid = pids[1]  # tini's only child
    assert "ccx" in Path(f"/proc/{ccx_pid}/cmdline").read_text()
    os.kill(ccx_pid, signal.SIGSTOP)
    try:
        check = podman("healthcheck", "run", server.name, check=False, timeout=60)
    finally:
        os.kill(ccx_pid, signal.SIGCONT)
    assert check.returncode == 1 and "unhealthy" in check.stdout, (check.stdout, check.stderr)
    state = server.state()["State"]
    last = (state.get("Health") or state.get("Healthcheck"))["Log"][-1]
    assert last["ExitCode"] == 1, last
    assert "ccx health:" in last["Output"] and "timed out" in last["Output"], last
    server.wait_healthy()
    assert podman("healthcheck", "run", server.name, check=False).returncode == 0


def test_metrics_need_the_token(server: Container) -> None:
    status, _ = http_get(server.http + "/metrics")
    assert status == 401
    status, body = http_get(server.http + "/metrics",
                            {"Authorization": f"Bearer {server.token}"})
    assert status == 200 and b"ccx_sessions" in body


async def test_session_streams_through_the_published_port(server: Container) -> None:
    script = "for i in 1 2 3; do echo line $i; sleep 0.3; done"
    async with connect(server.url, server.token) as client:
        session = await client.execute(["sh", "-c", script])
        events = [event async for event in session.events()]
    assert isinstance(events[0], Started)
    outputs = [e for e in events if isinstance(e, Output)]
    assert isinstance(events[-1], Completed) and events[-1].status == "exited"
    assert events[-1].exit_code == 0
    assert len(outputs) >= 2, "output came in one piece, not streamed"  # 0.3 s apart
    assert text(outputs) == "line 1\nline 2\nline 3\n"


def test_ccx_run_cli_through_the_published_port(server: Container) -> None:
    env = {**os.environ, "CCX_TOKEN": server.token}
    done = subprocess.run([CCX, "run", "--url", server.url, "--", "sh", "-c",
                           "echo hello from $(id -u) in $PWD; exit 3"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout == f"hello from {UID} in /workspace\n"


async def test_pid1_is_tini_and_nothing_runs_as_root(server: Container) -> None:
    async with connect(server.url, server.token) as client:
        session = await client.execute(["sleep", "60"])
        await started(session)
        pids = server.processes()
        statuses = {pid: Path(f"/proc/{pid}/status").read_text() for pid in pids}
        commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
                    for pid in pids}
        top = podman("top", server.name, "user", "args").stdout
        await session.cancel()
        await session.wait()
    assert commands[pids[0]] == b"/usr/bin/tini", commands
    assert b"sleep" in commands.values() and len(pids) >= 3, commands  # tini, ccx, sleep
    for pid, status in statuses.items():
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert uids == [str(UID)] * 4, (pid, status)
    assert "root" not in top, top


async def test_token_is_not_in_sessions_environment(server: Container) -> None:
    outputs, completed = await run_session(server, ["env"])
    env = text(outputs)
    assert completed.exit_code == 0
    assert "HOME=/home/ccx" in env
    assert "CCX_TOKEN" not in env and server.token not in env


# ------------------------------------------------------------------------------------ stop


async def test_podman_stop_cancels_sessions(image: str, containers: Containers) -> None:
    """`podman stop`: ccx cancels every session (each client gets process.completed with
    status "cancelled"), exits 0 within kill grace + 2 s, and no process is left.

    What `ccx run` exits with on such a cancellation (README): 128+N of the signal that ended
    the job, 143 for a command that SIGTERM ends, 137 for one that needed SIGKILL, and 143 too
    for one that handles SIGTERM and exits 0 (a cancelled job never reports success); each
    says on stderr that the session was cancelled, with reason "shutdown".
    """
    box = containers.start(image, env={"CCX_KILL_GRACE": str(KILL_GRACE_S)})
    env = {**os.environ, "CCX_TOKEN": box.token}
    commands = [
        (143, "echo ready; exec sleep 600"),
        (143, "trap 'exit 0' TERM; echo ready; while :; do sleep 0.1; done"),
        (137, "trap '' TERM; echo ready; while :; do sleep 0.1; done"),
    ]
    runs = [(code, script, subprocess.Popen([CCX, "run", "--url", box.url, "--", "sh", "-c",
                                             script], stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, env=env))
            for code, script in commands]
    try:
        for _, _, run in runs:
            assert run.stdout is not None
            line = await trio.to_thread.run_sync(run.stdout.readline)
            assert line == b"ready\n", (line, run.stderr.read() if run.stderr else "")
        async with connect(box.url, box.token) as client:
            session = await client.execute(["sleep", "600"])
            await started(session)
            running = [s for s in await client.sessions() if s["status"] == "running"]
            assert len(running) == 4, running
            before = {pid: start_time(pid) for pid in box.processes()}
            stopping = time.monotonic()
            stop = await trio.run_process(["podman", "stop", "-t", "30", box.name],
                                          capture_stdout=True, capture_stderr=True)
            elapsed = time.monotonic() - stopping
            completed = session.result or await session.wait()
        assert completed.status == "cancelled", completed
        assert stop.returncode == 0, stop.stderr
        assert box.state()["State"]["ExitCode"] == 0
        assert elapsed < 30, f"podman stop took {elapsed:.1f} s: it had to SIGKILL"
        for code, script, run in runs:
            returncode = await trio.to_thread.run_sync(lambda run=run: run.wait(30))
            err = run.stderr.read() if run.stderr else b""
            assert returncode == code, (script, returncode, err)
            assert b"was cancelled (reason: shutdown)" in err, (script, err)
        left = [pid for pid, started_at in before.items() if start_time(pid) == started_at]
        assert len(before) >= 6 and not left, f"still on the host after the stop: {left}"
    finally:
        for _, _, run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()


# --------------------------------------------------------------------------------- compose


async def test_compose_hardening(image: str, containers: Containers) -> None:
    """compose.yaml's read-only root, no capabilities, no-new-privileges, tmpfs and volumes:
    the server runs, sessions write the volumes, the root file system refuses writes."""
    box = containers.start(image, *compose_flags(containers))
    script = ("grep -E '^(CapEff|CapPrm|NoNewPrivs)' /proc/self/status; "
              "touch /workspace/w $HOME/.claude.json /tmp/t && mkdir -p $HOME/.claude "
              "&& echo writable; touch /etc/x 2>&1 || true")
    outputs, completed = await run_session(box, ["sh", "-c", script])
    out = text(outputs)
    assert completed.exit_code == 0, out
    assert "CapEff:\t0000000000000000" in out and "CapPrm:\t0000000000000000" in out, out
    assert "NoNewPrivs:\t1" in out, out
    assert "writable" in out and "Read-only file system" in out, out
    assert podman("healthcheck", "run", box.name, check=False).returncode == 0


async def test_compose_with_another_uid(image: str, containers: Containers,
                                        tmp_path: Path) -> None:
    """docs/deploy.md's recipe: `user: "1000:1000"` and a host folder on /workspace, the
    named `home` volume as compose makes it. Claude Code must be able to write ~/.claude."""
    project = tmp_path / "project"
    project.mkdir()
    os.chown(project, 1000, 1000)
    box = containers.start(image, *compose_flags(containers, {"/workspace": project}),
                           "--user=1000:1000")
    script = ("id -u; touch $HOME/.claude.json && mkdir -p $HOME/.claude "
              "&& touch $HOME/.claude/settings.json && touch /workspace/made-here && echo ok")
    outputs, completed = await run_session(box, ["sh", "-c", script])
    assert (completed.exit_code, text(outputs)) == (0, "1000\nok\n")
    made = project / "made-here"
    assert (made.stat().st_uid, made.stat().st_gid) == (1000, 1000)


# ----------------------------------------------------------------------------------- claude


async def test_claude_variant_runs_claude(claude_image: str, containers: Containers,
                                          base_images: Callable[[str], str]) -> None:
    size = image_info(claude_image)["Size"]
    added_mb = (size - image_info(base_images("python"))["Size"]) / 1e6
    assert added_mb < CLAUDE_BUDGET_MB, f"the Claude variant adds {added_mb:.0f} MB"
    box = containers.start(claude_image)
    outputs, completed = await run_session(box, ["claude", "--version"])
    assert completed.exit_code == 0 and "(Claude Code)" in text(outputs), text(outputs)
    # One copy of the native binary (the Dockerfile removes the per-platform package).
    outputs, completed = await run_session(
        box, ["sh", "-c", "find / -xdev -type f -size +100M 2>/dev/null | sort"])
    big = text(outputs).split()
    assert big == ["/usr/local/bin/node",
                   "/usr/local/lib/node_modules/@anthropic-ai/claude-code/bin/claude.exe"], big
