"""PROTOCOL.md 10 ("Routing") through a real balancer: three `ccx serve` nodes, each PID 1 of
its own PID namespace, behind HAProxy balancing plain round-robin (no routing rules: only
forwarding makes a session reachable from a node that does not hold it). Sessions started on
every node are found, controlled, attached and watched from every other node with nothing lost
or repeated; `kill -9` of a node gives its sessions -32008 within 5 s (and `restarted` once it
is back), the others untouched, no orphan; a drained node gets no new session once HAProxy sees
/ready fail while its sessions stay reachable; `ccx ps --all` lists every node and names a
down one; a client that does not read throttles a child on another node.

The harness is tests/cluster_harness.py; HAProxy comes from .ci/haproxy (skipped, saying so,
without it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from cluster_harness import (
    CCX,
    Balancer,
    Fleet,
    need_haproxy,
    outputs_of,
    processes_with,
)
from conftest import PY, RawClient, py

from ccx.client import Output, connect

need_haproxy()

FIRST, SECOND = 300, 200  # lines the printer writes before and after its input


def _line(i: int) -> str:
    return f"{i:05d} " + "abcdefghij" * 9 + "\n"


EXPECTED = "".join(_line(i) for i in range(FIRST + SECOND)) + "bye\n"
PRINTER = py(
    "import sys\n"
    f"line = lambda i: f'{{i:05d}} ' + 'abcdefghij' * 9\n"
    f"for i in range({FIRST}): print(line(i))\n"
    "sys.stdout.flush()\n"
    "sys.stdin.readline()\n"
    f"for i in range({FIRST}, {FIRST + SECOND}): print(line(i))\n"
    "print('bye')\n")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), 3, CCX_REPLAY_BYTES=str(256 * 1024))
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def own_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A fleet this test may break (kill -9 a node)."""
    fleet = Fleet(tmp_path, 3)
    try:
        yield fleet
    finally:
        fleet.close()


async def _completed(client: RawClient, session_id: str) -> tuple[list[dict[str, Any]],
                                                                  dict[str, Any]]:
    with trio.fail_after(30):
        return await client.run_to_completion(session_id)


def _check_stream(outputs: list[dict[str, Any]]) -> None:
    """Every output once, in seq order from 0, and byte for byte what the child wrote."""
    assert [o["seq"] for o in outputs] == list(range(len(outputs))), \
        [o["seq"] for o in outputs]
    assert "".join(o["data"] for o in outputs) == EXPECTED


async def test_sessions_of_every_node_are_served_by_every_node(
        fleet: Fleet, nursery: trio.Nursery) -> None:
    on = await fleet.through_balancer(nursery)
    names = sorted(on)
    assert names == sorted(fleet.nodes)
    for i, owner in enumerate(names):
        watcher, attacher = names[(i + 1) % 3], names[(i + 2) % 3]
        started = await on[owner].result("execute", command=PRINTER, stdin=True, linger=60)
        sid = started["session_id"]
        assert sid.startswith(f"{owner}.")
        # Found from every node, as on its own.
        for name in names:
            status = await on[name].result("status", session_id=sid)
            assert status["session_id"] == sid and status["status"] == "running"
        # Watched from one node, controlled from it, attached (moved) from the third.
        watched = await on[watcher].result("watch", session_id=sid, since_seq=-1)
        assert watched["session_id"] == sid
        assert not outputs_of(on[watcher].notifications, sid), "output before the result"
        assert (await on[watcher].result("control", session_id=sid, type="PAUSE"))[
            "status"] == "paused"
        assert (await on[watcher].result("control", session_id=sid, type="RESUME"))[
            "status"] == "running"
        attached = await on[attacher].result("attach", session_id=sid, since_seq=-1)
        assert attached["session_id"] == sid
        assert not outputs_of(on[attacher].notifications, sid), "output before the result"
        with trio.fail_after(15):
            await on[owner].notification("process.detached", sid)
        assert (await on[attacher].result("input", session_id=sid, data="go\n"))["bytes"] == 3
        for name in (attacher, watcher):
            outputs, done = await _completed(on[name], sid)
            _check_stream(outputs)
            assert done["status"] == "exited" and done["exit_code"] == 0
        assert await on[watcher].result("unwatch", session_id=sid) == {
            "session_id": sid, "watching": False}
        # An ended session's state error, as the owner node said it, is passed on.
        error = await on[attacher].error("control", session_id=sid, type="PAUSE")
        assert error["code"] == -32004 and error["data"]["status"] == "exited"


