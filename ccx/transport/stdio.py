"""MCP over stdio (`ccx mcp`): newline-delimited JSON-RPC on stdin/stdout, logs on stderr.

Inputs: `Settings`; file descriptors for input (stdin) and output (stdout).
Outputs: one `McpEndpoint` on the manager of a `ccx.node.Node` (the composition root `ccx
serve` uses too: subreaper, crash recovery), served until stdin reaches EOF (or
SIGTERM/SIGINT); then every session it started is cancelled, lingering ones too (nobody can
reconnect to this process), and the process returns once their groups are empty. A further
SIGTERM or SIGINT once that shutdown has begun SIGKILLs every group and ends the process
within 2 s (PROTOCOL.md 6), as `ccx serve` does. stdout
carries protocol messages only (one per line; JSON escapes newlines inside strings).
Blocking reads and writes run in worker threads, so the descriptors keep their blocking mode
(a parent sharing them is not surprised by O_NONBLOCK). Lines are handled in tasks (at most
`MAX_IN_FLIGHT`), and lines carrying `send_input` are charged to an `InputBudget`
(CCX_MAX_INPUT_BYTES): while the next one does not fit, stdin is not read (a pipe's wait),
but stdin and stdout are watched for a hang-up of the peer (its stdin EOF, its end of
stdout closed), which ends the server as EOF does.
Docs: https://modelcontextprotocol.io/specification/2025-11-25/basic/transports#stdio
      https://trio.readthedocs.io/en/stable/reference-core.html#trio.to_thread.run_sync
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
import trio

from ccx.config import Settings
from ccx.errors import InvalidRequest
from ccx.log import get_logger
from ccx.manager import SessionManager
from ccx.mcp import McpEndpoint
from ccx.node import Node
from ccx.owner import OwnerGone
from ccx.protocol import Frame, encode, error_response, parse_frame
from ccx.transport.input_budget import InputBudget, carries_input

log = get_logger("ccx.stdio")

READ_BYTES = 64 * 1024
MAX_IN_FLIGHT = 64  # requests handled at once; more waits to be read (back-pressure)
SHUTDOWN_MARGIN_S = 1.5  # beyond kill_grace: time to collect the completions


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class StdioPeer:
    """The writer side: one line per message, in hand-over order, never interleaved."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.closed = False
        self._lock = trio.StrictFIFOLock()

    async def send(self, message: dict[str, object] | list[dict[str, object]]) -> None:
        """Write one message line; raise `OwnerGone` once stdout is broken.

        **Cancellation**: a line is written whole or not at all (the write runs shielded in a
        thread; waiting for the lock is the only cancellable part).
        """
        if self.closed:
            raise OwnerGone("stdio")
        line = (encode(message) + "\n").encode("utf-8", "surrogatepass")
        async with self._lock:
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(_write_all, self.fd, line)
                except OSError:  # EPIPE: the client went away
                    self.closed = True
                    raise OwnerGone("stdio") from None


async def _read_lines(fd: int, out_fd: int, limit: int, nursery: trio.Nursery,
                      handle: Callable[[Frame | None, int], Awaitable[None]],
                      slots: trio.Semaphore, budget: InputBudget) -> None:
    """Split stdin into lines, parse each and hand it to *handle* in a task, until EOF. A line
    carrying input is charged to *budget* first: while it does not fit, stdin is not read,
    and a hang-up on *fd* or *out_fd* (the peer is gone) ends the reading as EOF does."""
    pending = bytearray()
    too_long = False
    while True:
        data = await trio.to_thread.run_sync(os.read, fd, READ_BYTES, abandon_on_cancel=True)
        if not data:
            return
        pending += data
        while (newline := pending.find(b"\n")) >= 0:
            line, pending = bytes(pending[:newline]), pending[newline + 1:]
            if too_long:  # the tail of a line we already refused
                too_long = False
                continue
            if line.strip():
                frame = parse_frame(line)
                charge = len(line) if carries_input(frame) else 0
                if charge and not await budget.acquire_unless_hung_up(charge, (fd, out_fd)):
                    log.info("peer_hung_up", waiting_for="input room")
                    return
                await slots.acquire()
                nursery.start_soon(handle, frame, charge)
        if len(pending) > limit:
            log.warning("line_too_long", limit=limit)
            pending.clear()
            too_long = True
            await handle(None, 0)  # answered as an over-long message


