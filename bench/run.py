"""Benchmark runner: ccx side by side with websocketd and a raw pipe, in one run.

Usage: `nox -s bench` (or `python -m bench.run [--quick] [--baseline REV] [--only W,...]`).
Inputs: this checkout's `ccx` (run as a separate `ccx serve` process, as deployed); the ccx
of git revision `--baseline` (default `main`), exported to a temp dir and run the same way
as `ccx-before` when it differs, so hot-path changes show before/after in the same run;
`websocketd` (Debian package) serving the same command; the raw pipe read directly.
Every peer is read by the same client code (`bench/reader.py`, a separate process).
Outputs: `bench/results.json` (every measurement and the goals), a Markdown table on
stdout, `bench/firehose.png` (throughput and server RSS over time, slow reader).
Server RSS is VmRSS from /proc/PID/status, sampled every 50 ms (children not included).
Docs: docs/performance.md; issue 6; http://websocketd.com/
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DATA = BENCH / ".data"  # generated inputs and server logs (git-ignored)
MB = 1e6  # throughput unit: 10^6 bytes per second
MIB = 1 << 20
RSS_SAMPLE_S = 0.05
SERVER_ENV = {  # the bench raises the session limits so 500 concurrent sessions are allowed
    "CCX_MAX_SESSIONS": "1000",
    "CCX_MAX_SESSIONS_PER_CONNECTION": "1000",
    "CCX_LOG_LEVEL": "warning",
}


@attrs.frozen
class Sizes:
    lines_bytes: int
    small_lines: int
    binary_bytes: int
    firehose_s: float
    firehose_rate: float
    control_tries: int
    short_sessions: int
    stream_sessions: int
    stream_bytes: int
    spawn_tries: int
    memory_sessions: int
    memory_bytes: int
    connections: int = 10


FULL = Sizes(lines_bytes=100_000_000, small_lines=3_000_000, binary_bytes=256 * MIB,
             firehose_s=30.0, firehose_rate=10 * MB, control_tries=200, short_sessions=500,
             stream_sessions=50, stream_bytes=10_000_000, spawn_tries=300,
             memory_sessions=500, memory_bytes=20_000_000)
QUICK = Sizes(lines_bytes=20_000_000, small_lines=300_000, binary_bytes=32 * MIB,
              firehose_s=5.0, firehose_rate=10 * MB, control_tries=30, short_sessions=100,
              stream_sessions=10, stream_bytes=2_000_000, spawn_tries=40,
              memory_sessions=50, memory_bytes=2_000_000)


# ------------------------------------------------------------------------------ inputs


def make_lines(path: Path, size: int) -> None:
    """~600-byte JSON lines shaped like Claude Code `stream-json`, some non-ASCII text."""
    import random

    rng = random.Random(6)
    words = ["the", "tool", "result", "file", "read", "edit", "bash", "output", "assistant",
             "message", "content", "text", "function", "returns", "value", "error", "line",
             "test", "passed", "café", "→", "“quoted”"]
    written = 0
    with path.open("w", encoding="utf-8") as out:
        while written < size:
            text = " ".join(rng.choice(words) for _ in range(75))
            line = json.dumps({"type": "assistant", "message": {
                "id": f"msg_{written:012d}", "role": "assistant",
                "content": [{"type": "text", "text": text}]},
                "session_id": "5f1c2a9e-bench"}, ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line.encode())


def prepare_inputs(sizes: Sizes) -> dict[str, Path]:
    DATA.mkdir(parents=True, exist_ok=True)
    lines = DATA / f"lines-{sizes.lines_bytes}.jsonl"
    if not lines.exists():
        make_lines(lines, sizes.lines_bytes)
    binary = DATA / f"random-{sizes.binary_bytes}.bin"
    if not binary.exists():
        with binary.open("wb") as out:
            for _ in range(sizes.binary_bytes // MIB):
                out.write(os.urandom(MIB))
    return {"lines": lines, "binary": binary}


def seq_bytes(last: int) -> int:
    """Bytes of `seq 1 LAST` output."""
    total, digits, low = 0, 1, 1
    while low <= last:
        high = min(last, low * 10 - 1)
        total += (high - low + 1) * (digits + 1)
        digits, low = digits + 1, low * 10
    return total


def seq_prefix_ok(received: int, tail: str) -> bool:
    """True if *received* bytes ending in *tail* are exactly a prefix of `seq 1 N` output."""
    if "\n" not in tail:
        return received == 0
    complete, partial = tail.rsplit("\n", 1)
    last = int(complete.rsplit("\n", 1)[-1])
    return received == seq_bytes(last) + len(partial) and str(last + 1).startswith(partial)


# ------------------------------------------------------------------------------ peers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples a process's VmRSS every 50 ms in a thread: `(monotonic, bytes)` pairs."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while self.pid is not None and not self._stop.is_set():
            self.samples.append((time.monotonic(), rss_bytes(self.pid)))
            self._stop.wait(RSS_SAMPLE_S)

    def __enter__(self) -> RssSampler:
        if self.pid is not None:
            self.samples.append((time.monotonic(), rss_bytes(self.pid)))
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max((b for _, b in self.samples), default=0)

    @property
    def start(self) -> int:
        return self.samples[0][1] if self.samples else 0


def wait_http(port: int, path: str, process: subprocess.Popen[bytes],
              deadline_s: float = 15.0) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening "
                               f"(see {DATA}/*.log)")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@attrs.define
class Peer:
    name: str
    kind: str  # "ccx", "websocketd" or "pipe"
    pythonpath: str | None = None  # for ccx-before: the exported baseline package


@contextmanager
def running_server(peer: Peer, argv: list[str] | None = None, binary: bool = False,
                   env_extra: dict[str, str] | None = None,
                   ) -> Iterator[tuple[str | None, int | None]]:
    """Start a fresh server for one measurement; yield (url, pid). Pipe: (None, None)."""
    if peer.kind == "pipe":
        yield None, None
        return
    port = free_port()
    log = (DATA / f"{peer.name}.log").open("ab")
    env = dict(os.environ)
    if peer.kind == "ccx":
        env.update(SERVER_ENV)
        env.update(env_extra or {})
        if peer.pythonpath:
            env["PYTHONPATH"] = peer.pythonpath
        command = [sys.executable, "-c", "import sys; from ccx.cli import main; "
                   "sys.exit(main(sys.argv[1:]))", "serve", "--port", str(port)]
        url = f"ws://127.0.0.1:{port}/ws"
    else:
        assert argv is not None
        command = ["websocketd", f"--port={port}", "--address=127.0.0.1",
                   "--loglevel=error", *(["--binary"] if binary else []), *argv]
        url = f"ws://127.0.0.1:{port}/"
    process = subprocess.Popen(command, env=env, stdout=log, stderr=log, cwd=DATA)
    try:
        wait_http(port, "/health" if peer.kind == "ccx" else "/nothing", process)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def run_readers(specs: list[dict[str, Any]], timeout_s: float = 600) -> list[dict[str, Any]]:
    """Start one reader process per spec (lined up on a common start instant); results."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        start_at = time.monotonic() + (0.3 if len(specs) > 1 else 0.0)
        processes = []
        for index, spec in enumerate(specs):
            spec = {**spec, "out": f"{tmp}/{index}.json", "start_at": start_at}
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "bench.reader", json.dumps(spec)], cwd=ROOT))
        for process in processes:
            if process.wait(timeout=timeout_s) != 0:
                raise RuntimeError(f"reader failed with {process.returncode}")
        for index in range(len(specs)):
            with open(f"{tmp}/{index}.json") as result:
                results.append(json.load(result))
    return results