async def test_unknown_id_of_a_live_node_is_its_own_32002(
        fleet: Fleet, nursery: trio.Nursery) -> None:
    on = await fleet.through_balancer(nursery)
    infos = {n: await c.result("server.info") for n, c in on.items()}
    for name, client in on.items():
        for other, info in infos.items():
            if other == name:
                continue
            sid = f"{other}.{info['incarnation']}.nope"
            error = await client.error("attach", session_id=sid)
            assert error["code"] == -32002 and error["data"] == {"session_id": sid}, error


async def test_a_client_that_does_not_read_throttles_a_child_on_another_node(
        fleet: Fleet, nursery: trio.Nursery) -> None:
    """Back-pressure through one forwarding hop: the attached client never reads, so the
    child's written count (ccx's stdout_bytes) stops growing; then it reads, and it grows."""
    on = await fleet.through_balancer(nursery)
    owner, reader = "ccx-0", "ccx-1"
    writer = py("import sys\nwhile True: sys.stdout.write('y' * 65536)\n")
    started = await on[owner].result("execute", command=writer, linger=60, encoding="base64")
    sid = started["session_id"]
    slow = await fleet.dial(nursery, fleet.nodes[reader].port)  # straight to ccx-1: one hop
    assert (await slow.result("attach", session_id=sid))["session_id"] == sid
    # The owner node's connection is now ccx-1's link; ccx-0's old one no longer receives.
    ask = on["ccx-2"]

    async def stalled() -> int:
        """stdout_bytes once it has not moved over several looks at it."""
        last, same = -1, 0
        with trio.fail_after(60):
            while same < 5:
                count = (await ask.result("status", session_id=sid))["stdout_bytes"]
                same = same + 1 if count == last else 0
                last = count
                await trio.sleep(0.1)
        return last

    try:
        held = await stalled()
        # Bounded: the session's unsent budget (256 KiB here) plus the socket buffers of the
        # two hops, not the child's speed.
        assert held < 32 * 1024 * 1024, held
        received = 0
        with trio.fail_after(30):
            while received < 4 * 1024 * 1024:  # reading again lets the child write on
                message = await slow.receive()
                if message.get("method") == "process.output":
                    received += len(message["params"]["data"]) * 3 // 4
        assert (await ask.result("status", session_id=sid))["stdout_bytes"] > held
    finally:
        await ask.result("control", session_id=sid, type="CANCEL")


async def test_drained_node_gets_no_new_sessions_but_serves_its_own(
        fleet: Fleet, nursery: trio.Nursery) -> None:
    on = await fleet.through_balancer(nursery)
    drained = "ccx-2"
    started = await on[drained].result("execute", command=PRINTER, stdin=True, linger=60)
    sid = started["session_id"]
    direct = await fleet.dial(nursery, fleet.nodes[drained].port)
    assert (await direct.result("drain"))["draining"] is True
    try:
        await fleet.lb.await_states({drained: "DOWN"})  # HAProxy has seen /ready fail
        for _ in range(6):
            client = await fleet.dial(nursery)
            new = await client.result("execute", command=["true"])
            assert not new["session_id"].startswith(f"{drained}."), new
            await client.ws.aclose()
        # Its own session is still reachable through the balancer: attach, input, output.
        client = await fleet.dial(nursery)
        assert (await client.result("attach", session_id=sid))["session_id"] == sid
        await client.result("input", session_id=sid, data="go\n")
        outputs, done = await _completed(client, sid)
        _check_stream(outputs)
        assert done["exit_code"] == 0
    finally:
        await direct.result("drain", undo=True)
        await fleet.lb.await_states({drained: "UP"})


