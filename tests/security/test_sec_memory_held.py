"""Attack: one client fills server memory with output nobody will read (issue: hardening (a)).

Each session writes 8 MiB of the control character \\x01 and exits; its client is gone (the
session lingers). Budgets count raw bytes, but `\\x01` is held JSON-escaped (`\\u0001`, six
bytes), so each ended session held ~48 MiB, and nothing server-wide capped what ended
sessions kept (RSS 37 -> 621 MiB after 12 sessions). Fixed by `CCX_MAX_HELD_BYTES` (bytes
actually held, all sessions) and by counting sessions that hold unsent output against
`CCX_MAX_SESSIONS` (docs/security.md).

Rules: as in conftest; the server is a real `ccx serve` subprocess, its memory is VmRSS from
/proc; thresholds derive from the configured limits with generous slack (a regression is
hundreds of MiB, the slack tens). Nothing may be dropped: held output is read back exactly.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import trio
from conftest import http_get, py

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "reliability"))
from relhelp import RawWs, Serve, rss_kib

from ccx.outbox import CACHE_BYTES

MIB = 1024 * 1024
REPLAY_BYTES = 8 * MIB  # the CCX_REPLAY_BYTES default: unsent output one session may hold
SLACK = 64 * MIB  # allocator and interpreter noise, far below the regressions tested
CONTROL_CHARS = py(f"import sys; sys.stdout.buffer.write(b'\\x01' * {REPLAY_BYTES})")
# The same, once its client has surely gone: no output is sent before it detaches.
LATE_CONTROL_CHARS = py(f"import sys, time; time.sleep(3); "
                        f"sys.stdout.buffer.write(b'\\x01' * {REPLAY_BYTES})")


async def settle(watcher: RawWs, session_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Wait until every session has written and then ended or stopped being read
    (throttled); return their status."""
    last: dict[str, tuple[str, int]] = {}
    with trio.fail_after(90):
        while True:
            infos = {sid: (await watcher.request("status", {"session_id": sid}))["result"]
                     for sid in session_ids}
            now = {sid: (i["status"], i["stdout_bytes"]) for sid, i in infos.items()}
            if now == last and all(i["stdout_bytes"] for i in infos.values()):
                return infos
            last = now
            await trio.sleep(1.0)


async def read_all(client: RawWs, session_id: str) -> tuple[bytes, dict[str, Any]]:
    """Attach and collect the session's stdout up to its process.completed."""
    reply = await client.request("attach", {"session_id": session_id})
    assert "result" in reply, reply
    data: list[bytes] = []
    seqs: list[int] = []
    with trio.fail_after(60):
        while True:
            message = json.loads(await client.receive())
            params = message.get("params", {})
            if params.get("session_id") != session_id:
                continue
            if message.get("method") == "process.output":
                data.append(params["data"].encode())
                seqs.append(params["seq"])
            elif message.get("method") == "process.completed":
                assert seqs == list(range(len(seqs))), "a gap in the output"
                return b"".join(data), params


