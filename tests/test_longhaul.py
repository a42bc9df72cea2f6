"""Long-haul sessions (PROTOCOL.md section 8): detach on a dropped connection, attach, replay.

Rules: as in conftest; a `CuttableProxy` on 127.0.0.1 stands between client and server so a
test can drop the TCP connection mid-stream the way a network would (both sockets closed at
once, nothing flushed). Outputs are checked byte for byte (sha256) with contiguous seqs.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import trio
import trio_websocket
from conftest import RawClient, group_alive, py, wait_for

from ccx.server import Server

# 50 MB of deterministic, non-repeating-looking bytes: a counter in every 8-byte word.
BIG_CODE = (
    "import sys, struct\n"
    "out = sys.stdout.buffer\n"
    "for block in range(50 * 1024 * 1024 // 65536):\n"
    "    out.write(b''.join(struct.pack('<Q', block * 8192 + i) for i in range(8192)))\n"
)
BIG_BYTES = 50 * 1024 * 1024


def expected_big() -> bytes:
    import struct

    return b"".join(struct.pack("<Q", i) for i in range(BIG_BYTES // 8))


class CuttableProxy:
    """A loopback TCP relay whose live connections can all be cut at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._streams: list[trio.SocketStream] = []

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        self._streams += [client, server]

        async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
            try:
                while data := await source.receive_some(65536):
                    await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, server)
            nursery.start_soon(pump, server, client)

    async def cut(self) -> None:
        for stream in self._streams:
            await stream.aclose()
        self._streams.clear()


async def open_via(nursery: trio.Nursery, port: int) -> RawClient:
    ws = await trio_websocket.connect_websocket(nursery, "127.0.0.1", port, "/ws", use_ssl=False,
                                                max_message_size=16 * 1024 * 1024)
    return RawClient(ws)


def decode(params: dict[str, Any]) -> bytes:
    if params.get("encoding") == "base64":
        return base64.b64decode(params["data"])
    return str(params["data"]).encode()