async def test_kill_9_of_a_node_loses_its_sessions_only(
        own_fleet: Fleet, nursery: trio.Nursery) -> None:
    fleet = own_fleet
    on = await fleet.through_balancer(nursery)
    markers = {name: f"ccx-test-{uuid.uuid4().hex}" for name in on}
    sessions = {}
    for name, client in on.items():
        command = [PY, "-c", "import time; print('ready', flush=True); time.sleep(1000)",
                   markers[name]]
        sessions[name] = (await client.result("execute", command=command,
                                              linger=60))["session_id"]
        with trio.fail_after(15):
            await client.notification("process.output", sessions[name])
    victim = "ccx-1"
    assert processes_with(markers[victim])
    fleet.nodes[victim].kill9()
    killed_at = time.monotonic()
    assert not processes_with(markers[victim]), "a process outlived its node"
    for name in ("ccx-0", "ccx-2"):
        with trio.fail_after(5):
            error = await on[name].error("status", session_id=sessions[victim])
        assert error["code"] == -32008, error
        assert error["data"] == {"node": victim, "reason": "unreachable"}, error
        for other in ("ccx-0", "ccx-2"):
            status = await on[name].result("status", session_id=sessions[other])
            assert status["status"] == "running"
    assert time.monotonic() - killed_at < 5
    # Through the balancer (which may not have noticed yet): still -32008, never -32002.
    client = await fleet.dial(nursery)
    for method, params in (("attach", {}), ("watch", {}), ("input", {"data": "x"}),
                           ("control", {"type": "CANCEL"})):
        error = await client.error(method, session_id=sessions[victim], **params)
        assert error["code"] == -32008 and error["data"]["reason"] == "unreachable", error
    # The fleet view answers with the node down, and names it.
    with trio.fail_after(2):
        listed = await on["ccx-2"].result("sessions", scope="cluster")
    assert listed["unreachable"] == [victim]
    assert {s["node"] for s in listed["sessions"]} >= {"ccx-0", "ccx-2"}
    assert {s["session_id"] for s in listed["sessions"]} >= {sessions["ccx-0"],
                                                             sessions["ccx-2"]}
    table = subprocess.run([CCX, "ps", "--all", "--url", fleet.lb.url], capture_output=True,
                           text=True, timeout=30, env={**os.environ})
    assert table.returncode == 0, table.stderr
    assert sessions["ccx-0"] in table.stdout and sessions["ccx-2"] in table.stdout
    assert f"{victim}: unreachable" in table.stdout, table.stdout
    # The node comes back (a new incarnation): its old ids are `restarted`, here and there.
    fleet.nodes[victim].start()
    await trio.to_thread.run_sync(fleet.nodes[victim].wait_up)
    back = await fleet.dial(nursery, fleet.nodes[victim].port)
    for client in (on["ccx-0"], back):
        error = await client.error("status", session_id=sessions[victim])
        assert error["code"] == -32008, error
        assert error["data"] == {"node": victim, "reason": "restarted"}, error
    for name in ("ccx-0", "ccx-2"):
        await on[name].result("control", session_id=sessions[name], type="CANCEL")