def stream_spec(peer: Peer, url: str | None, argv: list[str], **extra: Any) -> dict[str, Any]:
    if peer.kind == "ccx":
        return {"kind": "ccx", "url": url, "commands": [argv], **extra}
    if peer.kind == "websocketd":
        return {"kind": "websocketd", "url": url, "connections": 1, **extra}
    return {"kind": "pipe", "commands": [argv], **extra}


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


# ------------------------------------------------------------------------------ workloads


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process *pid* has used (/proc/PID/stat), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stream_once(peer: Peer, argv: list[str], expected: int | None, *, encoding: str = "utf-8",
                binary: bool = False, rate: float | None = None,
                duration: float | None = None) -> dict[str, Any]:
    """One streaming measurement: throughput, server RSS, and a loss check."""
    with running_server(peer, argv, binary) as (url, pid):
        extra: dict[str, Any] = {"rate": rate, "duration": duration}
        if peer.kind == "ccx":
            extra["encoding"] = encoding
        if peer.kind == "websocketd":
            extra["binary"] = binary
        with RssSampler(pid) as rss:
            [result] = run_readers([stream_spec(peer, url, argv, **extra)])
        cpu_s = cpu_seconds(pid) if pid else None
    session = result["sessions"][0]
    elapsed = session["t1"] - session["t0"] if session["t1"] else float("nan")
    out = {"peer": peer.name, "bytes": session["bytes"], "frames": session["frames"],
           "seconds": elapsed, "mb_s": session["bytes"] / elapsed / MB,
           "seq_errors": session["seq_errors"], "error": session["error"],
           "rss_start": rss.start, "rss_peak": rss.peak,
           "rss_growth": rss.peak - rss.start if pid else None,
           "complete": expected is None or session["bytes"] == expected,
           "rss_samples": rss.samples, "progress": result["progress"],
           "tail": session["tail"], "completed": session["completed"],
           # the server's own CPU time for the whole run (start-up included): steadier than
           # wall clock on a shared host, where other load stretches `seconds`
           "server_cpu_s": cpu_s}
    if peer.kind == "ccx" and session["completed"]:
        out["server_counted"] = session["completed"]["stdout_bytes"]
    return out


def workload_throughput(name: str, peers: list[Peer], argv: list[str], expected: int,
                        binary: bool = False) -> list[dict[str, Any]]:
    rows = []
    for peer in peers:
        row = stream_once(peer, argv, expected, encoding="base64" if binary else "utf-8",
                          binary=binary)
        row.pop("rss_samples")
        row.pop("progress")
        rows.append(row)
        cpu = "" if row["server_cpu_s"] is None else f"  server CPU {row['server_cpu_s']:.2f} s"
        print(f"  {name:<12} {peer.name:<11} {row['mb_s']:8.1f} MB/s  "
              f"{row['bytes']} bytes  complete={row['complete']}{cpu}", file=sys.stderr)
    return rows


