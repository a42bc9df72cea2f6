"""The `cluster` workload (PROTOCOL.md 10): quiet sessions over 4 nodes, each attached by id
through a balancer that knows nothing of sessions; and the cost of one forwarding hop.

Run as `python -m bench.cluster [--quick]` (one JSON object on stdout), or through
`bench/run.py --only cluster`. Inputs: this checkout's ccx, 4 `ccx serve` processes on loopback
(CCX_NODE_NAME ccx-0..3, CCX_PEERS listing all) behind Debian's HAProxy balancing round-robin
(no routing rules: every attach that lands on another node than the session's is forwarded).
Outputs:
- `attach`: N `sleep` sessions with linger (N/4 started straight on each node), then each
  attached by id on a fresh connection through HAProxy (ATTACH_WORKERS at a time): success
  rate, how many landed on another node (forwarded), p50/p99 of the attach request (the
  request alone, and connect + attach).
- `hop`: `cat` of a file of lines (utf-8) attached from the start on its own node (direct) and
  from another node (one forwarding hop), read by the same fast client (bench/wsclient.py),
  runs alternated; MB/s of each and the median of the pairwise ratios (goal >= 0.7), with the
  machine's load average (the ratio is only meaningful when the load is low).
Docs: docs/performance.md ("Cluster"); http://docs.haproxy.org/2.6/configuration.html
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
import trio_websocket

from bench.wsclient import WsClient

NODES = 4
ATTACH_WORKERS = 32
SEQUENTIAL = 100  # attaches measured one at a time after the concurrent pass
LINE = b"0123456789" * 9 + b"abcdefghi\n"  # 100 bytes


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_http(port: int, path: str, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                if s.recv(16).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not answer {path}")


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))]


class Rpc:
    """A bare JSON-RPC client: requests in order, notifications counted as they come."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_message(json.dumps({"jsonrpc": "2.0", "id": self.next_id,
                                               "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.get_message())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(message["error"])
                return message["result"]  # type: ignore[no-any-return]


async def _dial(nursery: trio.Nursery, port: int) -> Rpc:
    ws = await trio_websocket.connect_websocket(nursery, "127.0.0.1", port, "/ws",
                                                use_ssl=False, max_message_size=1 << 26)
    return Rpc(ws)


async def attach_all(ports: dict[str, int], lb_port: int, count: int) -> dict[str, Any]:
    ids: list[str] = []
    async with trio.open_nursery() as nursery:
        owners = {name: await _dial(nursery, port) for name, port in ports.items()}
        for i in range(count):
            owner = owners[f"ccx-{i % NODES}"]
            ids.append((await owner.call("execute", command=["sleep", "1000"],
                                         linger=600))["session_id"])
        for owner in owners.values():  # detach them all: they linger
            await owner.ws.aclose()
        nursery.cancel_scope.cancel()
    request_s: list[float] = []
    total_s: list[float] = []
    failures: list[str] = []
    forwarded = 0
    queue = list(ids)

    async def worker() -> None:
        nonlocal forwarded
        while queue:
            session_id = queue.pop()
            try:
                async with trio.open_nursery() as nursery:
                    t0 = time.perf_counter()
                    rpc = await _dial(nursery, lb_port)
                    t1 = time.perf_counter()
                    result = await rpc.call("attach", session_id=session_id)
                    t2 = time.perf_counter()
                    assert result["session_id"] == session_id
                    request_s.append(t2 - t1)
                    total_s.append(t2 - t0)
                    info = await rpc.call("server.info")
                    forwarded += info["node"] != session_id.split(".")[0]
                    await rpc.ws.aclose()
                    nursery.cancel_scope.cancel()
            except Exception as exc:  # a failure is a result here: counted, reported
                failures.append(f"{session_id}: {exc!r}")

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(ATTACH_WORKERS):
            nursery.start_soon(worker)
    wall_s = time.perf_counter() - started
    concurrent_request_s, concurrent_total_s = request_s[:], total_s[:]
    # Then one at a time (a latency without queueing), a sample of SEQUENTIAL of them.
    request_s.clear()
    total_s.clear()
    queue.extend(ids[:SEQUENTIAL])
    await worker()
    alone = {"attach_alone_p50_ms": _percentile(request_s, 0.5) * 1000,
             "attach_alone_p99_ms": _percentile(request_s, 0.99) * 1000,
             "connect_attach_alone_p50_ms": _percentile(total_s, 0.5) * 1000}
    request_s[:], total_s[:] = concurrent_request_s, concurrent_total_s
    return {**alone, "sessions": count, "attached": len(request_s),
            "success_rate": len(request_s) / count, "forwarded": forwarded,
            "attach_p50_ms": _percentile(request_s, 0.5) * 1000,
            "attach_p99_ms": _percentile(request_s, 0.99) * 1000,
            "connect_attach_p50_ms": _percentile(total_s, 0.5) * 1000,
            "connect_attach_p99_ms": _percentile(total_s, 0.99) * 1000,
            "wall_s": wall_s, "failures": failures[:5]}


def _call(client: WsClient, method: str, params: dict[str, Any],
          seen: list[dict[str, Any]]) -> dict[str, Any]:
    """One request on the fast blocking client; notifications met meanwhile go to *seen*."""
    client.send_text(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                                 "params": params}))
    reply: dict[str, Any] | None = None
    while reply is None:
        if not client.receive_into_buffer():
            raise RuntimeError(f"connection closed during {method}")
        for _, payload in client.messages():  # run to its end: the views must be released
            message = json.loads(bytes(payload))
            if "method" in message:
                seen.append(message)
            else:
                reply = message
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return reply["result"]  # type: ignore[no-any-return]


