"""A multi-node ccx on one host for the cluster tests (PROTOCOL.md 10): N `ccx serve` nodes on
loopback ports, each PID 1 of its own PID namespace (`unshare --pid --fork --mount-proc`, so
`kill -9` of a node takes its children with it, as a pod's end does), with distinct
CCX_NODE_NAME and state directories and CCX_PEERS listing all, behind a real HAProxy (Debian's,
installed by .ci/haproxy) balancing plain round-robin (no routing rules) with a health check
on /ready. `need_haproxy()` skips with one line when HAProxy or unshare cannot be had.

Waits are on the servers' own state (their /health, HAProxy's view of /ready through its
runtime API), never on sleeps.
Docs: https://docs.haproxy.org/2.6/configuration.html  https://docs.haproxy.org/2.6/management.html
      unshare(1)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
from conftest import RawClient

CCX = str(Path(sys.executable).with_name("ccx"))
ROUTING_CFG = Path(__file__).resolve().parent.parent / "deploy" / "routing" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy")
UNSHARE = shutil.which("unshare")
START_TIMEOUT_S = 30.0


def need_haproxy() -> None:
    """Skip the whole calling module, in one line saying why, when the balancer or PID
    namespaces are not available here (call it at module level)."""
    if HAPROXY is None:
        pytest.skip("haproxy not installed (run .ci/haproxy: apt-get install haproxy); "
                    "the multi-node tests need a real balancer", allow_module_level=True)
    if UNSHARE is None or os.geteuid() != 0:
        pytest.skip("the multi-node tests need root and unshare(1) for PID namespaces",
                    allow_module_level=True)


def free_ports(count: int) -> list[int]:
    """*count* distinct free loopback ports (held open together while picked)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _http_status(port: int, path: str) -> int | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                      .encode())
            head = s.recv(64)
        return int(head.split()[1])
    except (OSError, IndexError, ValueError):
        return None