def workload_firehose(peers: list[Peer], sizes: Sizes) -> list[dict[str, Any]]:
    argv = ["seq", "1", "100000000000"]  # effectively endless; checkable (seq_prefix_ok)
    rows = []
    for peer in peers:
        row = stream_once(peer, argv, None, rate=sizes.firehose_rate,
                          duration=sizes.firehose_s)
        row["no_loss"] = seq_prefix_ok(row["bytes"], row["tail"]) and not row["seq_errors"]
        if "server_counted" in row:
            row["no_loss"] = row["no_loss"] and row["server_counted"] == row["bytes"]
        rows.append(row)
        growth = row["rss_growth"]
        print(f"  firehose     {peer.name:<11} {row['bytes'] / MB:8.1f} MB read  "
              f"rss growth {growth / MIB if growth is not None else 0:.1f} MiB  "
              f"no_loss={row['no_loss']}", file=sys.stderr)
    return rows


def workload_control(peer: Peer, sizes: Sizes) -> dict[str, Any]:
    with running_server(peer) as (url, _):
        [result] = run_readers([{"kind": "control", "url": url, "tries": sizes.control_tries}])
    summary: dict[str, Any] = {"peer": peer.name, "tries": sizes.control_tries,
                               "members": result["members"],
                               "cancel_statuses": result["cancel_statuses"]}
    for key in ("pause_seen_s", "pause_reply_s", "resume_reply_s", "cancel_completed_s"):
        values = result[key]
        summary[key] = {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99),
                        "max": max(values)}
    print(f"  control      {peer.name:<11} pause p99 "
          f"{summary['pause_seen_s']['p99'] * 1e3:.2f} ms  cancel p99 "
          f"{summary['cancel_completed_s']['p99'] * 1e3:.2f} ms", file=sys.stderr)
    return summary