async def serve_stdio(settings: Settings, *, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
    """Serve MCP on the given descriptors until EOF on input or SIGTERM/SIGINT; a further
    signal during the shutdown SIGKILLs every group (`Node.kill`).

    **Cancellation**: cancelling it still cancels every session through its shielded kill
    path, so no process it started outlives it.
    """
    node = Node(settings)
    reading = trio.CancelScope()  # the first signal ends the reading, as EOF does
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_obey_signals, signals, reading, node)
            async with node.running() as manager:
                await _serve(manager, settings, reading, stdin_fd, stdout_fd)
            nursery.cancel_scope.cancel()
    log.info("stopped")


async def _serve(manager: SessionManager, settings: Settings, reading: trio.CancelScope,
                 stdin_fd: int, stdout_fd: int) -> None:
    peer = StdioPeer(stdout_fd)
    endpoint = McpEndpoint(manager, peer.send)
    slots = trio.Semaphore(MAX_IN_FLIGHT)
    budget = InputBudget(settings.max_input_bytes)

    async def handle(frame: Frame | None, charge: int) -> None:
        try:
            if frame is None:
                reply: object = error_response(None, InvalidRequest(
                    f"Invalid Request: message exceeds {settings.max_message_bytes} bytes"))
                await peer.send(reply)  # type: ignore[arg-type]
                return
            answer = await endpoint.handle_parsed(frame)
            if answer is not None:
                await peer.send(answer)
        except OwnerGone:
            pass
        finally:
            if frame is not None:
                slots.release()
            if charge:
                budget.release(charge)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(endpoint.run)
        with structlog.contextvars.bound_contextvars(connection_id="stdio"):
            log.info("mcp_stdio_ready", pid=os.getpid())
            async with trio.open_nursery() as requests:
                with reading:
                    await _read_lines(stdin_fd, stdout_fd, settings.max_message_bytes,
                                      requests, handle, slots, budget)
                    log.info("stdin_closed")
                reading.cancel()  # from here on a signal SIGKILLs (see `_obey_signals`)
                requests.cancel_scope.cancel()
            endpoint.close()  # cancels the sessions (PROTOCOL.md 5: they die with their peer)
            # ...and shutdown cancels the lingering ones it only detached.
            await manager.shutdown(timeout=settings.kill_grace + SHUTDOWN_MARGIN_S)
        nursery.cancel_scope.cancel()


async def _obey_signals(signals: AsyncIterator[int], reading: trio.CancelScope,
                        node: Node) -> None:
    """The first SIGTERM/SIGINT ends the reading (the shutdown follows); one that comes once
    the shutdown has begun (after EOF too) SIGKILLs every group and ends the node at once."""
    async for signum in signals:
        name = signal.Signals(signum).name
        if not reading.cancel_called:
            log.info("signal_received", signal=name)
            reading.cancel()
        else:
            log.warning("signal_received_again", signal=name, action="SIGKILL every group")
            node.kill()


async def _self_check() -> None:
    """initialize, then execute through the MCP tool, over two pipes; EOF ends the server."""
    import functools
    import json
    from typing import Any

    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    requests: list[dict[str, Any]] = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize",
         "params": {"protocolVersion": "2025-11-25", "capabilities": {}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
         "params": {"name": "execute", "arguments": {"command": ["echo", "hi"]}}},
    ]
    settings = Settings(state_dir="", kill_grace=1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(serve_stdio, settings, stdin_fd=in_read,
                                             stdout_fd=out_write))
        replies: dict[object, Any] = {}
        pending = b""
        for request in requests:
            _write_all(in_write, (json.dumps(request) + "\n").encode())
            if "id" not in request:
                continue
            while request["id"] not in replies:
                pending += await trio.to_thread.run_sync(os.read, out_read, READ_BYTES)
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    if "id" in message:
                        replies[message["id"]] = message
        os.close(in_write)  # EOF: the server stops
    result = replies[2]["result"]
    assert result["structuredContent"]["stdout"] == "hi\n", result
    for fd in (in_read, out_read, out_write):
        os.close(fd)
    print("ccx.transport.stdio: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
