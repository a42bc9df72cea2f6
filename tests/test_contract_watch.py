"""Contract tests for `watch` / `unwatch` / `process.lagged` (PROTOCOL.md section 11).

Rules: as in conftest (127.0.0.1, port 0, real children, a deadline on every test). Each
test waits on ccx's own answers and notifications, never on time. Children echo what they
read on stdin, so a test decides when output happens.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from conftest import RawClient, completion, py, wait_for

from ccx.server import Server

Connect = Callable[..., Awaitable[RawClient]]

# Prints "ready", then echoes each stdin line (uppercased) until EOF.
ECHO = py("import sys\nprint('ready', flush=True)\n"
          "for line in sys.stdin:\n    print(line.strip().upper(), flush=True)\n")


async def until_output(client: RawClient, sid: str, text: str) -> list[dict[str, Any]]:
    """Every process.output of *sid* up to and including the one that contains *text*."""
    seen: list[dict[str, Any]] = []
    with trio.fail_after(15):
        while True:
            params = await client.notification("process.output", sid)
            seen.append(params)
            if text in params["data"]:
                return seen


async def events_until(client: RawClient, sid: str, method: str) -> list[tuple[str, dict[str, Any]]]:
    """Every notification of *sid* up to and including the first *method*."""
    events: list[tuple[str, dict[str, Any]]] = []
    with trio.fail_after(15):
        while not events or events[-1][0] != method:
            for i, message in enumerate(client.notifications):
                if message["params"].get("session_id") == sid:
                    del client.notifications[i]
                    break
            else:
                message = await client.receive()
                if "method" not in message:
                    client._responses[message.get("id")] = message
                    continue
                if message["params"].get("session_id") != sid:
                    client.notifications.append(message)
                    continue
            events.append((message["method"], message["params"]))
    return events


async def test_watch_replays_then_streams_to_owner_and_watcher(
        server: Server, connect: Connect) -> None:
    owner, watcher = await connect(server), await connect(server)
    sid = (await owner.execute(ECHO, stdin=True))["session_id"]
    await until_output(owner, sid, "ready")
    result = await watcher.result("watch", session_id=sid)
    assert result["session_id"] == sid and result["status"] == "running"
    assert result["next_seq"] >= 1 and {"pid", "pgid"} <= set(result)
    replay = await until_output(watcher, sid, "ready")  # "ready" and its newline: 1 or 2 seqs
    while replay[-1]["seq"] < result["next_seq"] - 1:
        replay.append(await watcher.notification("process.output", sid))
    assert [o["seq"] for o in replay] == list(range(result["next_seq"]))
    await owner.result("input", session_id=sid, data="hello\n")
    assert "HELLO" in (await until_output(owner, sid, "HELLO"))[-1]["data"]
    assert "HELLO" in (await until_output(watcher, sid, "HELLO"))[-1]["data"]
    await owner.result("input", session_id=sid, data="", eof=True)
    owner_events = [e for e in await events_until(owner, sid, "process.completed")
                    if e[0] != "process.started"]  # the owner's first, left buffered above
    watcher_events = await events_until(watcher, sid, "process.completed")
    assert owner_events == watcher_events  # the same frames, byte for byte, in one order
    assert watcher_events[-1][1]["status"] == "exited"
    # The watcher's place is freed after process.completed.
    await wait_for(lambda: not server.manager.get(sid).output.watchers)


async def test_watch_since_seq_resumes_without_gap(server: Server, connect: Connect) -> None:
    owner, first = await connect(server), await connect(server)
    sid = (await owner.execute(ECHO, stdin=True))["session_id"]
    await first.result("watch", session_id=sid)
    got = await until_output(first, sid, "ready")
    await first.ws.aclose()  # the browser went away
    for word in ("one", "two", "three"):
        await owner.result("input", session_id=sid, data=word + "\n")
    await until_output(owner, sid, "THREE")
    again = await connect(server)
    result = await again.result("watch", session_id=sid, since_seq=got[-1]["seq"])
    rest = await until_output(again, sid, "THREE")
    assert [o["seq"] for o in got + rest] == list(range(result["next_seq"]))
    assert "".join(o["data"] for o in rest).split() == ["ONE", "TWO", "THREE"]
    await owner.result("control", session_id=sid, type="CANCEL")
    await completion(owner, sid)


async def test_watcher_close_ends_nothing(server: Server, connect: Connect) -> None:
    owner, watcher = await connect(server), await connect(server)
    sid = (await owner.execute(ECHO, stdin=True))["session_id"]
    await watcher.result("watch", session_id=sid)
    await until_output(watcher, sid, "ready")
    await watcher.ws.aclose()
    await wait_for(lambda: not server.manager.get(sid).output.watchers)
    assert (await owner.result("status", session_id=sid))["status"] == "running"
    await owner.result("input", session_id=sid, data="still\n")
    await until_output(owner, sid, "STILL")
    await owner.result("input", session_id=sid, data="", eof=True)
    assert (await completion(owner, sid))["status"] == "exited"


async def test_watcher_limit_and_replacement(start_server: Callable[..., Awaitable[Server]],
                                             connect: Connect) -> None:
    server = await start_server(max_watchers=2)
    owner = await connect(server)
    a, b, c = [await connect(server) for _ in range(3)]
    sid = (await owner.execute(ECHO, stdin=True))["session_id"]
    await a.result("watch", session_id=sid)
    await b.result("watch", session_id=sid)
    await a.result("watch", session_id=sid)  # a repeated watch replaces, takes no new place
    error = await c.error("watch", session_id=sid)
    assert error["code"] == -32003, error
    await a.result("unwatch", session_id=sid)
    await c.result("watch", session_id=sid)
    # The owner is not a watcher: its session streams as before.
    await until_output(owner, sid, "ready")
    await owner.result("control", session_id=sid, type="CANCEL")
    await completion(owner, sid)
    await completion(c, sid)


async def test_unwatch_is_idempotent_and_stops_notifications(
        server: Server, connect: Connect) -> None:
    owner, watcher = await connect(server), await connect(server)
    sid = (await owner.execute(ECHO, stdin=True))["session_id"]
    await watcher.result("watch", session_id=sid)
    await until_output(watcher, sid, "ready")
    for _ in range(2):
        assert await watcher.result("unwatch", session_id=sid) == {
            "session_id": sid, "watching": False}
        watcher.notifications.clear()  # what came before the answer may be there
    assert await watcher.result("unwatch", session_id="no-such-session") == {
        "session_id": "no-such-session", "watching": False}
    await owner.result("input", session_id=sid, data="after\n")
    await until_output(owner, sid, "AFTER")
    await owner.result("control", session_id=sid, type="CANCEL")
    await completion(owner, sid)
    await watcher.result("ping")  # anything sent before this answer would be here now
    assert not [m for m in watcher.notifications if m["params"].get("session_id") == sid]


async def test_server_info_lists_watch(start_server: Callable[..., Awaitable[Server]],
                                       connect: Connect) -> None:
    server = await start_server(max_watchers=3)
    info = await (await connect(server)).result("server.info")
    assert "watch" in info["capabilities"] and info["limits"]["max_watchers"] == 3


async def test_watch_errors_as_attach(start_server: Callable[..., Awaitable[Server]],
                                      connect: Connect) -> None:
    server = await start_server(replay_bytes=1024)
    client = await connect(server)
    assert (await client.error("watch", session_id="nope"))["code"] == -32002
    sid = (await client.execute(ECHO, stdin=True))["session_id"]
    for i in range(10):  # one output each, 301 bytes: the early ones leave the 1 KiB budgets
        await client.result("input", session_id=sid, data=f"{i}" * 300 + "\n")
        await until_output(client, sid, f"{i}" * 300)
    await client.result("input", session_id=sid, data="", eof=True)
    await completion(client, sid)
    error = await client.error("watch", session_id=sid, since_seq=0)
    assert error["code"] == -32006 and error["data"]["first_seq"] > 1, error
    assert not server.manager.get(sid).output.watchers  # nothing subscribed


async def test_watch_survives_attach_and_owner_disconnect(server: Server,
                                                          connect: Connect) -> None:
    first, watcher, second = [await connect(server) for _ in range(3)]
    sid = (await first.execute(ECHO, stdin=True, linger=30))["session_id"]
    await watcher.result("watch", session_id=sid)
    await until_output(watcher, sid, "ready")
    await second.result("attach", session_id=sid)
    await first.notification("process.detached", sid)
    await second.result("input", session_id=sid, data="moved\n")
    await until_output(watcher, sid, "MOVED")
    await second.ws.aclose()  # the owner goes; linger keeps the session
    await wait_for(lambda: not server.manager.get(sid).info().attached)
    await watcher.result("input", session_id=sid, data="alone\n")
    await until_output(watcher, sid, "ALONE")
    await watcher.result("control", session_id=sid, type="CANCEL")
    assert (await completion(watcher, sid))["status"] == "cancelled"


async def test_watcher_sees_pause_resume_and_paused_on_watch(server: Server,
                                                              connect: Connect) -> None:
    owner, watcher, late = [await connect(server) for _ in range(3)]
    sid = (await owner.execute(ECHO, stdin=True))["session_id"]
    await watcher.result("watch", session_id=sid)
    await until_output(watcher, sid, "ready")
    await owner.result("control", session_id=sid, type="PAUSE")
    assert await watcher.notification("process.paused", sid) == {"session_id": sid}
    result = await late.result("watch", session_id=sid)
    assert result["status"] == "paused"
    events = await events_until(late, sid, "process.paused")
    methods = [m for m, _ in events]  # the replay ("ready"), then the state
    assert methods[-1] == "process.paused" and set(methods[:-1]) == {"process.output"}
    await owner.result("control", session_id=sid, type="RESUME")
    assert await watcher.notification("process.resumed", sid) == {"session_id": sid}
    assert await late.notification("process.resumed", sid) == {"session_id": sid}
    await owner.result("control", session_id=sid, type="CANCEL")
    for client in (owner, watcher, late):
        assert (await completion(client, sid))["status"] == "cancelled"


async def test_lagged_watcher_does_not_slow_the_child(
        start_server: Callable[..., Awaitable[Server]], connect: Connect) -> None:
    """A watcher that reads nothing while 24 MiB go by: the child and the owner finish; the
    watcher, when it reads, gets what was still held for it, then process.lagged."""
    server = await start_server(replay_bytes=256 * 1024)
    owner, watcher = await connect(server), await connect(server)
    code = ("import sys\nsys.stdin.readline()\n"
            "for i in range(384): sys.stdout.write(str(i % 10) * 65536)\n")
    sid = (await owner.execute(py(code), stdin=True))["session_id"]
    await watcher.result("watch", session_id=sid)  # then it reads nothing until the end
    await owner.result("input", session_id=sid, data="go\n")
    outputs, done = await owner.run_to_completion(sid)
    assert done["status"] == "exited" and done["stdout_bytes"] == 384 * 65536
    assert sum(len(o["data"]) for o in outputs) == 384 * 65536
    received = []
    with trio.fail_after(30):
        while True:
            message = await watcher.receive()
            if message.get("method") == "process.output":
                received.append(message["params"]["seq"])
            elif message.get("method") == "process.lagged":
                lagged = message["params"]
                break
            else:
                raise AssertionError(f"unexpected {str(message)[:200]}")
    assert received == list(range(len(received)))
    assert lagged["session_id"] == sid and lagged["first_seq"] > (received or [-1])[-1]
    await wait_for(lambda: not server.manager.get(sid).output.watchers)  # its place is freed
    await watcher.result("ping")
    assert not watcher.notifications  # nothing more of that session after process.lagged
    again = await watcher.result("watch", session_id=sid)  # and it may watch again
    assert again["next_seq"] == outputs[-1]["seq"] + 1
    await completion(watcher, sid)


async def test_a_lagged_watcher_that_stopped_reading_gives_up_its_place(
        start_server: Callable[..., Awaitable[Server]], connect: Connect) -> None:
    """A watcher that reads nothing has lagged once the output it needs is evicted: its place
    (CCX_MAX_WATCHERS) is free at once, not when its socket finally takes process.lagged."""
    server = await start_server(replay_bytes=256 * 1024, max_watchers=1)
    owner, stalled, other = [await connect(server) for _ in range(3)]
    code = ("import sys\nsys.stdin.readline()\n"
            "for i in range(384): sys.stdout.write(str(i % 10) * 65536)\n")
    sid = (await owner.execute(py(code), stdin=True))["session_id"]
    await stalled.result("watch", session_id=sid)  # then it reads nothing
    await owner.result("input", session_id=sid, data="go\n")
    _, done = await owner.run_to_completion(sid)
    assert done["status"] == "exited"
    watched = await other.result("watch", session_id=sid)  # the one place is free
    assert watched["session_id"] == sid
    assert (await completion(other, sid))["status"] == "exited"
    lagged = None
    with trio.fail_after(30):  # the stalled one still gets its notice when it reads
        while lagged is None:
            message = await stalled.receive()
            if message.get("method") == "process.lagged":
                lagged = message["params"]
    assert lagged["session_id"] == sid
