"""The one benchmark reader: the same counting code for ccx, websocketd and a raw pipe.

Run as `python -m bench.reader SPEC_JSON`; `bench/run.py` starts it as a separate process so
the reader, the server and the sampler never share an interpreter.
Inputs (SPEC_JSON keys): `kind` (`ccx`, `websocketd`, `pipe`, `control`, `spawn_ccx`,
`spawn_websocketd`, `spawn_subprocess`), `url`, `commands` (argv lists), `connections`,
`encoding`, `binary`, `rate` (bytes/s of wire data, or null), `duration` (s, or null: stop
then = CANCEL / close / SIGTERM, and drain the rest at full speed), `tries`, `start_at`
(a `time.monotonic()` instant to start at, to line up several readers), `out` (result path).
Outputs: a JSON result at `out`: per session the bytes received (raw child bytes: utf-8
length of text, decoded length of base64, line + newline for websocketd's line frames),
frames, start/end instants, seq gaps, the last bytes seen (for loss checks), the completion
ccx reported; plus `progress` samples `[monotonic, bytes]` for the firehose plot.
Docs: ../shared/PROTOCOL.md sections 2-3; http://websocketd.com/ (one frame per line).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from typing import Any

from bench.wsclient import OP_BINARY, OP_TEXT, Closed, WsClient

try:  # the fastest JSON decoder at hand: the reader must not be the bottleneck
    from msgspec.json import decode as decode_json
except ImportError:  # pragma: no cover - the bench session installs msgspec
    def decode_json(payload: Any) -> Any:
        return json.loads(bytes(payload))

THROTTLED_RECV_BYTES = 64 * 1024  # a rate-limited reader takes small bites
PROGRESS_INTERVAL_S = 0.1
TAIL_CHARS = 32  # enough to hold the last complete line of `seq` output


class Tally:
    """What one session (ccx session, websocketd connection, pipe) delivered."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bytes = 0
        self.frames = 0
        self.seq_errors = 0
        self.next_seq = 0
        self.tail = ""
        self.t0 = time.monotonic()
        self.t1: float | None = None
        self.completed: dict[str, Any] | None = None
        self.error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "bytes": self.bytes, "frames": self.frames,
                "seq_errors": self.seq_errors, "tail": self.tail, "t0": self.t0,
                "t1": self.t1, "completed": self.completed, "error": self.error}


# ------------------------------------------------------------------------------ byte sources