class Node:
    """One `ccx serve`, PID 1 of its own PID namespace."""

    def __init__(self, name: str, port: int, peers: str, base: Path, **env: str) -> None:
        self.name, self.port, self.peers, self.base, self.env = name, port, peers, base, env
        self.log_path = base / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> None:
        """Start (or start again: a new incarnation, same name and port)."""
        assert UNSHARE is not None
        state = self.base / f"state-{self.name}"
        state.mkdir(exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [UNSHARE, "--pid", "--fork", "--mount-proc", CCX, "serve"],
                stdout=log, stderr=log,
                env={**os.environ, "CCX_NODE_NAME": self.name, "CCX_PORT": str(self.port),
                     "CCX_PEERS": self.peers, "CCX_STATE_DIR": str(state),
                     "CCX_KILL_GRACE": "1", "CCX_LOG_FORMAT": "json", "CCX_LOG_LEVEL": "info",
                     **self.env})

    def wait_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while _http_status(self.port, "/health") != 200:
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"node {self.name} did not start: {self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    @property
    def pid(self) -> int:
        """The server's pid in our namespace (the namespace's PID 1: unshare's child)."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            return int(f.read().split()[0])

    def kill9(self) -> None:
        """SIGKILL the namespace's PID 1: the kernel kills everything in the namespace."""
        os.kill(self.pid, signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(timeout=20)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.kill(self.pid, signal.SIGINT)
            self.proc.wait(timeout=10)
        except (OSError, IndexError, ValueError, subprocess.TimeoutExpired):
            try:
                os.kill(self.pid, signal.SIGKILL)
            except (OSError, IndexError, ValueError):
                pass
            self.proc.kill()
            self.proc.wait(timeout=10)


def routing_rules(names: list[str]) -> str:
    """The `?node=` routing lines of deploy/routing/haproxy.cfg (acl, force-persist,
    use-server), for the servers in *names*: the tests run the shipped rules."""
    lines = []
    for line in ROUTING_CFG.read_text().splitlines():
        words = line.split()
        if not words or words[0] not in ("acl", "force-persist", "use-server"):
            continue
        if words[0] == "use-server" and words[1] not in names:
            continue
        lines.append(line)
    assert any(line.split()[0] == "use-server" for line in lines), ROUTING_CFG
    return "\n".join(lines)


class Balancer:
    """HAProxy in front of the nodes: round-robin, health check on /ready; *routed*: plus the
    `?node=` rules of deploy/routing/haproxy.cfg."""

    def __init__(self, nodes: list[Node], base: Path, routed: bool = False) -> None:
        self.nodes = nodes
        self.port = free_ports(1)[0]
        tag = "-routed" if routed else ""
        self.socket_path = str(base / f"haproxy{tag}.sock")
        self.config = base / f"haproxy{tag}.cfg"
        self.log_path = base / f"haproxy{tag}.log"
        servers = "\n".join(f"    server {n.name} 127.0.0.1:{n.port}" for n in nodes)
        if routed:
            servers = routing_rules([n.name for n in nodes]) + "\n" + servers
        self.config.write_text(f"""\
global
    maxconn 4096
    stats socket {self.socket_path} mode 600 level admin

defaults
    mode http
    retries 3
    option redispatch 1
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout check 1s

frontend ccx
    bind 127.0.0.1:{self.port}
    default_backend nodes

backend nodes
    balance roundrobin
    option httpchk
    http-check send meth GET uri /ready ver HTTP/1.1 hdr Host 127.0.0.1
    http-check expect status 200
    default-server check inter 100ms fall 1 rise 1
{servers}
""")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> None:
        assert HAPROXY is not None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)],
                                         stdout=log, stderr=log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def states(self) -> dict[str, str]:
        """Server name -> HAProxy's status of it (UP, DOWN, ...), from its runtime API."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(self.socket_path)
                s.sendall(b"show stat\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return {}
        lines = data.decode().splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        header = lines[0][2:].split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r["status"] for r in rows
                if r.get("pxname") == "nodes" and r["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_states(self, wanted: dict[str, str], timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = self.states()
            if all(states.get(k, "").startswith(v) for k, v in wanted.items()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"HAProxy states {states}, wanted {wanted}")
            time.sleep(0.05)

    async def await_states(self, wanted: dict[str, str]) -> None:
        await trio.to_thread.run_sync(self.wait_states, wanted)


class Fleet:
    """N nodes and a balancer; connections through the balancer or straight to a node."""

    def __init__(self, base: Path, count: int = 3, **env: str) -> None:
        ports = free_ports(count)
        names = [f"ccx-{i}" for i in range(count)]
        peers = ",".join(f"{n}=ws://127.0.0.1:{p}/ws" for n, p in zip(names, ports, strict=True))
        self.nodes: dict[str, Node] = {}
        self.balancer: Balancer | None = None
        try:
            for name, port in zip(names, ports, strict=True):
                self.nodes[name] = Node(name, port, peers, base, **env)
            for node in self.nodes.values():
                node.wait_up()
            self.balancer = Balancer(list(self.nodes.values()), base)
            self.balancer.wait_states({n: "UP" for n in names})
        except BaseException:
            self.close()
            raise

    @property
    def lb(self) -> Balancer:
        assert self.balancer is not None
        return self.balancer

    def close(self) -> None:
        if self.balancer is not None:
            self.balancer.stop()
        for node in self.nodes.values():
            node.stop()

    async def dial(self, nursery: trio.Nursery, port: int | None = None,
                   resource: str = "/ws") -> RawClient:
        ws = await trio_websocket.connect_websocket(
            nursery, "127.0.0.1", port or self.lb.port, resource, use_ssl=False,
            max_message_size=64 * 1024 * 1024)
        return RawClient(ws)

    async def through_balancer(self, nursery: trio.Nursery) -> dict[str, RawClient]:
        """Connections through the balancer until one has landed on every node that is up
        (round-robin: usually one each); name -> connection."""
        landed: dict[str, RawClient] = {}
        wanted = {n for n, s in self.lb.states().items() if s.startswith("UP")}
        for _ in range(6 * len(self.nodes)):
            client = await self.dial(nursery)
            node = (await client.result("server.info"))["node"]
            if node in landed:
                await client.ws.aclose()
            else:
                landed[node] = client
            if set(landed) >= wanted:
                return landed
        raise AssertionError(f"round-robin reached only {sorted(landed)} of {sorted(wanted)}")


def processes_with(marker: str) -> list[int]:
    """Pids (in our namespace) of live processes whose command line contains *marker*."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if marker.encode() in cmdline and stat[stat.rfind(b")") + 2:].split()[0] != b"Z":
            found.append(int(entry))
    return found


def outputs_of(notifications: list[dict[str, Any]], session_id: str) -> list[dict[str, Any]]:
    return [m["params"] for m in notifications
            if m["method"] == "process.output" and m["params"]["session_id"] == session_id]
