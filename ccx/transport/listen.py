"""Accept TCP connections within limits, so one client cannot take the server down.

Inputs: listening sockets, a handler, the limits (`CCX_MAX_CONNECTIONS`,
`CCX_MAX_PENDING_HEADS`) and the process's file descriptor limit.
Outputs: `serve_limited`, an accept loop that hands each admitted connection to the handler;
`Gate`, the counts it keeps (open connections, connections still sending their head), which
the handler uses to mark the head phase (`Gate.reading_head`); `raise_fd_limit`.
Rules, checked when a connection is accepted, before a byte of it is read:
- beyond the connection cap, a new connection evicts the oldest one still sending its head,
  or, when there is none, is answered 503 and closed;
- beyond the head cap, the oldest connection still sending its head is closed (a slowloris
  client then only ever holds the newest few; a complete request is read at once);
- accept failing for lack of descriptors (EMFILE, ...) closes the oldest unread head and
  retries after `ACCEPT_RETRY_S`, logging at most once per `ACCEPT_LOG_INTERVAL_S` (trio's
  `serve_listeners` logs a traceback every 0.1 s: that loop is what this replaces).
Docs: https://trio.readthedocs.io/en/stable/reference-io.html#trio.serve_listeners
      (source: trio/_highlevel_serve_listeners.py)
      https://man7.org/linux/man-pages/man2/accept.2.html (ERRORS)
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import attrs
import trio

from ccx.log import get_logger
from ccx.transport.http import send_plain

log = get_logger("ccx.listen")

# accept(2) errors that mean "the system is out of something", not "this listener is broken"
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_S = 0.1  # wait before accepting again after such an error
ACCEPT_LOG_INTERVAL_S = 10.0  # at most one log line per interval for accept errors / refusals
REJECT_TIMEOUT_S = 1.0  # writing the 503 to a refused connection; then it is closed anyway

Handler = Callable[[trio.SocketStream], Awaitable[object]]


class RateLimitedLog:
    """Log an event at most once per `ACCEPT_LOG_INTERVAL_S`, with how many were skipped."""

    def __init__(self, event: str) -> None:
        self.event = event
        self._last = -ACCEPT_LOG_INTERVAL_S
        self._skipped = 0

    def warning(self, **fields: object) -> None:
        now = trio.current_time()
        if now - self._last < ACCEPT_LOG_INTERVAL_S:
            self._skipped += 1
            return
        log.warning(self.event, skipped=self._skipped, **fields)
        self._last, self._skipped = now, 0


@attrs.define(eq=False)
class Gate:
    """Counts of open connections and of those still sending their request head."""

    max_connections: int
    max_pending_heads: int
    open: int = 0
    refused_total: int = 0  # answered 503: beyond the connection cap
    evicted_total: int = 0  # closed while sending their head: beyond a cap, or out of fds
    _pending: dict[object, trio.CancelScope] = attrs.field(factory=dict)  # oldest first

    def admit(self) -> bool:
        """Count a new connection in; False (not counted) when it must be refused."""
        if self.open >= self.max_connections and not self.evict_oldest_head():
            self.refused_total += 1
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1

    def evict_oldest_head(self) -> bool:
        """Close the connection that has been sending its head longest; False if none."""
        for key, scope in self._pending.items():
            del self._pending[key]
            scope.cancel()
            self.evicted_total += 1
            return True
        return False

    @contextmanager
    def reading_head(self) -> Iterator[trio.CancelScope]:
        """Mark the head phase of one connection; its scope is cancelled on eviction (check
        `cancelled_caught` after the block)."""
        while len(self._pending) >= self.max_pending_heads and self.evict_oldest_head():
            pass
        key = object()
        with trio.CancelScope() as scope:
            self._pending[key] = scope
            try:
                yield scope
            finally:
                self._pending.pop(key, None)


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; return (soft, hard) as they are now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return soft, hard


def connection_cap(wanted: int) -> int:
    """*wanted*, or half the descriptors this process may open if that is fewer: the other
    half stays for session pipes, the listener, logs and the crash record."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft // 2))


async def serve_limited(handler: Handler, listeners: list[trio.SocketListener], gate: Gate,
                        handler_nursery: trio.Nursery) -> None:
    """Accept on every listener until cancelled; run *handler* for each admitted connection
    in *handler_nursery* (the stream is closed after it).

    **Cancellation**: stops accepting and closes the listeners; handlers keep running in
    their own nursery.
    """
    accept_failed = RateLimitedLog("accept_failed")
    refused = RateLimitedLog("connection_refused")

    async def run(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        finally:
            gate.release()
            await trio.aclose_forcefully(stream)

    async def reject(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(REJECT_TIMEOUT_S):
                await send_plain(stream, 503, "too many connections\n",
                                 headers=[("Retry-After", "1")])
        finally:
            await trio.aclose_forcefully(stream)

    async def accept_loop(listener: trio.SocketListener) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    gate.evict_oldest_head()  # frees a descriptor for a complete request
                    accept_failed.warning(error=errno.errorcode.get(exc.errno or 0, "?"),
                                          detail=os.strerror(exc.errno or 0),
                                          open_connections=gate.open)
                    await trio.sleep(ACCEPT_RETRY_S)
                    continue
                if gate.admit():
                    handler_nursery.start_soon(run, stream)
                else:
                    refused.warning(reason="CCX_MAX_CONNECTIONS", limit=gate.max_connections)
                    handler_nursery.start_soon(reject, stream)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, listener)


async def _self_check() -> None:
    """Cap 1: a connection sending its head is evicted by the next one; a connection past its
    head holds the cap, so the one after it gets 503."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    gate = Gate(max_connections=1, max_pending_heads=1)

    admitted, past_head = trio.Event(), trio.Event()  # a handler runs; one read its head

    async def handler(stream: trio.SocketStream) -> None:
        admitted.set()
        with gate.reading_head() as scope:
            await stream.receive_some(1)  # "the head": one byte
        if not scope.cancelled_caught:
            past_head.set()
            await trio.sleep_forever()

    async def answer(stream: trio.SocketStream) -> bytes:
        data = b""
        while chunk := await stream.receive_some(4096):
            data += chunk
        return data

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_limited, handler, listeners, gate, nursery)
            first = await trio.open_tcp_stream("127.0.0.1", port)
            await admitted.wait()  # the first one holds the cap, reading its head
            second = await trio.open_tcp_stream("127.0.0.1", port)
            assert await answer(first) == b"", "the unread head was not evicted"
            await second.send_all(b"x")  # past its head: it keeps its place
            await past_head.wait()
            assert gate.open == 1 and gate.evicted_total == 1, (gate.open, gate.evicted_total)
            third = await trio.open_tcp_stream("127.0.0.1", port)
            assert (await answer(third)).startswith(b"HTTP/1.1 503 Service Unavailable")
            assert gate.refused_total == 1
            for stream in (first, second, third):
                await stream.aclose()
            nursery.cancel_scope.cancel()
    print("ccx.transport.listen: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