class CcxSource:
    """One WebSocket connection to ccx running several sessions (all at once, or in turn)."""

    def __init__(self, url: str, commands: list[list[str]], encoding: str, *,
                 sequential: bool = False) -> None:
        self.ws = WsClient(url)
        self.commands = commands
        self.encoding = encoding
        self.sequential = sequential
        self.tallies: list[Tally] = []
        self.by_request: dict[int, Tally] = {}
        self.by_session: dict[str, Tally] = {}
        self.next_id = 1
        self.open = 0
        self.done = False
        for _ in commands if not sequential else commands[:1]:
            self._start_next()

    def fileno(self) -> int:
        return self.ws.fileno()

    def _call(self, method: str, params: dict[str, Any]) -> int:
        request_id, self.next_id = self.next_id, self.next_id + 1
        self.ws.send_text(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method,
                                      "params": params}))
        return request_id

    def _start_next(self) -> None:
        argv = self.commands[len(self.tallies)]
        tally = Tally(" ".join(argv))
        self.tallies.append(tally)
        self.open += 1
        self.by_request[self._call("execute", {"command": argv,
                                               "encoding": self.encoding})] = tally

    def stop(self) -> None:
        for session_id, tally in self.by_session.items():
            if tally.completed is None:
                self._call("control", {"session_id": session_id, "type": "CANCEL"})

    def on_readable(self, limit: int) -> int:
        received = self.ws.receive_into_buffer(limit)
        for _, payload in self.ws.messages():
            self._on_message(decode_json(payload))
        if self.ws.closed and not self.done:
            for tally in self.tallies:
                if tally.completed is None and tally.error is None:
                    tally.error = "connection closed"
            self.done = True
        return received

    def _on_message(self, message: dict[str, Any]) -> None:
        method = message.get("method")
        if method == "process.output":
            params = message["params"]
            tally = self.by_session[params["session_id"]]
            data: str = params["data"]
            if params.get("encoding") == "base64":
                size = len(data) // 4 * 3 - (2 if data.endswith("==") else
                                             1 if data.endswith("=") else 0)
            else:
                size = len(data) if data.isascii() else len(data.encode())
            tally.bytes += size
            tally.frames += 1
            if params["seq"] != tally.next_seq:
                tally.seq_errors += 1
            tally.next_seq = params["seq"] + 1
            tally.tail = (tally.tail + data[-TAIL_CHARS:])[-TAIL_CHARS:]
        elif method == "process.completed":
            tally = self.by_session[message["params"]["session_id"]]
            tally.completed = message["params"]
            self._finish(tally)
        elif method is None and "id" in message:
            tally_or_none = self.by_request.pop(message["id"], None)
            if tally_or_none is None:
                return  # a control response
            if "error" in message:
                tally_or_none.error = json.dumps(message["error"])
                self._finish(tally_or_none)
            else:
                self.by_session[message["result"]["session_id"]] = tally_or_none

    def _finish(self, tally: Tally) -> None:
        tally.t1 = time.monotonic()
        self.open -= 1
        if self.sequential and len(self.tallies) < len(self.commands):
            self._start_next()
        elif self.open == 0:
            self.done = True
            self.ws.close()


class WebsocketdSource:
    """One websocketd connection: one process, one frame per line (or raw chunks)."""

    def __init__(self, url: str, binary: bool) -> None:
        self.tally = Tally("websocketd")
        self.tallies = [self.tally]
        self.ws = WsClient(url)
        self.binary = binary
        self.done = False

    def fileno(self) -> int:
        return self.ws.fileno()

    def stop(self) -> None:
        self._end()

    def _end(self) -> None:
        self.tally.t1 = time.monotonic()
        self.done = True
        self.ws.close()

    def on_readable(self, limit: int) -> int:
        tally = self.tally
        try:
            received = self.ws.receive_into_buffer(limit)
        except OSError:
            received = 0
            self.ws.closed = True
        count = size = 0
        last: list[bytes] = []
        for opcode, payload in self.ws.messages():
            count += 1
            size += len(payload)
            if opcode != (OP_BINARY if self.binary else OP_TEXT):
                tally.seq_errors += 1
            if count % 64 == 0:
                last.clear()
            last.append(bytes(payload[-TAIL_CHARS:]))
        if count:
            tally.frames += count
            if self.binary:
                tally.bytes += size
                tail = b"".join(last)
            else:  # websocketd strips the newline of each line
                tally.bytes += size + count
                tail = b"".join(line + b"\n" for line in last)
            tally.tail = (tally.tail + tail[-TAIL_CHARS:].decode("latin-1"))[-TAIL_CHARS:]
        if self.ws.closed and not self.done:
            self._end()
        return received


class PipeSource:
    """The physical limit: the child's stdout pipe read directly."""

    def __init__(self, argv: list[str]) -> None:
        self.tally = Tally(" ".join(argv))
        self.tallies = [self.tally]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, bufsize=0,
                                        start_new_session=True)
        assert self.process.stdout is not None
        self.fd = self.process.stdout.fileno()
        self.done = False

    def fileno(self) -> int:
        return self.fd

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def on_readable(self, limit: int) -> int:
        data = os.read(self.fd, limit)
        tally = self.tally
        if not data:
            self.process.wait()
            assert self.process.stdout is not None
            self.process.stdout.close()
            tally.t1 = time.monotonic()
            tally.completed = {"exit_code": self.process.returncode}
            self.done = True
            return 0
        tally.bytes += len(data)
        tally.frames += 1
        tally.tail = (tally.tail + data[-TAIL_CHARS:].decode("latin-1"))[-TAIL_CHARS:]
        return len(data)