async def test_ccx_cli_works_through_any_node(fleet: Fleet, nursery: trio.Nursery) -> None:
    """`ccx status ID`, `ccx attach ID` and `ccx cancel ID` through the balancer, whichever
    node each lands on."""
    on = await fleet.through_balancer(nursery)
    command = py("import sys; print('hello', flush=True); sys.stdin.readline(); print('bye')")
    sid = (await on["ccx-0"].result("execute", command=command, stdin=True,
                                    linger=60))["session_id"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CCX, *args], capture_output=True, text=True, timeout=30)

    for _ in range(3):  # round-robin: each lands on another node
        status = await trio.to_thread.run_sync(cli, "status", "--url", fleet.lb.url, sid)
        assert status.returncode == 0 and sid in status.stdout, status.stderr
    attach = subprocess.Popen([CCX, "attach", "--url", fleet.lb.url, sid],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with trio.fail_after(15):  # attached once the session is no longer ccx-0's
            await on["ccx-0"].notification("process.detached", sid)
        await on["ccx-1"].result("input", session_id=sid, data="go\n")
        out, err = await trio.to_thread.run_sync(lambda: attach.communicate(timeout=30))
    finally:
        if attach.poll() is None:
            attach.kill()
            attach.wait()
    assert attach.returncode == 0 and out == "hello\nbye\n", (out, err)
    cancel = await trio.to_thread.run_sync(cli, "cancel", "--url", fleet.lb.url, sid)
    assert cancel.returncode == 0 and "exited" in cancel.stdout, (cancel.stdout, cancel.stderr)


@pytest.fixture(scope="module")
def routed(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    """A second HAProxy over the same nodes, with deploy/routing/haproxy.cfg's `?node=` rules."""
    balancer = Balancer(list(fleet.nodes.values()), tmp_path_factory.mktemp("routed"),
                        routed=True)
    try:
        balancer.wait_states({n: "UP" for n in fleet.nodes})
        yield balancer
    finally:
        balancer.stop()


async def test_shipped_haproxy_rules_route_node_param_even_to_a_draining_node(
        fleet: Fleet, routed: Balancer, nursery: trio.Nursery) -> None:
    async def lands(node: str | None) -> str:
        client = await fleet.dial(nursery, routed.port,
                                  "/ws" if node is None else f"/ws?node={node}")
        try:
            return str((await client.result("server.info"))["node"])
        finally:
            await client.ws.aclose()

    for name in fleet.nodes:
        for _ in range(3):
            assert await lands(name) == name
    direct = await fleet.dial(nursery, fleet.nodes["ccx-1"].port)
    await direct.result("drain")
    try:
        await routed.await_states({"ccx-1": "DOWN"})
        for _ in range(3):
            assert await lands("ccx-1") == "ccx-1"  # its own sessions' clients still get there
            assert await lands(None) != "ccx-1"  # new connections do not
    finally:
        await direct.result("drain", undo=True)
        await routed.await_states({"ccx-1": "UP"})


async def test_lingering_client_comes_back_to_its_node_after_a_balancer_restart(
        fleet: Fleet, routed: Balancer) -> None:
    """The project's client re-dials `?node=<its session's node>`: through the shipped rules
    it reaches that node again, and the output goes on with no gap and nothing twice."""
    async with connect(f"ws://127.0.0.1:{routed.port}/ws") as client:
        session = await client.execute(PRINTER, stdin=True, linger=60)
        node = session.id.split(".")[0]
        assert client.redial_url() == f"ws://127.0.0.1:{routed.port}/ws?node={node}"
        outputs: list[Output] = []
        events = session.events()
        with trio.fail_after(30):
            while sum(o.data.count(b"\n") for o in outputs) < FIRST:
                event = await events.__anext__()
                if isinstance(event, Output):
                    outputs.append(event)
        routed.stop()  # every connection through it drops
        routed.start()
        with trio.fail_after(30):
            while client.reconnects < 1 or client.ws is None or client.ws.closed:
                await trio.sleep(0.02)
            assert (await client.server_info())["node"] == node
            await session.send("go\n")
            async for event in events:
                if isinstance(event, Output):
                    outputs.append(event)
        assert session.result is not None and session.result.exit_code == 0
    assert [o.seq for o in outputs] == list(range(len(outputs)))
    assert b"".join(o.data for o in outputs) == EXPECTED.encode()


async def test_mcp_tools_with_a_session_id_run_on_its_node(fleet: Fleet) -> None:
    """An MCP session started on ccx-0 is read and fed from ccx-1 (Streamable HTTP, the MCP
    SDK's client): the tool calls run on ccx-0, through ccx-1's MCP link to it; an id of an
    earlier ccx-0 is a tool error saying the session is lost."""
    from mcp.client.streamable_http import streamable_http_client
    from test_mcp import in_sdk, structured

    def mcp_url(node: str) -> str:
        return f"http://127.0.0.1:{fleet.nodes[node].port}/mcp"

    command = py("import sys; print('one', flush=True); sys.stdin.readline(); print('two')")

    async def start(session: Any) -> dict[str, Any]:
        return structured(await session.call_tool("start", {
            "command": command, "stdin": True, "linger": 60}))

    started = await in_sdk(lambda: streamable_http_client(mcp_url("ccx-0")), start)
    sid = started["session_id"]
    assert sid.startswith("ccx-0.")

    async def drive(session: Any) -> tuple[str, dict[str, Any], str]:
        first = structured(await session.call_tool("read_output", {
            "session_id": sid, "wait_s": 10}))
        await session.call_tool("send_input", {"session_id": sid, "data": "go\n"})
        text, offset = first["stdout"], first["next_stdout_offset"]
        while True:
            more = structured(await session.call_tool("read_output", {
                "session_id": sid, "stdout_offset": offset, "wait_s": 10}))
            text, offset = text + more["stdout"], more["next_stdout_offset"]
            if more["eof"]:
                break
        lost = await session.call_tool("read_output", {"session_id": "ccx-0.000000.x"})
        assert lost.isError
        return text, more, lost.content[0].text

    text, last, lost = await in_sdk(lambda: streamable_http_client(mcp_url("ccx-1")), drive)
    assert text == "one\ntwo\n" and last["status"] == "exited"
    assert "session lost" in lost and '"reason": "restarted"' in lost, lost


async def test_shipped_haproxy_rules_keep_an_mcp_http_session_on_its_node(
        routed: Balancer) -> None:
    """MCP over Streamable HTTP through the balancer: every request after `initialize` carries
    `Mcp-Session-Id` (`<node>.<incarnation>.<hex>`) and the shipped rules send it to that
    node, where the MCP session lives (round-robin alone would scatter the requests)."""
    from mcp.client.streamable_http import streamable_http_client
    from test_mcp import in_sdk, structured

    async def work(session: Any) -> list[str]:
        nodes = []
        for _ in range(6):  # more requests than nodes: round-robin would change node
            started = structured(await session.call_tool("start", {"command": ["true"]}))
            nodes.append(started["session_id"].split(".")[0])
        return nodes

    nodes = await in_sdk(lambda: streamable_http_client(f"http://127.0.0.1:{routed.port}/mcp"),
                         work)
    assert len(set(nodes)) == 1, nodes


async def test_forwarded_attach_owns_the_session_as_on_its_node(
        fleet: Fleet, nursery: trio.Nursery) -> None:
    """Section 8 through a hop: a forwarded attach takes the session over; another attach
    moves it away (`process.detached` comes through); closing the forwarding client's
    connection lets the owning node apply linger 0, i.e. cancel."""
    starter = await fleet.dial(nursery, fleet.nodes["ccx-0"].port)
    sid = (await starter.result("execute", command=["sleep", "1000"]))["session_id"]
    first = await fleet.dial(nursery, fleet.nodes["ccx-1"].port)
    await first.result("attach", session_id=sid)
    with trio.fail_after(15):
        await starter.notification("process.detached", sid)
    second = await fleet.dial(nursery, fleet.nodes["ccx-2"].port)
    await second.result("attach", session_id=sid)
    with trio.fail_after(15):
        await first.notification("process.detached", sid)
    assert (await starter.result("status", session_id=sid))["status"] == "running"
    await second.ws.aclose()  # ccx-2's link to ccx-0 closes: no linger, so cancelled
    with trio.fail_after(15):
        while (await starter.result("status", session_id=sid))["status"] == "running":
            await trio.sleep(0.05)
    assert (await starter.result("status", session_id=sid))["status"] == "cancelled"


async def test_a_hung_node_is_reported_in_time(fleet: Fleet, nursery: trio.Nursery) -> None:
    """A node that stops answering (SIGSTOP: its sockets stay open, nothing is refused):
    the fleet view answers within 2 s naming it, requests for its sessions get -32008 within
    5 s, and once it runs again everything is as before."""
    on = await fleet.through_balancer(nursery)
    hung = "ccx-2"
    sid = (await on[hung].result("execute", command=["sleep", "1000"],
                                 linger=60))["session_id"]
    await on["ccx-0"].result("status", session_id=sid)  # ccx-0's pooled connection is open
    os.kill(fleet.nodes[hung].pid, signal.SIGSTOP)
    try:
        with trio.fail_after(2):
            listed = await on["ccx-1"].result("sessions", scope="cluster")
        assert listed["unreachable"] == [hung], listed
        for name in ("ccx-0", "ccx-1"):
            with trio.fail_after(5):
                error = await on[name].error("status", session_id=sid)
            assert error["code"] == -32008, error
            assert error["data"] == {"node": hung, "reason": "unreachable"}, error
    finally:
        os.kill(fleet.nodes[hung].pid, signal.SIGCONT)
    assert (await on["ccx-0"].result("status", session_id=sid))["status"] == "running"
    await on["ccx-0"].result("control", session_id=sid, type="CANCEL")
    await fleet.lb.await_states({n: "UP" for n in fleet.nodes})


async def test_a_client_relayed_through_a_node_is_told_when_the_owner_dies(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """kill -9 of the owning node: a client attached to one of its sessions, and watching
    another, through a second node hears at once (`process.detached` with the -32008 data,
    docs/protocol-notes.md "Node loss"), not only at its next request; the forwarding node
    and the client's connection stay up. `ccx attach` through that node says so and exits 1.
    """
    fleet = Fleet(tmp_path, 2)
    cli = None
    try:
        owner, relay = "ccx-1", "ccx-0"
        starter = await fleet.dial(nursery, fleet.nodes[owner].port)
        command = [PY, "-c", "import time; print('ready', flush=True); time.sleep(1000)"]
        attached, watched, by_cli = [(await starter.result(
            "execute", command=command, linger=60))["session_id"] for _ in range(3)]
        cli = subprocess.Popen([CCX, "attach", "--url", fleet.nodes[relay].url, by_cli],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with trio.fail_after(15):  # attached once the session is no longer the starter's
            await starter.notification("process.detached", by_cli)
        client = await fleet.dial(nursery, fleet.nodes[relay].port)
        assert (await client.result("attach", session_id=attached))["session_id"] == attached
        assert (await client.result("watch", session_id=watched))["session_id"] == watched
        for sid in (attached, watched):  # the relay works: each one's output came through
            with trio.fail_after(15):
                await client.notification("process.output", sid)
        fleet.nodes[owner].kill9()
        killed_at = time.monotonic()
        told = {}
        with trio.fail_after(30):  # hang guard; the bound is checked below
            for sid in (attached, watched):
                told[sid] = await client.notification("process.detached", sid)
        assert time.monotonic() - killed_at < 5
        for sid in (attached, watched):
            assert told[sid] == {"session_id": sid, "node": owner, "reason": "unreachable"}
        out, err = await trio.to_thread.run_sync(lambda: cli.communicate(timeout=30))
        assert cli.returncode == 1 and out == "ready\n", (cli.returncode, out, err)
        assert f"session {by_cli} lost: node {owner} is unreachable" in err, err
        # The same connection goes on: its requests about them say lost, others are served.
        error = await client.error("status", session_id=attached)
        assert error["code"] == -32008 and error["data"]["reason"] == "unreachable", error
        local = await client.result("execute", command=["echo", "still here"])
        outputs, done = await _completed(client, local["session_id"])
        assert "".join(o["data"] for o in outputs) == "still here\n" and done["exit_code"] == 0
    finally:
        if cli is not None and cli.poll() is None:
            cli.kill()
            cli.wait()
        fleet.close()


async def test_forwarded_input_to_a_hung_node_answers_32008(
        fleet: Fleet, nursery: trio.Nursery) -> None:
    """The owning node stops (SIGSTOP: its sockets stay open, nothing answers): a forwarded
    `input` gets -32008 `unreachable` within 5 s instead of waiting for ever; the attached
    client is told its session is lost; once the node runs again, input goes through."""
    hung, relay = "ccx-2", "ccx-0"
    starter = await fleet.dial(nursery, fleet.nodes[hung].port)
    sid = (await starter.result("execute", command=["cat"], stdin=True,
                                linger=60))["session_id"]
    client = await fleet.dial(nursery, fleet.nodes[relay].port)
    await client.result("attach", session_id=sid)
    assert (await client.result("input", session_id=sid, data="one\n"))["bytes"] == 4
    with trio.fail_after(15):
        assert (await client.notification("process.output", sid))["data"] == "one\n"
    os.kill(fleet.nodes[hung].pid, signal.SIGSTOP)
    try:
        sent_at = time.monotonic()
        with trio.fail_after(30):  # hang guard; the bound is checked below
            error = await client.error("input", session_id=sid, data="two\n")
        assert time.monotonic() - sent_at < 5
        assert error["code"] == -32008, error
        assert error["data"] == {"node": hung, "reason": "unreachable"}, error
        with trio.fail_after(15):
            told = await client.notification("process.detached", sid)
        assert told == {"session_id": sid, "node": hung, "reason": "unreachable"}
        assert (await client.result("ping"))["pong"] is True  # the forwarding node is fine
    finally:
        os.kill(fleet.nodes[hung].pid, signal.SIGCONT)
    # Running again: attached anew (a new link), input and output go through. ("two" may
    # or may not have been written: the node read it when it woke, or never.)
    with trio.fail_after(30):
        await client.result("attach", session_id=sid, since_seq=0)
        assert (await client.result("input", session_id=sid, data="three\n"))["bytes"] == 6
        text = ""
        while not text.endswith("three\n"):
            text += (await client.notification("process.output", sid))["data"]
    assert text in ("three\n", "two\nthree\n"), text
    await client.result("control", session_id=sid, type="CANCEL")
    await fleet.lb.await_states({n: "UP" for n in fleet.nodes})


async def test_forwarded_input_waits_for_a_child_that_does_not_read(
        fleet: Fleet, nursery: trio.Nursery) -> None:
    """The deadline is on the node, not on the child: a forwarded `input` waiting for a
    paused child (a full pipe) longer than the node's deadline is still answered, with every
    byte written, once the child reads again."""
    owner, relay = "ccx-1", "ccx-2"
    starter = await fleet.dial(nursery, fleet.nodes[owner].port)
    counter = py("import sys; print(len(sys.stdin.buffer.read()), flush=True)")
    sid = (await starter.result("execute", command=counter, stdin=True))["session_id"]
    assert (await starter.result("control", session_id=sid, type="PAUSE"))[
        "status"] == "paused"
    client = await fleet.dial(nursery, fleet.nodes[relay].port)
    size = 512 * 1024  # well past a pipe's 64 KiB: the write waits for the child
    request = {"jsonrpc": "2.0", "id": "big", "method": "input",
               "params": {"session_id": sid, "data": "x" * size, "eof": True}}
    await client.send(request)
    with trio.move_on_after(7):  # longer than a hung node gets (the 5 s of PROTOCOL.md 10)
        reply = await client.response("big")
        raise AssertionError(f"input answered while the child was paused: {reply}")
    await starter.result("control", session_id=sid, type="RESUME")
    with trio.fail_after(30):
        reply = await client.response("big")
    assert reply.get("result") == {"session_id": sid, "bytes": size}, reply
    outputs, done = await _completed(starter, sid)
    assert "".join(o["data"] for o in outputs) == f"{size}\n" and done["exit_code"] == 0


async def test_mcp_send_input_to_a_hung_node_is_a_lost_session(
        fleet: Fleet, nursery: trio.Nursery) -> None:
    """MCP `send_input` forwarded (Streamable HTTP, the MCP SDK's client) to a node that has
    stopped (SIGSTOP): an `isError` result saying the session is lost, within 5 s."""
    from mcp.client.streamable_http import streamable_http_client
    from test_mcp import in_sdk, structured

    hung, relay = "ccx-2", "ccx-1"

    def mcp_url(node: str) -> str:
        return f"http://127.0.0.1:{fleet.nodes[node].port}/mcp"

    async def start(session: Any) -> dict[str, Any]:
        return structured(await session.call_tool("start", {
            "command": ["cat"], "stdin": True, "linger": 60}))

    sid = (await in_sdk(lambda: streamable_http_client(mcp_url(hung)), start))["session_id"]
    pid = fleet.nodes[hung].pid

    async def drive(session: Any) -> tuple[Any, float]:
        structured(await session.call_tool("send_input", {"session_id": sid, "data": "one\n"}))
        os.kill(pid, signal.SIGSTOP)
        sent_at = time.monotonic()
        result = await session.call_tool("send_input", {"session_id": sid, "data": "two\n"})
        return result, time.monotonic() - sent_at

    try:
        result, took = await in_sdk(lambda: streamable_http_client(mcp_url(relay)), drive)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert result.isError, result
    assert "session lost" in result.content[0].text, result.content
    assert '"reason": "unreachable"' in result.content[0].text, result.content
    assert took < 5, took
    direct = await fleet.dial(nursery, fleet.nodes[hung].port)
    await direct.result("control", session_id=sid, type="CANCEL")
    await fleet.lb.await_states({n: "UP" for n in fleet.nodes})


async def test_watch_and_attach_over_a_link_busy_relaying_output(
        fleet: Fleet, nursery: trio.Nursery) -> None:
    """One client connection, one link: while the link relays a flood of output of a session
    it attached, further `watch`/`attach` requests over that link are answered (the relayed
    output read before their answers is not held back waiting for them, which would leave
    the answers unread behind it until -32008)."""
    owner, relay = "ccx-0", "ccx-1"
    starter = await fleet.dial(nursery, fleet.nodes[owner].port)
    flood = py("import sys\nwhile True:\n    sys.stdout.write('y' * 4096)\n    sys.stdout.flush()\n")
    quiet = [PY, "-c", "import time; print('ready', flush=True); time.sleep(1000)"]
    flooding = (await starter.result("execute", command=flood, linger=60))["session_id"]
    others = [(await starter.result("execute", command=quiet, linger=60))["session_id"]
              for _ in range(2)]
    client = await fleet.dial(nursery, fleet.nodes[relay].port)
    try:
        await client.result("attach", session_id=flooding)
        with trio.fail_after(15):
            await client.notification("process.output", flooding)
        with trio.fail_after(30):
            for _ in range(3):
                for sid in others:
                    watched = await client.request("watch", session_id=sid)
                    assert watched.get("result", {}).get("session_id") == sid, watched
                    client.notifications.clear()  # keep the flood from piling up here
            attached = await client.request("attach", session_id=others[0])
            assert attached.get("result", {}).get("session_id") == others[0], attached
    finally:
        for sid in (flooding, *others):
            await starter.result("control", session_id=sid, type="CANCEL")
