"""Watching a session without owning it (PROTOCOL.md section 11): one cursor, one task.

Inputs: a `Session`, the watching connection (an `Owner`), and `since_seq` as for `attach`.
Outputs: the same notifications an attaching owner would get (held output with seq >
since_seq, `process.paused` if paused, `process.completed` if ended), then live
`process.output`, `process.paused/resumed` and `process.completed`, in the session's order;
or `process.lagged {"session_id", "first_seq"}` once the next output owed is no longer held.

How it never slows anyone: a watcher is a cursor (`next_seq`) into the output the session
holds anyway for its owner (`Outbox.output`: unsent output and recently sent output kept for
replay). It copies nothing and pins nothing: the session's budgets evict sent output
whatever watchers have read, and a watcher that finds its next output gone is lagged and
ends. Its own task sends one event at a time to its connection, waiting there as long as the
connection is slow; meanwhile the session goes on. It waits for `Session.news` when it has
caught up. Control notifications come from the session's control log, each placed before the
output seq that followed it, so a watcher sees them where the owner did.
Docs: ../shared/PROTOCOL.md section 11 ("Watching without owning"), DESIGN.md "Watching"
      https://trio.readthedocs.io/en/stable/reference-core.html#trio.Event
"""

from __future__ import annotations

import attrs
import trio

from ccx.events import Event, Lagged, Paused
from ccx.log import get_logger
from ccx.owner import Owner, OwnerGone
from ccx.session import Session, State

log = get_logger("ccx.watch")


@attrs.define(eq=False)
class Watcher:
    """One connection watching one session: a cursor and the task that moves it."""

    session: Session
    owner: Owner
    next_seq: int  # the next output to send
    next_control: int  # index of the next paused/resumed in the session's control log
    replay_end: int  # the session's next_seq when the watch began
    preface: list[Event]  # process.paused at watch time: sent once the replay is out
    gate: trio.Event = attrs.field(factory=trio.Event)  # set once the watch result is sent
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    ended: bool = False

    @classmethod
    def open(cls, session: Session, owner: Owner, since_seq: int) -> Watcher:
        """A watcher whose replay starts after *since_seq* (-1: all that is held). The
        caller checked `session.check_replay(since_seq)`."""
        # A since_seq beyond what exists yet skips nothing to come (as `attach`).
        output = session.output
        start = output.first_seq if since_seq < 0 else min(since_seq + 1, output.next_seq)
        paused = session.state is State.PAUSED and output.completion is None
        return cls(session, owner, next_seq=start, next_control=output.controls_total,
                   replay_end=output.next_seq,
                   preface=[Paused(session.id)] if paused else [])

    @property
    def lagged(self) -> bool:
        """The next output it owes is no longer held: all it can still send is
        process.lagged (once its connection takes it)."""
        return self.next_seq < self.session.output.first_seq

    def stop(self) -> None:
        """End the watch now (unwatch, replaced, connection closed, session forgotten)."""
        self.ended = True
        self.scope.cancel()

    async def run(self) -> None:
        """Send what is owed until completion, lag, `stop()` or the connection's end; then
        free the watcher's place.

        **Cancellation**: `stop()` cancels it; a hand-over to the connection is cancel-safe
        (the writer takes whole frames), so nothing half-sent is left behind.
        """
        with self.scope:
            try:
                await self.gate.wait()
                await self._send_all()
            except OwnerGone:
                pass
        self.ended = True
        output = self.session.output
        for registry in (output.watchers, output.lagging):
            if registry.get(self.owner) is self:
                del registry[self.owner]

    async def _send_all(self) -> None:
        output = self.session.output
        while True:
            news = output.news  # taken before looking: nothing queued after it is missed
            event, last = self._next()
            if event is None:
                await news.wait()
                continue
            await self.owner.send_event(event)
            if last:
                return

    def _next(self) -> tuple[Event | None, bool]:
        """The next event owed and whether it is the last; advances the cursor."""
        session = self.session.output
        if self.preface and self.next_seq >= self.replay_end:
            return self.preface.pop(0), False
        control = session.control_at(self.next_control)
        if control is not None and control[0] <= self.next_seq:
            self.next_control = control[1] + 1
            return control[2], False
        if self.next_seq < session.next_seq:
            output = session.held_output(self.next_seq)
            if output is None:
                first = session.first_seq
                log.info("watcher_lagged", session_id=session.session_id,
                         next_seq=self.next_seq, first_seq=first)
                return Lagged(session.session_id, first), True
            self.next_seq += 1
            return output, False
        completion = session.completion
        if completion is not None and control is None:
            return completion, True
        return None, False


async def _self_check() -> None:
    """A real child, an owner and a watcher that joins late: the same frames reach both."""
    import os
    import sys

    from ccx.output import EventLog
    from ccx.process import spawn
    from ccx.session import SessionOptions

    code = "import sys\nfor i in range(3): print(i, flush=True); sys.stdin.readline()\n"
    group = await spawn([sys.executable, "-c", code], executable=sys.executable, cwd=None,
                        env=dict(os.environ), stdin=True)
    owner, viewer = EventLog(), EventLog()
    options = SessionOptions(kill_grace=1.0, replay_bytes=1 << 20, stdin=True)
    session = Session.create("self-check", group, options, owner)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        session.announce()
        await session.write_input(b"\n", eof=False)  # it runs on; what came is replayed
        watcher = Watcher.open(session, viewer, -1)
        session.output.watchers[viewer] = watcher
        watcher.gate.set()
        async with trio.open_nursery() as watching:
            watching.start_soon(watcher.run)  # ends after the completion
            await session.write_input(b"\n\n", eof=True)
        await session.wait_done()
        session.forget()
    assert owner.events[1:] == viewer.events, (owner.events, viewer.events)  # no "started"
    assert viewer.events[-1].method == "process.completed" and not session.output.watchers
    print("ccx.watch: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