async def read_outputs(client: RawClient, session_id: str, *, until_bytes: int | None = None,
                       collected: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Append this session's outputs to *collected*; return process.completed if it came,
    or None once *until_bytes* were read."""
    total = sum(len(decode(p)) for p in collected)
    while True:
        message = await client.receive()
        params = message.get("params", {})
        if params.get("session_id") != session_id:
            continue
        if message.get("method") == "process.output":
            collected.append(params)
            total += len(decode(params))
            if until_bytes is not None and total >= until_bytes:
                return None
        elif message.get("method") == "process.completed":
            return params  # type: ignore[no-any-return]


async def cut_and_resume(server: Server, nursery: trio.Nursery, encoding: str) -> None:
    proxy: CuttableProxy = await nursery.start(CuttableProxy(server.port or 0).run)
    first = await open_via(nursery, proxy.port)
    started = await first.execute(py(BIG_CODE), encoding=encoding, linger=30)
    sid = started["session_id"]
    collected: list[dict[str, Any]] = []
    assert await read_outputs(first, sid, until_bytes=5 * 1024 * 1024, collected=collected) is None
    await proxy.cut()
    await trio.sleep(0.3)  # the server notices; the child keeps running, detached
    second = await open_via(nursery, server.port or 0)
    last = collected[-1]["seq"]
    attached = await second.result("attach", {"session_id": sid, "since_seq": last})
    assert attached["session_id"] == sid and attached["next_seq"] > last
    completed = await read_outputs(second, sid, collected=collected)
    assert completed is not None and completed["status"] == "exited", completed
    assert [p["seq"] for p in collected] == list(range(len(collected)))
    data = b"".join(decode(p) for p in collected)
    if encoding == "base64":
        assert hashlib.sha256(data).digest() == hashlib.sha256(expected_big()).digest()
    else:  # utf-8 mode: invalid bytes become U+FFFD; compare with the same decoding
        assert data == expected_big().decode("utf-8", errors="replace").encode()


async def test_cut_mid_stream_then_attach_base64(server: Server, nursery: trio.Nursery) -> None:
    await cut_and_resume(server, nursery, "base64")


async def test_cut_mid_stream_then_attach_utf8(server: Server, nursery: trio.Nursery) -> None:
    await cut_and_resume(server, nursery, "utf-8")


async def test_cut_while_paused_then_attach(server: Server, nursery: trio.Nursery) -> None:
    proxy: CuttableProxy = await nursery.start(CuttableProxy(server.port or 0).run)
    first = await open_via(nursery, proxy.port)
    code = "import time\nfor i in range(40):\n    print(i, flush=True); time.sleep(0.02)"
    sid = (await first.execute(py(code), linger=30))["session_id"]
    collected: list[dict[str, Any]] = []
    await read_outputs(first, sid, until_bytes=6, collected=collected)
    assert (await first.result("control", {"session_id": sid, "type": "PAUSE"}))["status"] == "paused"
    await proxy.cut()
    await trio.sleep(0.3)
    second = await open_via(nursery, server.port or 0)
    attached = await second.result("attach", {"session_id": sid})
    assert attached["status"] == "paused"
    # Everything held comes again (since_seq omitted), then process.paused.
    replay: list[dict[str, Any]] = []
    while True:
        message = await second.receive()
        assert "method" in message, message
        if message["method"] == "process.paused":
            break
        replay.append(message["params"])
    assert [p["seq"] for p in replay] == list(range(attached["next_seq"]))
    assert (await second.result("control", {"session_id": sid, "type": "RESUME"}))["status"] == "running"
    completed = await read_outputs(second, sid, collected=replay)
    assert completed is not None and completed["exit_code"] == 0
    text = b"".join(decode(p) for p in replay).decode()
    assert text == "".join(f"{i}\n" for i in range(40))


async def test_detached_child_is_throttled_not_buffered(start_server: Any, nursery: trio.Nursery) -> None:
    server = await start_server(replay_bytes=1024 * 1024)
    first = await open_via(nursery, server.port)
    code = "import sys\nchunk = b'z' * 65536\nfor _ in range(3200):\n    sys.stdout.buffer.write(chunk)"
    sid = (await first.execute(py(code), encoding="base64", linger=30))["session_id"]
    await first.ws.aclose()
    watcher = await open_via(nursery, server.port)
    await trio.sleep(1.0)
    before = (await watcher.result("status", {"session_id": sid}))["stdout_bytes"]
    await trio.sleep(0.5)
    after = (await watcher.result("status", {"session_id": sid}))["stdout_bytes"]
    assert before == after, "the detached child kept being read"
    assert after < 8 * 1024 * 1024, f"{after} bytes read while nobody listened"
    attached = await watcher.result("attach", {"session_id": sid})
    assert attached["status"] == "running"
    collected: list[dict[str, Any]] = []
    completed = await read_outputs(watcher, sid, collected=collected)
    assert completed is not None and completed["stdout_bytes"] == 3200 * 65536
    assert sum(len(decode(p)) for p in collected) == 3200 * 65536
    assert [p["seq"] for p in collected] == list(range(len(collected)))


async def test_linger_expiry_cancels(server: Server, nursery: trio.Nursery) -> None:
    first = await open_via(nursery, server.port or 0)
    started = await first.execute(["sh", "-c", "sleep 100 & sleep 100"], linger=0.5)
    await first.ws.aclose()
    watcher = await open_via(nursery, server.port or 0)
    await trio.sleep(0.2)
    assert (await watcher.result("status", {"session_id": started["session_id"]}))["status"] == "running"
    with trio.fail_after(10):
        while (await watcher.result("status", {"session_id": started["session_id"]}))["status"] != "cancelled":
            await trio.sleep(0.1)
    assert not group_alive(started["pgid"])


async def test_no_linger_still_cancels_on_close(server: Server, nursery: trio.Nursery) -> None:
    first = await open_via(nursery, server.port or 0)
    started = await first.execute(["sleep", "100"])
    await first.ws.aclose()
    with trio.fail_after(10):
        while group_alive(started["pgid"]):
            await trio.sleep(0.05)


async def test_attach_errors(start_server: Any, nursery: trio.Nursery) -> None:
    server = await start_server(replay_bytes=64 * 1024)
    client = await open_via(nursery, server.port)
    assert (await client.error("attach", {"session_id": "nope"}))["code"] == -32002
    code = "import sys\nfor _ in range(64):\n    sys.stdout.buffer.write(b'q' * 65536); sys.stdout.flush()"
    started = await client.execute(py(code), encoding="base64", linger=30)
    sid = started["session_id"]
    await read_outputs(client, sid, collected=[])
    error = await client.error("attach", {"session_id": sid, "since_seq": 0})
    assert error["code"] == -32006 and error["data"]["first_seq"] > 1
    # "Everything still held" never fails, and the session did not move on the error.
    attached = await client.result("attach", {"session_id": sid, "since_seq": -1})
    assert attached["status"] == "exited"
    first_seq = error["data"]["first_seq"]
    replay: list[dict[str, Any]] = []
    completed = await read_outputs(client, sid, collected=replay)
    assert completed is not None and replay[0]["seq"] == first_seq
    assert [p["seq"] for p in replay] == list(range(first_seq, attached["next_seq"]))


async def test_replay_budget_counts_raw_output_bytes(start_server: Any, nursery: trio.Nursery) -> None:
    """PROTOCOL.md 8: CCX_REPLAY_BYTES of *raw* output stays replayable, also in base64 mode
    where each frame is 4/3 larger (regression: budgets counted encoded frames)."""
    budget = 256 * 1024
    server = await start_server(replay_bytes=budget)
    client = await open_via(nursery, server.port)
    code = "import sys\nfor _ in range(16):\n    sys.stdout.buffer.write(b'r' * 65536); sys.stdout.flush()"
    sid = (await client.execute(py(code), encoding="base64"))["session_id"]
    outputs: list[dict[str, Any]] = []
    assert await read_outputs(client, sid, collected=outputs) is not None
    sizes = [len(decode(p)) for p in outputs]
    # the longest tail of sent output whose raw bytes fit the budget must come back
    tail, kept = 0, 0
    while tail < len(sizes) and kept + sizes[-1 - tail] <= budget:
        kept += sizes[-1 - tail]
        tail += 1
    assert kept >= budget - 65536, sizes
    since_seq = outputs[-1 - tail]["seq"]
    other = await open_via(nursery, server.port)
    await other.result("attach", {"session_id": sid, "since_seq": since_seq})
    replay: list[dict[str, Any]] = []
    assert await read_outputs(other, sid, collected=replay) is not None
    assert [p["seq"] for p in replay] == [p["seq"] for p in outputs[-tail:]]
    assert b"".join(decode(p) for p in replay) == b"r" * kept


async def test_ended_sessions_replay_is_capped_server_wide(start_server: Any, nursery: trio.Nursery) -> None:
    """CCX_ENDED_REPLAY_BYTES: the newest ended sessions keep their sent output for replay,
    the oldest lose it first (-32006), and every one still gives its completion."""
    server = await start_server(replay_bytes=128 * 1024, ended_replay_bytes=200 * 1024)
    client = await open_via(nursery, server.port)
    size = 96 * 1024  # two chunks at least (64 KiB each at most), so seq 1 exists
    code = f"import sys; sys.stdout.buffer.write(b'z' * {size})"
    sids, firsts = [], {}
    for _ in range(4):  # 96 KiB each, 384 KiB in all: only the newest two fit
        sid = (await client.execute(py(code), encoding="base64"))["session_id"]
        outputs: list[dict[str, Any]] = []
        assert await read_outputs(client, sid, collected=outputs) is not None
        sids.append(sid)
        firsts[sid] = len(decode(outputs[0]))
    for sid, replayable in zip(sids, (False, False, True, True), strict=True):
        reply = await client.request("attach", {"session_id": sid, "since_seq": 0})
        if replayable:
            assert "result" in reply, reply
            replay: list[dict[str, Any]] = []
            assert await read_outputs(client, sid, collected=replay) is not None
            assert replay[0]["seq"] == 1
            assert b"".join(decode(p) for p in replay) == b"z" * (size - firsts[sid])
        else:
            assert reply["error"]["code"] == -32006, reply
            await client.result("attach", {"session_id": sid, "since_seq": -1})
            assert (await read_outputs(client, sid, collected=[]))["status"] == "exited"


async def test_two_clients_fight_over_a_session(server: Server, nursery: trio.Nursery) -> None:
    a = await open_via(nursery, server.port or 0)
    b = await open_via(nursery, server.port or 0)
    code = "import time\nfor i in range(30):\n    print(i, flush=True); time.sleep(0.03)"
    sid = (await a.execute(py(code)))["session_id"]
    await read_outputs(a, sid, until_bytes=2, collected=[])
    attached = await b.result("attach", {"session_id": sid, "since_seq": 0})
    assert attached["status"] == "running"
    detached = await a.notification("process.detached", sid)
    assert detached == {"session_id": sid}
    collected: list[dict[str, Any]] = []
    await read_outputs(b, sid, until_bytes=20, collected=collected)
    # b closing no longer matters to a, and a's closing would not cancel it either: a does
    # not own it. Take it back to a, then let it finish there.
    await a.result("attach", {"session_id": sid, "since_seq": collected[-1]["seq"]})
    assert (await b.notification("process.detached", sid)) == {"session_id": sid}
    completed = await read_outputs(a, sid, collected=collected)
    assert completed is not None and completed["exit_code"] == 0
    text = b"".join(decode(p) for p in collected).decode()
    assert text.endswith("".join(f"{i}\n" for i in range(25, 30)))


async def test_ended_while_detached_keeps_completion(start_server: Any, nursery: trio.Nursery) -> None:
    server = await start_server(retention=1.0)
    first = await open_via(nursery, server.port)
    sid = (await first.execute(["sh", "-c", "sleep 0.3; echo done"], linger=30))["session_id"]
    await first.ws.aclose()
    await trio.sleep(0.6)
    for _ in range(2):  # the completion comes again on every attach
        client = await open_via(nursery, server.port)
        assert (await client.result("attach", {"session_id": sid}))["status"] == "exited"
        collected: list[dict[str, Any]] = []
        completed = await read_outputs(client, sid, collected=collected)
        assert completed is not None and completed["exit_code"] == 0
        assert b"".join(decode(p) for p in collected) == b"done\n"
        await client.ws.aclose()
    await trio.sleep(1.2)
    client = await open_via(nursery, server.port)
    assert (await client.error("attach", {"session_id": sid}))["code"] == -32002
    assert (await client.error("status", {"session_id": sid}))["code"] == -32002


async def test_sessions_filter_by_tag(client: RawClient) -> None:
    a = await client.execute(["sleep", "5"], tag="alpha")
    await client.execute(["sleep", "5"], tag="beta")
    listed = (await client.result("sessions", {"tag": "alpha"}))["sessions"]
    assert [s["session_id"] for s in listed] == [a["session_id"]]
    assert listed[0]["tag"] == "alpha"
    assert len((await client.result("sessions"))["sessions"]) == 2
    for session in (await client.result("sessions"))["sessions"]:
        await client.result("control", {"session_id": session["session_id"], "type": "CANCEL"})


# ------------------------------------------------------------------ the client library reconnects


async def test_client_reconnects_and_resumes_without_gap(server: Server, nursery: trio.Nursery) -> None:
    """ccx.client re-dials after two cuts and `events()` goes on byte-exact, no duplicate."""
    from ccx.client import Completed, Output, connect

    proxy = await nursery.start(CuttableProxy(server.port).run)
    received = bytearray()
    seqs: list[int] = []
    cuts = 0
    async with connect(f"ws://127.0.0.1:{proxy.port}/ws") as client:
        session = await client.execute(py(BIG_CODE), encoding="base64", linger=30)
        async for event in session.events():
            if isinstance(event, Output):
                received += event.data
                seqs.append(event.seq)
                if cuts < 2 and len(received) > (cuts + 1) * 15 * 1024 * 1024:
                    cuts += 1
                    await proxy.cut()
            elif isinstance(event, Completed):
                assert (event.status, event.exit_code) == ("exited", 0)
        assert client.reconnects == 2
    assert seqs == list(range(len(seqs)))
    assert hashlib.sha256(received).digest() == hashlib.sha256(expected_big()).digest()


async def test_client_without_linger_gets_connection_lost(server: Server, nursery: trio.Nursery) -> None:
    from ccx.client import ConnectionLost, connect

    proxy = await nursery.start(CuttableProxy(server.port).run)
    async with connect(f"ws://127.0.0.1:{proxy.port}/ws") as client:
        session = await client.execute(py("import time; print('x', flush=True); time.sleep(60)"))
        await proxy.cut()
        with trio.fail_after(10):
            try:
                await session.wait()
            except ConnectionLost:
                pass
            else:
                raise AssertionError("a dropped connection without linger must be reported")
        assert client.reconnects == 0
    await wait_for(lambda: not group_alive(session.pgid))


async def test_client_sees_detached_when_another_client_attaches(server: Server) -> None:
    from ccx.client import Completed, Detached, Output, connect

    async with connect(server.url) as first, connect(server.url) as second:
        session = await first.execute(py("import sys, time\nprint('a', flush=True)\n"
                                         "sys.stdin.readline()\nprint('b')"),
                                      stdin=True, linger=30)
        events = session.events()
        seen = b""
        async for event in events:  # "a\n" may come as one chunk or two
            if isinstance(event, Output):
                seen += event.data
                if seen == b"a\n":
                    break
        taken = await second.attach(session.id)
        assert taken.linger == 30
        rest = [e async for e in events]
        assert [type(e) for e in rest] == [Detached], rest
        assert session.taken
        await taken.send("go\n")
        got = [e async for e in taken.events()]
        assert b"".join(e.data for e in got if isinstance(e, Output)) == b"a\nb\n"
        assert isinstance(got[-1], Completed) and got[-1].exit_code == 0


async def test_client_close_completes_the_handshake(server: Server) -> None:
    """Regression: closing the client waited CLOSE_TIMEOUT_S for a handshake it had cut."""
    from ccx.client import CLOSE_TIMEOUT_S, connect

    async with connect(server.url) as client:
        await client.ping()
        with trio.fail_after(CLOSE_TIMEOUT_S / 2):
            await client.aclose()