async def held_gauge(port: int) -> float:
    """The server's own count of output bytes held (/metrics `ccx_held_bytes`); -1 if none."""
    status, _, body = await http_get(port, "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith("ccx_held_bytes "):
            return float(line.split()[1])
    return -1.0


async def test_ended_sessions_with_unsent_output_count_against_max_sessions(
        tmp_path: Path) -> None:
    """The issue's attack as reported: CCX_MAX_SESSIONS=2, six rounds of two lingering
    sessions that write 8 MiB of \\x01 and exit after their client left."""
    server = Serve(tmp_path, CCX_MAX_SESSIONS="2")
    try:
        watcher = await RawWs.connect(server.port)
        await trio.sleep(0.5)
        baseline = rss_kib(server.proc.pid)
        started: list[str] = []
        refused: list[dict[str, Any]] = []
        for _ in range(6):
            attacker = await RawWs.connect(server.port)
            ids = []
            for _ in range(2):
                reply = await attacker.request("execute", {"command": CONTROL_CHARS,
                                                           "linger": 600})
                if "result" in reply:
                    ids.append(reply["result"]["session_id"])
                else:
                    refused.append(reply["error"])
            await attacker.aclose()
            started += ids
            infos = await settle(watcher, ids)
            assert all(i["status"] == "exited" for i in infos.values()), infos
        grown = (rss_kib(server.proc.pid) - baseline) * 1024
        held = await held_gauge(server.port)
        print(f"\nsessions started {len(started)}, refused {len(refused)}, "
              f"RSS +{grown / MIB:.0f} MiB, held {held / MIB:.0f} MiB")
        # Two sessions' unsent output is what the limits let through, held as raw output
        # (records, ccx.events), not as its JSON (6 times larger for control characters).
        limit = 2 * REPLAY_BYTES
        assert grown <= limit + SLACK, f"RSS grew {grown / MIB:.0f} MiB"
        assert len(started) == 2, started
        assert all(e["code"] == -32003 for e in refused), refused
        assert 0 <= held <= limit + MIB
        # Nothing was dropped: the held output comes back whole; once it is read the session
        # no longer counts, and a new one may start.
        data, completed = await read_all(watcher, started[0])
        assert data == b"\x01" * REPLAY_BYTES and completed["status"] == "exited"
        attacker = await RawWs.connect(server.port)
        reply = await attacker.request("execute", {"command": ["true"]})
        assert "result" in reply, reply
    finally:
        server.stop()


async def test_held_output_is_capped_server_wide(tmp_path: Path) -> None:
    """Many sessions at once, within CCX_MAX_SESSIONS: CCX_MAX_HELD_BYTES bounds what they
    hold together; the rest are throttled, new executes get -32003, and reading frees them."""
    held_limit = 64 * MIB
    server = Serve(tmp_path, CCX_MAX_HELD_BYTES=str(held_limit), CCX_SPOOL_DIR="memory")
    try:
        watcher = await RawWs.connect(server.port)
        await trio.sleep(0.5)
        baseline = rss_kib(server.proc.pid)
        attacker = await RawWs.connect(server.port)
        ids = []
        for _ in range(12):
            reply = await attacker.request("execute", {"command": LATE_CONTROL_CHARS,
                                                       "linger": 600})
            if "error" in reply:  # the budget filled up while the attack went on
                assert reply["error"]["data"]["scope"] == "held_bytes", reply
                break
            ids.append(reply["result"]["session_id"])
        await attacker.aclose()
        assert len(ids) >= 2, ids
        infos = await settle(watcher, ids)
        grown = (rss_kib(server.proc.pid) - baseline) * 1024
        held = await held_gauge(server.port)
        statuses = [i["status"] for i in infos.values()]
        print(f"\nstarted {len(ids)}, statuses {statuses}, RSS +{grown / MIB:.0f} MiB, held {held / MIB:.0f} MiB")
        # Per live session beyond the budget: its channel (8 x 64 KiB) and one record.
        in_flight = len(ids) * (8 * 64 * 1024 + 64 * 1024)
        assert grown <= held_limit + in_flight + SLACK, f"RSS grew {grown / MIB:.0f} MiB"
        assert 0 <= held <= held_limit + in_flight
        assert "running" in statuses, "every session ran to its end: nothing was throttled"
        reply = await watcher.request("execute", {"command": ["true"]})
        assert reply.get("error", {}).get("code") == -32003, reply
        assert reply["error"]["data"]["scope"] == "held_bytes", reply
        # Nothing dropped: a client that reads a throttled session gets all of it (its
        # session queues a frame whenever the last one was read), and the bytes it frees
        # let the other throttled sessions go on.
        chosen = ids[0]
        stalled = {sid: i["stdout_bytes"] for sid, i in infos.items()
                   if i["status"] == "running" and sid != chosen}
        data, completed = await read_all(watcher, chosen)
        assert data == b"\x01" * REPLAY_BYTES and completed["status"] == "exited"
        with trio.fail_after(30):
            while True:
                now = [(await watcher.request("status", {"session_id": sid}))["result"]
                       for sid in stalled]
                if any(i["stdout_bytes"] > stalled[i["session_id"]] for i in now):
                    break
                await trio.sleep(0.2)
    finally:
        server.stop()


async def test_spooled_output_costs_disk_not_memory(tmp_path: Path) -> None:
    """The same attack with output spooled to disk (the default, issue 18): twelve sessions
    each hold 8 MiB of unsent \\x01 (48 MiB once escaped as JSON) and all run to their end;
    the server's memory barely moves, the held gauge counts only what stays in memory, the
    spool holds the rest as raw output (8 MiB each, not its escaped JSON: sinks encode what
    they send, ccx.events), and every byte comes back."""
    server = Serve(tmp_path, CCX_MAX_SESSIONS="16")
    try:
        watcher = await RawWs.connect(server.port)
        await trio.sleep(0.5)
        baseline = rss_kib(server.proc.pid)
        attacker = await RawWs.connect(server.port)
        ids = []
        for _ in range(12):
            reply = await attacker.request("execute", {"command": LATE_CONTROL_CHARS,
                                                       "linger": 600})
            ids.append(reply["result"]["session_id"])
        await attacker.aclose()
        infos = await settle(watcher, ids)
        assert all(i["status"] == "exited" for i in infos.values()), infos
        grown = (rss_kib(server.proc.pid) - baseline) * 1024
        held = await held_gauge(server.port)
        spooled = sum(f.stat().st_size for f in (tmp_path / "spool").rglob("*") if f.is_file())
        print(f"\nRSS +{grown / MIB:.0f} MiB, held {held / MIB:.1f} MiB, "
              f"spool {spooled / MIB:.0f} MiB")
        # Per session: its channel (8 x 64 KiB) and the frames cached for a reader.
        assert grown <= len(ids) * (8 * 64 * 1024 + CACHE_BYTES) + SLACK, \
            f"RSS grew {grown / MIB:.0f} MiB"
        assert 0 <= held <= len(ids) * CACHE_BYTES
        assert len(ids) * REPLAY_BYTES <= spooled < len(ids) * REPLAY_BYTES * 1.01, spooled
        for chosen in ids[:2]:
            data, completed = await read_all(watcher, chosen)
            assert data == b"\x01" * REPLAY_BYTES and completed["status"] == "exited"
    finally:
        server.stop()
    assert not (tmp_path / "spool").exists() or not any((tmp_path / "spool").iterdir()), \
        "a clean stop leaves no spool behind"