Source = CcxSource | WebsocketdSource | PipeSource


def pump(sources: list[Source], rate: float | None, duration: float | None,
         progress: list[list[float]]) -> None:
    """Read every source until done; hold the wire rate at *rate* until *duration* ends."""
    selector = selectors.DefaultSelector()
    for source in sources:
        selector.register(source.fileno(), selectors.EVENT_READ, source)
    live = len(sources)
    started = time.monotonic()
    wire = 0
    stopped = False
    next_sample = started
    while live:
        now = time.monotonic()
        if now >= next_sample:
            progress.append([now, sum(t.bytes for s in sources for t in s.tallies)])
            next_sample = now + PROGRESS_INTERVAL_S
        if duration is not None and not stopped and now - started >= duration:
            stopped = True
            for source in sources:
                if not source.done:
                    fd = source.fileno()
                    source.stop()
                    if source.done:
                        selector.unregister(fd)
                        live -= 1
            continue
        limit = 1 << 20
        if rate is not None and not stopped:
            allowance = rate * (now - started) - wire
            if allowance <= 0:
                time.sleep(min(-allowance / rate, PROGRESS_INTERVAL_S))
                continue
            limit = int(min(allowance, THROTTLED_RECV_BYTES)) or 1
        for key, _ in selector.select(timeout=PROGRESS_INTERVAL_S):
            source = key.data
            wire += source.on_readable(limit)
            if source.done:
                selector.unregister(key.fd)
                live -= 1
    progress.append([time.monotonic(), sum(t.bytes for s in sources for t in s.tallies)])


# ------------------------------------------------------------------------------ control latency


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return chr(stat.read().rsplit(b")", 1)[1][1])
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return "X"


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != b"Z":
                members.append(int(entry))
    return members


class Rpc:
    """Blocking request/response over one ccx connection; notifications are kept in order."""

    def __init__(self, url: str) -> None:
        self.ws = WsClient(url)
        self.next_id = 1
        self.notes: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any]) -> int:
        request_id, self.next_id = self.next_id, self.next_id + 1
        self.ws.send_text(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method,
                                      "params": params}))
        return request_id

    def _pull(self) -> list[dict[str, Any]]:
        if self.ws.receive_into_buffer() == 0:
            raise Closed("server closed the connection")
        return [decode_json(p) for _, p in self.ws.messages()]

    def wait_reply(self, request_id: int) -> dict[str, Any]:
        while True:
            for index, message in enumerate(self.notes):
                if message.get("id") == request_id:
                    del self.notes[index]
                    if "error" in message:
                        raise RuntimeError(message["error"])
                    result: dict[str, Any] = message["result"]
                    return result
            self.notes.extend(self._pull())

    def wait_note(self, method: str, session_id: str) -> dict[str, Any]:
        while True:
            for index, message in enumerate(self.notes):
                if message.get("method") == method and \
                        message["params"]["session_id"] == session_id:
                    del self.notes[index]
                    params: dict[str, Any] = message["params"]
                    return params
            self.notes.extend(self._pull())


POLL_S = 0.0001  # between looks at /proc: fine enough, and leaves the CPU to the others
TREE = ["sh", "-c", "sleep 1000 & sleep 1000 & echo ready; wait"]  # 3 processes, obey TERM