def _spread(count: int, parts: int) -> list[int]:
    return [count // parts + (1 if i < count % parts else 0) for i in range(parts)]


def concurrent_specs(peer: Peer, url: str | None, argv: list[str], count: int,
                     connections: int) -> list[dict[str, Any]]:
    specs = []
    for share in _spread(count, connections):
        if peer.kind == "ccx":
            specs.append({"kind": "ccx", "url": url, "commands": [argv] * share})
        elif peer.kind == "websocketd":
            specs.append({"kind": "websocketd", "url": url, "connections": share})
        else:
            specs.append({"kind": "pipe", "commands": [argv] * share})
    return specs


def workload_concurrency(peers: list[Peer], sizes: Sizes, lines: Path) -> list[dict[str, Any]]:
    rows = []
    with lines.open("rb") as source:  # whole lines, so websocketd's count is exact too
        head = source.read(sizes.stream_bytes)
    line_count = head.count(b"\n")
    stream_bytes = len(head[: head.rindex(b"\n") + 1])
    cases = (("short", ["echo", "hello"], sizes.short_sessions, 6),
             ("streaming", ["head", "-n", str(line_count), str(lines)],
              sizes.stream_sessions, stream_bytes))
    for case, argv, count, expected in cases:
        for peer in peers:
            with running_server(peer, argv) as (url, pid), RssSampler(pid) as rss:
                results = run_readers(concurrent_specs(peer, url, argv, count,
                                                       sizes.connections))
            sessions = [s for r in results for s in r["sessions"]]
            failures = [s for s in sessions if s["error"] or s["t1"] is None
                        or s["bytes"] != expected
                        or (s["completed"] or {}).get("exit_code") not in (0, None)]
            t0 = min(s["t0"] for s in sessions)
            t1 = max(s["t1"] or s["t0"] for s in sessions)
            latencies = [s["t1"] - s["t0"] for s in sessions if s["t1"]]
            row = {"case": case, "peer": peer.name, "sessions": len(sessions),
                   "failures": len(failures), "wall_s": t1 - t0,
                   "sessions_per_s": len(sessions) / (t1 - t0),
                   "p99_completion_s": percentile(latencies, 0.99),
                   "aggregate_mb_s": sum(s["bytes"] for s in sessions) / (t1 - t0) / MB,
                   "rss_peak": rss.peak if pid else None,
                   "failure_examples": [f["error"] for f in failures[:3]]}
            rows.append(row)
            print(f"  concurrency  {case:<9} {peer.name:<11} {row['sessions_per_s']:8.1f}/s "
                  f"{row['aggregate_mb_s']:8.1f} MB/s failures={row['failures']}",
                  file=sys.stderr)
    return rows


class DiskSampler:
    """Sums the sizes of the files under a directory every 0.5 s in a thread (the spool)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def size(self) -> int:
        from ccx.spool import tree_bytes

        return tree_bytes(str(self.path))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.size())
            self._stop.wait(0.5)

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _memory_step(mode: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one `bench.memory` client process; its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", "bench.memory", mode,
                        json.dumps({**spec, "out": out.name})], cwd=ROOT, check=True,
                       timeout=3600)
        return json.loads(Path(out.name).read_text())  # type: ignore[no-any-return]


def _wait_throttled(url: str, count: int) -> float:
    """Poll `sessions` until the sessions' output stops growing (every child is throttled
    or done); return the total stdout bytes read by then."""
    from bench.memory import Conn

    conn = Conn(url)
    last = -1
    while True:
        request_id = conn.call("sessions", {})
        reply = None
        while reply is None:
            reply = next((m for m in conn.pull() if m.get("id") == request_id), None)
        infos = reply["result"]["sessions"]
        total = sum(i["stdout_bytes"] for i in infos)
        if len(infos) >= count and total == last and all(i["stdout_bytes"] for i in infos):
            conn.ws.close()
            return float(total)
        last = total
        time.sleep(2.0)


def workload_memory(peer: Peer, sizes: Sizes, lines: Path) -> dict[str, Any]:
    """`memory_sessions` sessions each write `memory_bytes` of stream-json lines with no
    reader (detached, lingering): each holds its unsent budget and is throttled; then each
    is attached (since_seq -1) and read to its end. Server RSS, spool size, bytes lost."""
    with lines.open("rb") as source:
        head = source.read(sizes.memory_bytes)
    line_count = head.count(b"\n")
    expected = len(head[: head.rindex(b"\n") + 1])
    delay = 3 + sizes.memory_sessions // 100  # every session started before any writes
    argv = ["sh", "-c", f"sleep {delay}; exec head -n {line_count} {lines}"]
    state = Path(tempfile.mkdtemp(prefix="memory-state-", dir=DATA))
    os.chmod(state, 0o700)
    spool = state / "spool"
    try:
        with running_server(peer, env_extra={"CCX_STATE_DIR": str(state)}) as (url, pid), \
                RssSampler(pid) as rss, DiskSampler(spool) as disk:
            assert url is not None
            t0 = time.monotonic()
            started = _memory_step("start", {"url": url, "argv": argv,
                                             "count": sizes.memory_sessions,
                                             "connections": sizes.connections})
            ids = started["session_ids"]
            held_total = _wait_throttled(url, len(ids))
            t1 = time.monotonic()
            rss_detached, disk_detached = rss.peak, max(disk.peak, disk.size())
            shares = [ids[i::sizes.connections] for i in range(sizes.connections)]
            with tempfile.TemporaryDirectory() as tmp:
                processes = []
                for index, share in enumerate(shares):
                    spec = {"url": url, "session_ids": share, "out": f"{tmp}/{index}.json"}
                    processes.append(subprocess.Popen(
                        [sys.executable, "-m", "bench.memory", "read", json.dumps(spec)],
                        cwd=ROOT))
                for process in processes:
                    if process.wait(timeout=3600) != 0:
                        raise RuntimeError(f"memory reader failed: {process.returncode}")
                tallies: dict[str, Any] = {}
                for index in range(len(shares)):
                    tallies.update(json.loads(Path(f"{tmp}/{index}.json").read_text())
                                   ["sessions"])
            t2 = time.monotonic()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    received = sum(t["bytes"] for t in tallies.values())
    failures = [sid for sid, t in tallies.items()
                if t["error"] or t["gaps"] or t["bytes"] != expected
                or (t["completed"] or {}).get("exit_code") != 0]
    row = {"peer": peer.name, "sessions": len(ids), "refused": len(started["errors"]),
           "bytes_per_session": expected, "held_while_detached": held_total,
           "rss_start": rss.start, "rss_peak_detached": rss_detached, "rss_peak": rss.peak,
           "spool_peak": max(disk.peak, disk_detached), "received": received,
           "bytes_lost": len(ids) * expected - received, "failures": len(failures),
           "detached_s": t1 - t0, "read_back_s": t2 - t1,
           "read_back_mb_s": received / (t2 - t1) / MB,
           "failure_examples": [tallies[sid] for sid in failures[:3]]}
    print(f"  memory {peer.name}: {len(ids)} sessions, RSS peak {rss.peak / MIB:.0f} MiB, "
          f"spool peak {row['spool_peak'] / MIB:.0f} MiB, lost {row['bytes_lost']}, "
          f"failures {len(failures)}", file=sys.stderr)
    return row


def workload_spawn(peers: list[Peer], sizes: Sizes) -> list[dict[str, Any]]:
    rows = []
    for peer in [*peers, Peer("subprocess.run", "subprocess")]:
        if peer.kind == "pipe":
            continue
        if peer.kind == "subprocess":
            [result] = run_readers([{"kind": "spawn_subprocess", "tries": sizes.spawn_tries}])
            rate = sizes.spawn_tries / (result["t1"] - result["t0"])
        else:
            with running_server(peer, ["true"]) as (url, _):
                if peer.kind == "ccx":
                    [result] = run_readers([{"kind": "spawn_ccx", "url": url,
                                             "commands": [["true"]] * sizes.spawn_tries}])
                    sessions = result["sessions"]
                    rate = len(sessions) / (sessions[-1]["t1"] - sessions[0]["t0"])
                else:
                    [result] = run_readers([{"kind": "spawn_websocketd", "url": url,
                                             "tries": sizes.spawn_tries}])
                    rate = sizes.spawn_tries / (result["t1"] - result["t0"])
        rows.append({"peer": peer.name, "sessions_per_s": rate})
        print(f"  spawn        {peer.name:<14} {rate:8.1f} sessions/s", file=sys.stderr)
    return rows


def workload_client_alone(sizes: Sizes, lines: Path) -> dict[str, Any]:
    """The reader against a peer that only replays pre-built frames: its own ceiling."""
    out: dict[str, Any] = {}
    for mode, total in (("ccx", sizes.lines_bytes), ("lines", sizes.small_lines * 8)):
        with tempfile.TemporaryDirectory() as tmp:
            port_file = Path(tmp) / "port"
            server = subprocess.Popen([sys.executable, "-m", "bench.fakeserver", mode,
                                       str(port_file), str(total), str(lines)], cwd=ROOT)
            while not port_file.exists() or not port_file.read_text():
                time.sleep(0.01)
            url = f"ws://127.0.0.1:{port_file.read_text()}/ws"
            spec = ({"kind": "ccx", "url": url, "commands": [["fake"]]} if mode == "ccx"
                    else {"kind": "websocketd", "url": url, "connections": 1})
            [result] = run_readers([spec])
            server.wait(timeout=30)
        session = result["sessions"][0]
        elapsed = session["t1"] - session["t0"]
        out[mode] = {"mb_s": session["bytes"] / elapsed / MB,
                     "frames_per_s": session["frames"] / elapsed, "bytes": session["bytes"]}
        print(f"  client alone {mode:<11} {out[mode]['mb_s']:8.1f} MB/s "
              f"{out[mode]['frames_per_s']:10.0f} frames/s", file=sys.stderr)
    return out


# ------------------------------------------------------------------------------ set-up


def ensure_websocketd() -> str | None:
    """Path of websocketd, installing the Debian package if missing; None (and why) if not."""
    found = shutil.which("websocketd")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        print("websocketd: not installed and no apt-get here: skipping that peer",
              file=sys.stderr)
        return None
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    done = subprocess.run([*sudo, apt, "install", "-y", "websocketd"], capture_output=True)
    if done.returncode != 0:
        print(f"websocketd: apt-get install failed ({done.returncode}): skipping that peer",
              file=sys.stderr)
        return None
    return shutil.which("websocketd")


def export_baseline(rev: str) -> str | None:
    """Export `ccx/` at *rev* to a temp dir when it differs from the working tree."""
    def tree(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        baseline_tree = tree("rev-parse", f"{rev}:ccx")
        changed = subprocess.run(["git", "diff", "--quiet", rev, "--", "ccx"], cwd=ROOT)
    except (subprocess.CalledProcessError, FileNotFoundError):
        print(f"ccx-before: cannot read revision {rev!r}: skipping", file=sys.stderr)
        return None
    if changed.returncode == 0:
        print(f"ccx-before: ccx/ is unchanged since {rev}: skipping", file=sys.stderr)
        return None
    target = Path(tempfile.mkdtemp(prefix="ccx-before-"))
    archive = subprocess.run(["git", "archive", baseline_tree], cwd=ROOT, capture_output=True,
                             check=True).stdout
    (target / "ccx").mkdir()
    subprocess.run(["tar", "-x", "-C", str(target / "ccx")], input=archive, check=True)
    return str(target)


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "n/a"
    commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "websocketd": version(["websocketd", "--version"]),
            "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


# ------------------------------------------------------------------------------ report


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return f"{value:,.{digits}f}"


def by_peer(rows: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((row for row in rows if row["peer"] == name), None)


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def ratio(workload: str, other: str) -> float | None:
        rows = results.get(workload) or []
        ccx, peer = by_peer(rows, "ccx"), by_peer(rows, other)
        if not ccx or not peer or not peer["mb_s"]:
            return None
        return float(ccx["mb_s"] / peer["mb_s"])

    def add(goal: str, measured: float | None, target: float, unit: str,
            higher_is_better: bool, note: str = "") -> None:
        met = None if measured is None else (measured >= target if higher_is_better
                                             else measured < target)
        out.append({"goal": goal, "measured": measured, "target": target, "unit": unit,
                    "met": met, "note": note})

    add("lines ≥ 1.5× websocketd", ratio("lines", "websocketd"), 1.5, "×", True)
    add("lines ≥ 0.5× raw pipe", ratio("lines", "pipe"), 0.5, "×", True)
    add("small_lines ≥ 20× websocketd", ratio("small_lines", "websocketd"), 20, "×", True)
    fire = by_peer(results.get("firehose") or [], "ccx")
    if fire:
        add("firehose peak RSS growth < 64 MiB", fire["rss_growth"] / MIB, 64, "MiB", False)
        add("firehose: zero bytes lost", 1.0 if fire["no_loss"] else 0.0, 1.0, "", True,
            "checked against seq output and ccx's stdout_bytes")
    control = results.get("control_latency")
    if control:
        add("PAUSE p99 < 5 ms (until all in state T)", control["pause_seen_s"]["p99"] * 1e3,
            5, "ms", False)
        add("CANCEL p99 < 50 ms (until process.completed)",
            control["cancel_completed_s"]["p99"] * 1e3, 50, "ms", False)
    cluster = results.get("cluster") or {}
    if "attach" in cluster:
        add(f"cluster: {cluster['attach']['sessions']} attaches by id through the balancer",
            cluster["attach"]["success_rate"] * 100, 100, "%", True)
        add("cluster: one forwarding hop ≥ 0.7× direct (lines)", cluster["hop"]["ratio"],
            0.7, "×", True)
    short = next((r for r in results.get("concurrency") or []
                  if r["case"] == "short" and r["peer"] == "ccx"), None)
    if short:
        add(f"{short['sessions']} concurrent sessions, no failure", float(short["failures"]),
            1, "failures", False)
    streaming = next((r for r in results.get("concurrency") or []
                      if r["case"] == "streaming" and r["peer"] == "ccx"), None)
    if streaming and streaming["rss_peak"]:
        add(f"{streaming['sessions']} streams with live readers: peak RSS ≤ 150 MiB",
            streaming["rss_peak"] / MIB, 150, "MiB", False)
    memory = results.get("memory")
    if memory:
        add(f"{memory['sessions']} detached sessions read back: peak RSS ≤ 1 GiB",
            memory["rss_peak"] / MIB, 1024, "MiB", False)
        add(f"{memory['sessions']} detached sessions read back: zero bytes lost",
            1.0 if memory["bytes_lost"] == 0 and not memory["failures"] else 0.0, 1.0, "",
            True, "every session's output exact, seqs without a gap")
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [f"ccx benchmark ({results['mode']}), {results['machine']['cores']} cores "
             f"{results['machine']['cpu']}, Python {results['machine']['python']}, commit "
             f"{results['machine']['commit']}, {results['machine']['date']}", "",
             "### Goals", "", "| goal | measured | met |", "|---|---|---|"]
    for goal in results["goals"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[goal["met"]]
        measured = fmt(goal["measured"], 2) + (f" {goal['unit']}" if goal["unit"] else "")
        if goal["unit"] == "":
            measured = {1.0: "zero loss", 0.0: "LOSS"}.get(goal["measured"], "n/a")
        lines.append(f"| {goal['goal']} | {measured} | {met} |")
    peers = results["peers"]
    lines += ["", "### Throughput (MB/s, 1 MB = 10^6 bytes; peak server RSS in MiB)", "",
              "| workload | " + " | ".join(peers) + " | reader alone |",
              "|---" * (len(peers) + 2) + "|"]
    alone = results.get("client_alone") or {}
    for workload, alone_key in (("lines", "ccx"), ("small_lines", "lines"), ("binary", None)):
        rows = results.get(workload)
        if not rows:
            continue
        cells = []
        for peer in peers:
            row = by_peer(rows, peer)
            if row is None:
                cells.append("n/a")
                continue
            rss = f" ({fmt(row['rss_peak'] / MIB, 0)} MiB)" if row["rss_peak"] else ""
            bad = "" if row["complete"] else " INCOMPLETE"
            cells.append(f"{fmt(row['mb_s'])}{rss}{bad}")
        reader = alone.get(alone_key) if alone_key else None
        reader_cell = (f"{fmt(reader['mb_s'])} ({fmt(reader['frames_per_s'] / 1e3, 0)}k "
                       "frames/s)") if reader else "-"
        lines.append(f"| {workload} | " + " | ".join(cells) + f" | {reader_cell} |")
    if results.get("firehose"):
        rate = fmt(results["sizes"]["firehose_rate"] / MB, 0)
        seconds = fmt(results["sizes"]["firehose_s"], 0)
        lines += ["", f"### Firehose: `seq` read at {rate} MB/s for {seconds} s, then stop and "
                  "drain",
                  "", "| peer | read (MB) | server RSS start → peak (MiB) | growth (MiB) | "
                  "no loss |", "|---|---|---|---|---|"]
        for row in results["firehose"]:
            rss = (f"{fmt(row['rss_start'] / MIB)} → {fmt(row['rss_peak'] / MIB)}"
                   if row["rss_growth"] is not None else "n/a")
            growth = fmt(row["rss_growth"] / MIB) if row["rss_growth"] is not None else "n/a"
            lines.append(f"| {row['peer']} | {fmt(row['bytes'] / MB)} | {rss} | {growth} | "
                         f"{'yes' if row['no_loss'] else '**no**'} |")
    control = results.get("control_latency")
    if control:
        before = results.get("control_latency_before")
        extra = " ccx-before p50 | p99 | max |" if before else ""
        lines += ["", f"### Control latency (ms, {control['tries']} tries, "
                  f"{control['members']}-process tree)", "",
                  "| measure | p50 | p99 | max |" + extra,
                  "|---|---|---|---|" + ("---|---|---|" if before else "")]
        for key, label in (("pause_seen_s", "PAUSE sent → all members in state T"),
                           ("pause_reply_s", "PAUSE sent → response"),
                           ("resume_reply_s", "RESUME sent → response"),
                           ("cancel_completed_s", "CANCEL sent → process.completed")):
            row = f"| {label} |"
            for stats in (control[key], *([before[key]] if before else [])):
                row += (f" {fmt(stats['p50'] * 1e3, 2)} | {fmt(stats['p99'] * 1e3, 2)} | "
                        f"{fmt(stats['max'] * 1e3, 2)} |")
            lines.append(row)
    if results.get("concurrency"):
        lines += ["", "### Concurrency (over 10 connections / reader processes)", "",
                  "| case | peer | sessions | failures | sessions/s | p99 completion (s) | "
                  "aggregate MB/s | server peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|"]
        for row in results["concurrency"]:
            rss = fmt(row["rss_peak"] / MIB, 0) if row["rss_peak"] else "n/a"
            lines.append(f"| {row['case']} | {row['peer']} | {row['sessions']} | "
                         f"{row['failures']} | {fmt(row['sessions_per_s'])} | "
                         f"{fmt(row['p99_completion_s'], 3)} | {fmt(row['aggregate_mb_s'])} | "
                         f"{rss} |")
    if results.get("spawn"):
        base = by_peer(results["spawn"], "subprocess.run")
        lines += ["", "### Spawn: `true`, one after another", "",
                  "| peer | sessions/s | vs subprocess.run |", "|---|---|---|"]
        for row in results["spawn"]:
            rel = row["sessions_per_s"] / base["sessions_per_s"] if base else None
            lines.append(f"| {row['peer']} | {fmt(row['sessions_per_s'])} | "
                         f"{fmt(rel, 2)}× |")
    if results.get("shutdown"):
        lines += ["", "### Shutdown: SIGTERM with N sessions, CCX_KILL_GRACE=1 (bound 3 s)", "",
                  "| sessions | SIGTERM → exit (s) | groups left | readers' completions | "
                  "close codes |", "|---|---|---|---|---|"]
        for row in results["shutdown"]:
            codes = ", ".join(f"{code} × {n}" for code, n in row["reader_close_codes"].items())
            lines.append(f"| {row['sessions']} | {fmt(row['exit_s'], 2)} | "
                         f"{row['groups_left']} | {row['reader_completions']} / "
                         f"{row['reader_sessions']} | {codes} |")
    memory = results.get("memory")
    if memory:
        lines += ["", f"### Memory: {memory['sessions']} sessions × "
                  f"{fmt(memory['bytes_per_session'] / MB)} MB written with no reader "
                  "(detached), then each read back by attaching", "",
                  "| peer | sessions | server RSS start → peak while detached → peak (MiB) | "
                  "held while detached (MB) | spool peak on disk (MiB) | read back (MB/s) | "
                  "bytes lost | failures |", "|---|---|---|---|---|---|---|---|"]
        lines.append(
            f"| {memory['peer']} | {memory['sessions']} | {fmt(memory['rss_start'] / MIB, 0)} "
            f"→ {fmt(memory['rss_peak_detached'] / MIB, 0)} → "
            f"{fmt(memory['rss_peak'] / MIB, 0)} | {fmt(memory['held_while_detached'] / MB, 0)}"
            f" | {fmt(memory['spool_peak'] / MIB, 0)} | {fmt(memory['read_back_mb_s'])} | "
            f"{memory['bytes_lost']} | {memory['failures']} |")
    cluster = results.get("cluster") or {}
    if "attach" in cluster:
        att, hop = cluster["attach"], cluster["hop"]
        lines += ["", f"### Cluster: {cluster['nodes']} nodes behind HAProxy (round-robin, no "
                  "routing rules)", "",
                  "| measure | value |", "|---|---|",
                  f"| sessions attached by id on fresh connections | {att['attached']} / "
                  f"{att['sessions']} ({att['forwarded']} forwarded) |",
                  f"| attach request p50 / p99 (ms) | {fmt(att['attach_p50_ms'])} / "
                  f"{fmt(att['attach_p99_ms'])} |",
                  f"| connect + attach p50 / p99 (ms) | {fmt(att['connect_attach_p50_ms'])} / "
                  f"{fmt(att['connect_attach_p99_ms'])} |",
                  f"| one at a time: attach p50 / p99, connect + attach p50 (ms) | "
                  f"{fmt(att.get('attach_alone_p50_ms'))} / {fmt(att.get('attach_alone_p99_ms'))}"
                  f", {fmt(att.get('connect_attach_alone_p50_ms'))} |",
                  f"| lines, direct (MB/s, each run) | {hop['direct_mb_s']} |",
                  f"| lines, one forwarding hop (MB/s, each run) | {hop['hop_mb_s']} |",
                  f"| hop / direct (median of pairs) | {fmt(hop['ratio'], 2)}× "
                  f"(load average {fmt(hop.get('load_average'), 1)}) |"]
    return "\n".join(lines) + "\n"


DOC_BEGIN, DOC_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def update_doc(path: Path, table: str, results: dict[str, Any]) -> None:
    """Replace what lies between the bench markers of *path* with this run's table."""
    text = path.read_text()
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    where = os.path.relpath(path, ROOT)
    note = (f"_Written by `nox -s bench -- --doc {where}` ({results['mode']} run, "
            f"{results['runtime_s']:.0f} s); raw data in `bench/results.json`, plot in "
            "`bench/firehose.png`._\n\n")
    path.write_text(f"{head}{DOC_BEGIN}\n{note}{table}{DOC_END}{tail}")


