"""CCX_MAX_HELD_BYTES from inside (the attacks are in test_sec_memory_held.py): the count is
exact, a client that reads is never starved by one that does not, and nothing is dropped.

Rules: as in conftest (in-process servers on 127.0.0.1:0, real children, deadlines, no
group left behind). The server's own count (`manager.held`) is compared with the bytes each
session and MCP buffer says it keeps.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from conftest import RawClient, join, py, wait_for
from test_mcp import initialize, mcp_client

from ccx.mcp_buffer import STREAMS
from ccx.outbox import Held, HeldBudget, Outbox
from ccx.server import Server

Connect = Callable[..., Awaitable[RawClient]]
KIB = 1024


def accounted(server: Server) -> int:
    """Bytes the sessions and MCP buffers say they hold: what `manager.held` must count.
    (`manager.all()` first forgets what retention let go, so compare after calling this.)"""
    manager = server.manager
    return sum(s.output.held_bytes for s in manager.all()) + sum(
        b.held_bytes(stream) for b in manager.mcp_buffers.values() for stream in STREAMS)


def writes(size: int, *, delay: float = 0.0) -> list[str]:
    return py(f"import sys, time; time.sleep({delay}); sys.stdout.buffer.write(b'w' * {size})")


async def test_held_count_is_exact_and_returns_to_zero(start_server: Any,
                                                       connect: Connect) -> None:
    # Retention long enough that nothing is forgotten before the end, even on a loaded host.
    server = await start_server(retention=4.0, replay_bytes=64 * KIB, spool_dir="memory")
    client = await connect(server)
    out, _, completed = await client.run(writes(300 * KIB), encoding="base64")
    assert out == b"w" * 300 * KIB and completed["status"] == "exited"
    expected = accounted(server)
    assert 0 < server.manager.held.held_bytes == expected  # replay kept
    # Detached with unsent output, then attached again from the start (a rewind).
    gone = await connect(server)
    sid = (await gone.execute(writes(100 * KIB, delay=0.5), linger=30))["session_id"]
    await gone.ws.aclose()
    await wait_for(lambda: server.manager.find(sid) is not None
                   and server.manager.find(sid).state.value == "exited")  # type: ignore[union-attr]
    expected = accounted(server)
    assert server.manager.held.held_bytes == expected
    await client.result("attach", {"session_id": sid, "since_seq": -1})
    outputs, _ = await client.run_to_completion(sid)
    assert join(outputs, "stdout") == b"w" * 100 * KIB
    # An MCP session's buffer counts too, until it is read.
    mcp = await mcp_client(connect, server)
    await initialize(mcp)
    started = await mcp.result("tools/call", {"name": "start", "arguments": {
        "command": writes(50 * KIB)}})
    msid = started["structuredContent"]["session_id"]
    await wait_for(lambda: server.manager.mcp_buffers[msid].ended)
    assert server.manager.mcp_buffers[msid].held_bytes("stdout") == 50 * KIB
    expected = accounted(server)
    assert server.manager.held.held_bytes == expected
    # Retention over: everything forgotten, every byte let go.
    await wait_for(lambda: not list(server.manager.all()), timeout=20)
    assert server.manager.held.held_bytes == 0


async def test_a_reading_client_is_not_starved_by_one_that_does_not_read(
        start_server: Any, connect: Connect) -> None:
    """One detached session fills the server's budget with unsent output; another client's
    session, read as it comes, still runs to its end; new executes wait for room."""
    server = await start_server(max_held_bytes=256 * KIB, spool_dir="memory")
    reader = await connect(server)
    size = 2 * 1024 * KIB
    steady = await reader.execute(writes(size, delay=1.0), encoding="base64")
    hog_client = await connect(server)
    hog = (await hog_client.execute(writes(size), linger=30))["session_id"]
    await hog_client.ws.aclose()
    await wait_for(lambda: server.manager.held.full)
    outputs, completed = await reader.run_to_completion(steady["session_id"])
    assert join(outputs, "stdout") == b"w" * size and completed["status"] == "exited"
    hog_info = await reader.result("status", {"session_id": hog})
    assert hog_info["status"] == "running" and hog_info["stdout_bytes"] < size, hog_info
    error = await reader.error("execute", {"command": ["true"]})
    assert error["code"] == -32003 and error["data"]["scope"] == "held_bytes", error
    # Ending the hog does not drop its output: the budget stays full until it is read.
    await reader.result("control", {"session_id": hog, "type": "CANCEL"})
    await wait_for(lambda: not server.manager.find(hog).running)  # type: ignore[union-attr]
    assert (await reader.error("execute", {"command": ["true"]}))["code"] == -32003
    await reader.result("attach", {"session_id": hog})
    outputs, completed = await reader.run_to_completion(hog)
    assert [o["seq"] for o in outputs] == list(range(len(outputs)))
    data = join(outputs, "stdout")
    assert data == b"w" * completed["stdout_bytes"] and len(data) >= hog_info["stdout_bytes"]
    with trio.fail_after(10):
        await reader.run(["true"])
    assert server.manager.held.held_bytes == accounted(server)


# Plain synchronous checks of the budget itself (no server): the order of reclaim, and that
# unsent output is never what goes.


def output(box: Outbox, size: int) -> Held:
    return Held("process.output", b"o" * size, box.take_seq())


def test_reclaim_forgets_the_oldest_sent_output_first_across_sessions() -> None:
    budget = HeldBudget(limit_bytes=1000)
    boxes = [Outbox(10_000, budget) for _ in range(3)]
    for _ in range(3):
        for box in boxes:
            box.push(output(box, 100))
            box.delivered()
    assert budget.held_bytes == 900 and not budget.full
    boxes[0].push(output(boxes[0], 200))  # 1100: reclaim down to 875, oldest first
    assert budget.held_bytes == 800
    assert [len(b.sent) for b in boxes] == [2, 2, 2], "one frame of each, oldest round first"
    assert [h.seq for h in boxes[0].sent] == [1, 2] and len(boxes[0].pending) == 1
    assert budget.held_bytes == sum(b.frame_bytes for b in boxes)


def test_unsent_output_is_never_reclaimed_and_waiters_wake_on_release() -> None:
    budget = HeldBudget(limit_bytes=300)
    hog, reader = Outbox(10_000, budget), Outbox(10_000, budget)
    for _ in range(3):
        hog.push(output(hog, 100))
    assert budget.full and len(hog.pending) == 3
    woken: list[int] = []
    budget.wait_for_room(lambda: woken.append(1))
    budget.wait_for_room(lambda: woken.append(2))
    reader.push(output(reader, 50))  # a session with nothing unsent may queue one frame
    reader.delivered()  # sent while full: forgotten at once, but still above the limit
    assert budget.held_bytes == 300 and not reader.sent and woken == []
    hog.delivered()
    assert budget.held_bytes == 200 and woken == [1, 2], "released below the limit: wake all"
    hog.clear()
    reader.clear()
    assert budget.held_bytes == 0