def control_latency(url: str, tries: int) -> dict[str, Any]:
    """PAUSE until every member is seen in state T; CANCEL until process.completed."""
    rpc = Rpc(url)
    started = rpc.wait_reply(rpc.send("execute", {"command": TREE}))
    session_id, pgid = started["session_id"], started["pgid"]
    rpc.wait_note("process.output", session_id)
    members: list[int] = []
    while len(members) < 3:
        members = _group_members(pgid)
    pause_seen, pause_reply, resume_reply = [], [], []
    for _ in range(tries):
        t0 = time.perf_counter()
        request = rpc.send("control", {"session_id": session_id, "type": "PAUSE"})
        while not all(_proc_state(pid) == "T" for pid in members):
            time.sleep(POLL_S)
        pause_seen.append(time.perf_counter() - t0)
        rpc.wait_reply(request)
        pause_reply.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rpc.wait_reply(rpc.send("control", {"session_id": session_id, "type": "RESUME"}))
        resume_reply.append(time.perf_counter() - t0)
        rpc.notes.clear()  # paused/resumed notifications: nothing is pending now
        while any(_proc_state(pid) == "T" for pid in members):
            time.sleep(POLL_S)
    rpc.send("control", {"session_id": session_id, "type": "CANCEL"})
    rpc.wait_note("process.completed", session_id)
    cancel, statuses = [], []
    for _ in range(tries):
        started = rpc.wait_reply(rpc.send("execute", {"command": TREE}))
        session_id = started["session_id"]
        rpc.wait_note("process.output", session_id)
        t0 = time.perf_counter()
        rpc.send("control", {"session_id": session_id, "type": "CANCEL"})
        completed = rpc.wait_note("process.completed", session_id)
        cancel.append(time.perf_counter() - t0)
        statuses.append(completed["status"])
        rpc.notes.clear()
    rpc.ws.close()
    return {"pause_seen_s": pause_seen, "pause_reply_s": pause_reply,
            "resume_reply_s": resume_reply, "cancel_completed_s": cancel,
            "cancel_statuses": sorted(set(statuses)), "members": len(members)}


# ------------------------------------------------------------------------------ spawn loops


def spawn_websocketd(url: str, tries: int) -> dict[str, Any]:
    started = time.monotonic()
    for _ in range(tries):
        source = WebsocketdSource(url, binary=False)
        while not source.done:
            source.on_readable(1 << 16)
    return {"t0": started, "t1": time.monotonic(), "sessions": tries}


def spawn_subprocess(tries: int) -> dict[str, Any]:
    started = time.monotonic()
    for _ in range(tries):
        subprocess.run(["true"], check=True)
    return {"t0": started, "t1": time.monotonic(), "sessions": tries}


def main() -> None:
    spec = json.loads(sys.argv[1])
    kind = spec["kind"]
    start_at = spec.get("start_at")
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.monotonic()))
    result: dict[str, Any] = {"kind": kind, "t_start": time.monotonic()}
    if kind in ("ccx", "websocketd", "pipe", "spawn_ccx"):
        sources: list[Source] = []
        if kind == "ccx":
            sources.append(CcxSource(spec["url"], spec["commands"], spec.get("encoding",
                                                                              "utf-8")))
        elif kind == "spawn_ccx":
            sources.append(CcxSource(spec["url"], spec["commands"], "utf-8", sequential=True))
        elif kind == "websocketd":
            for _ in range(spec.get("connections", 1)):
                sources.append(WebsocketdSource(spec["url"], spec.get("binary", False)))
        else:
            sources.extend(PipeSource(argv) for argv in spec["commands"])
        progress: list[list[float]] = []
        pump(sources, spec.get("rate"), spec.get("duration"), progress)
        result["sessions"] = [t.as_dict() for s in sources for t in s.tallies]
        result["progress"] = progress
    elif kind == "control":
        result.update(control_latency(spec["url"], spec["tries"]))
    elif kind == "spawn_websocketd":
        result.update(spawn_websocketd(spec["url"], spec["tries"]))
    elif kind == "spawn_subprocess":
        result.update(spawn_subprocess(spec["tries"]))
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    result["t_end"] = time.monotonic()
    with open(spec["out"], "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main()