def stream_through(owner_port: int, reader_port: int, path: str) -> dict[str, Any]:
    """`cat` of *path* on the owner node, read from the start by a connection to
    *reader_port* (the same node: direct; another: one hop), with the benchmark's fast
    reader (bench/wsclient.py, so the reader is not what is measured). MB/s from the go
    to the completion; every seq checked."""
    seen: list[dict[str, Any]] = []
    owner = WsClient(f"ws://127.0.0.1:{owner_port}/ws")
    session_id = _call(owner, "execute", {"command": ["sh", "-c", f"read x; cat {path}"],
                                          "stdin": True, "linger": 60}, seen)["session_id"]
    reader = WsClient(f"ws://127.0.0.1:{reader_port}/ws")
    _call(reader, "attach", {"session_id": session_id}, seen)
    owner.close()
    t0 = time.perf_counter()
    _call(reader, "input", {"session_id": session_id, "data": "go\n"}, seen)
    received = seq = 0
    done = False

    def take(message: dict[str, Any]) -> None:
        nonlocal received, seq, done
        if message.get("method") == "process.output":
            assert message["params"]["seq"] == seq, (message["params"]["seq"], seq)
            seq += 1
            received += len(message["params"]["data"])
        elif message.get("method") == "process.completed":
            done = True

    for message in seen:
        take(message)
    while not done:
        if not reader.receive_into_buffer():
            raise RuntimeError("connection closed before the completion")
        for _, payload in reader.messages():
            take(json.loads(bytes(payload)))
    elapsed = time.perf_counter() - t0
    reader.close()
    return {"bytes": received, "seconds": elapsed, "mb_s": received / elapsed / 1e6}


def run(quick: bool) -> dict[str, Any]:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        return {"skipped": "haproxy not installed (bash .ci/haproxy)"}
    count = 200 if quick else 1000
    lines_mb = 20 if quick else 100
    runs = 1 if quick else 5
    ccx = str(Path(sys.executable).with_name("ccx"))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "lines"
        with open(data, "wb") as f:
            f.write(LINE * (lines_mb * 10_000))
        *node_ports, lb_port = _free_ports(NODES + 1)
        names = [f"ccx-{i}" for i in range(NODES)]
        ports = dict(zip(names, node_ports, strict=True))
        peers = ",".join(f"{n}=ws://127.0.0.1:{p}/ws" for n, p in ports.items())
        per_node = str(count // NODES + 10)
        procs = []
        log = open(Path(tmp) / "nodes.log", "ab")  # noqa: SIM115 - closed below
        try:
            for name, port in ports.items():
                env = {**os.environ, "CCX_NODE_NAME": name, "CCX_PORT": str(port),
                       "CCX_PEERS": peers, "CCX_STATE_DIR": "", "CCX_LOG_LEVEL": "warning",
                       "CCX_MAX_SESSIONS": per_node, "CCX_MAX_SESSIONS_PER_CONNECTION": per_node,
                       "CCX_KILL_GRACE": "1"}
                procs.append(subprocess.Popen([ccx, "serve"], env=env, stdout=log, stderr=log))
            for port in ports.values():
                _wait_http(port, "/ready")
            config = Path(tmp) / "haproxy.cfg"
            servers = "\n".join(f"    server {n} 127.0.0.1:{p} check inter 500ms"
                                for n, p in ports.items())
            config.write_text(
                "global\n    maxconn 8000\ndefaults\n    mode http\n    timeout connect 5s\n"
                "    timeout client 1h\n    timeout server 1h\n    timeout tunnel 1h\n"
                f"frontend ccx\n    bind 127.0.0.1:{lb_port}\n    default_backend nodes\n"
                "backend nodes\n    balance roundrobin\n    option httpchk\n"
                "    http-check send meth GET uri /ready ver HTTP/1.1 hdr Host 127.0.0.1\n"
                f"{servers}\n")
            procs.append(subprocess.Popen([haproxy, "-db", "-f", str(config)],
                                          stdout=log, stderr=log))
            try:
                _wait_http(lb_port, "/health")
            except RuntimeError:
                raise RuntimeError((Path(tmp) / "nodes.log").read_text()[-3000:]) from None
            result: dict[str, Any] = {"nodes": NODES}
            result["attach"] = trio.run(attach_all, ports, lb_port, count)
            direct, hop = [], []
            for _ in range(runs):  # alternated, so both see the same machine load
                direct.append(stream_through(ports["ccx-0"], ports["ccx-0"], str(data)))
                hop.append(stream_through(ports["ccx-0"], ports["ccx-1"], str(data)))
            # Each hop run right after its direct run: their ratio sees about the same machine
            # load; the median of those ratios is what is reported.
            ratios = sorted(h["mb_s"] / d["mb_s"] for d, h in zip(direct, hop, strict=True))
            result["hop"] = {"bytes": direct[0]["bytes"], "runs": runs,
                             "direct_mb_s": [round(r["mb_s"], 1) for r in direct],
                             "hop_mb_s": [round(r["mb_s"], 1) for r in hop],
                             "ratio": ratios[len(ratios) // 2],
                             "load_average": os.getloadavg()[0]}
            return result
        finally:
            for proc in procs:
                proc.send_signal(2)  # SIGINT: ccx cancels its sessions; haproxy stops
            for proc in procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