def plot(rows: list[dict[str, Any]], path: Path, sizes: Sizes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for row in rows:
        progress = row["progress"]
        if len(progress) < 2:
            continue
        t_zero = progress[0][0]
        times, rates = [], []
        window = 5  # samples of 0.1 s: a 0.5 s moving rate
        for i in range(window, len(progress)):
            (t_a, b_a), (t_b, b_b) = progress[i - window], progress[i]
            if t_b > t_a:
                times.append(t_b - t_zero)
                rates.append((b_b - b_a) / (t_b - t_a) / MB)
        top.plot(times, rates, label=row["peer"])
        if row["rss_samples"]:
            bottom.plot([t - t_zero for t, _ in row["rss_samples"]],
                        [b / MIB for _, b in row["rss_samples"]], label=row["peer"])
    top.axhline(sizes.firehose_rate / MB, color="grey", linestyle=":", linewidth=1)
    top.set_ylabel("received MB/s (0.5 s window)")
    top.set_title(f"firehose: `seq` read at {sizes.firehose_rate / MB:.0f} MB/s for "
                  f"{sizes.firehose_s:.0f} s, then stop and drain")
    bottom.set_ylabel("server RSS (MiB)")
    bottom.set_xlabel("seconds since the reader started")
    for axis in (top, bottom):
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


# ------------------------------------------------------------------------------ main


WORKLOADS = ("client_alone", "lines", "small_lines", "binary", "firehose", "control_latency",
             "concurrency", "spawn", "shutdown", "memory", "cluster")
SHUTDOWN_SIZES = {"full": (10, 100, 1000), "quick": (10, 100)}
SHUTDOWN_RUNS = 3  # each size, each on a fresh server: the spread matters on a busy machine


def workload_shutdown(mode: str) -> list[dict[str, Any]]:
    """SIGTERM to a server with N sessions (`bench/shutdown.py`, its own process)."""
    rows = []
    for count in SHUTDOWN_SIZES[mode]:
        for _ in range(SHUTDOWN_RUNS):
            done = subprocess.run([sys.executable, "-m", "bench.shutdown", str(count)],
                                  cwd=ROOT, capture_output=True, timeout=600, check=True)
            rows.append(json.loads(done.stdout.decode().splitlines()[-1]))
            print(f"shutdown {count}: {rows[-1]['exit_s']} s", file=sys.stderr)
    return rows


def workload_cluster(mode: str) -> dict[str, Any]:
    """4 nodes behind HAProxy (`bench/cluster.py`, its own process): attach by id, one hop."""
    done = subprocess.run([sys.executable, "-m", "bench.cluster",
                           *(["--quick"] if mode == "quick" else [])],
                          cwd=ROOT, capture_output=True, timeout=1200, check=True)
    result: dict[str, Any] = json.loads(done.stdout.decode().splitlines()[-1])
    print(f"cluster: {json.dumps(result)[:300]}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 60 s in all")
    parser.add_argument("--baseline", default="main",
                        help="git revision whose ccx/ runs as ccx-before ('' to skip)")
    parser.add_argument("--only", default="", help="comma-separated workloads to run")
    parser.add_argument("--peers", default="", help="comma-separated peers to keep (all if empty)")
    parser.add_argument("--out", default=str(BENCH / "results.json"))
    parser.add_argument("--plot", default=str(BENCH / "firehose.png"))
    parser.add_argument("--doc", default="",
                        help="also write the table between the bench markers of this file "
                        "(docs/performance.md)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    sizes = QUICK if args.quick else FULL
    only = set(args.only.split(",")) if args.only else set(WORKLOADS)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    inputs = prepare_inputs(sizes)
    peers = [Peer("pipe", "pipe"), Peer("ccx", "ccx")]
    baseline = export_baseline(args.baseline) if args.baseline else None
    if baseline:
        peers.append(Peer("ccx-before", "ccx", pythonpath=baseline))
    if ensure_websocketd():
        peers.append(Peer("websocketd", "websocketd"))
    if args.peers:
        peers = [p for p in peers if p.name in args.peers.split(",")]
    ccx_peers = [p for p in peers if p.kind == "ccx"]
    results: dict[str, Any] = {"mode": "quick" if args.quick else "full",
                               "machine": machine(), "sizes": attrs.asdict(sizes),
                               "peers": [p.name for p in peers], "baseline": args.baseline}
    print(f"peers: {', '.join(results['peers'])}", file=sys.stderr)
    lines_size = inputs["lines"].stat().st_size
    if "client_alone" in only:
        results["client_alone"] = workload_client_alone(sizes, inputs["lines"])
    if "lines" in only:
        results["lines"] = workload_throughput("lines", peers, ["cat", str(inputs["lines"])],
                                               lines_size)
    if "small_lines" in only:
        results["small_lines"] = workload_throughput(
            "small_lines", peers, ["seq", "1", str(sizes.small_lines)],
            seq_bytes(sizes.small_lines))
    if "binary" in only:
        results["binary"] = workload_throughput(
            "binary", peers, ["head", "-c", str(sizes.binary_bytes), str(inputs["binary"])],
            sizes.binary_bytes, binary=True)
    if "firehose" in only:
        results["firehose"] = workload_firehose(
            [p for p in peers if p.name != "pipe"] + [peers[0]], sizes)
        plot(results["firehose"], Path(args.plot), sizes)
        for row in results["firehose"]:
            row["rss_samples"] = row["rss_samples"][::4]
            row["progress"] = row["progress"][::2]
    if "control_latency" in only:
        results["control_latency"] = workload_control(ccx_peers[0], sizes)
        if len(ccx_peers) > 1:
            results["control_latency_before"] = workload_control(ccx_peers[1], sizes)
    if "concurrency" in only:
        results["concurrency"] = workload_concurrency(peers, sizes, inputs["lines"])
    if "spawn" in only:
        results["spawn"] = workload_spawn(peers, sizes)
    if "shutdown" in only:
        results["shutdown"] = workload_shutdown(results["mode"])
    if "memory" in only:  # this checkout only: ccx-before holds it all in memory
        results["memory"] = workload_memory(ccx_peers[0], sizes, inputs["lines"])
    if "cluster" in only:
        results["cluster"] = workload_cluster(results["mode"])
    results["goals"] = goals(results)
    results["runtime_s"] = time.monotonic() - started
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    print(table)
    if args.doc:
        update_doc(Path(args.doc), table, results)
    print(f"runtime {results['runtime_s']:.0f} s; results in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
