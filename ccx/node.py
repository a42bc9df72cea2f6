"""The composition root: the one place that turns `Settings` into a running `SessionManager`.

Inputs: `Settings`.
Outputs: `Node`, whose `running()` context makes this process the subreaper of what it
starts (`process.become_subreaper`), stops what a ccx that died without cleaning up left
running (`crash_record.recover`, the crash records), then hosts the `SessionManager` (its crash
record, its session tasks) for the body, which hands the manager to its transports.
`ccx serve` (`server.Server`) and `ccx mcp` (`transport.stdio`) both run inside one, so
transports never touch pids. `kill()` is the second signal of a shutdown (PROTOCOL.md 6):
SIGKILL every group and escapee, and end the whole node within `FORCED_EXIT_S`.
Docs: https://man7.org/linux/man-pages/man2/prctl.2.html (PR_SET_CHILD_SUBREAPER)
      https://trio.readthedocs.io/en/stable/reference-core.html#cancellation-and-timeouts
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from ccx.config import Settings
from ccx.crash_record import recover
from ccx.log import get_logger
from ccx.manager import SessionManager
from ccx.process import become_subreaper

log = get_logger("ccx.node")

# After a second signal (everything SIGKILLed), what is left of the shutdown gets this long:
# completions and closes go out if they can; PROTOCOL.md 6 wants an exit within 2 s.
FORCED_EXIT_S = 1.0


@attrs.define(eq=False)
class Node:
    """One ccx process's sessions: built from `Settings`, run with `running()`."""

    settings: Settings
    manager: SessionManager = attrs.field(init=False)
    _scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    def __attrs_post_init__(self) -> None:
        self.manager = SessionManager(self.settings)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SessionManager]:
        """Subreaper, crash recovery, then the manager running for the body; on exit the
        manager's nursery is cancelled (every session's shielded kill path runs) and its
        crash record removed.

        **Cancellation**: cancelling the body still empties every group; after `kill()` the
        whole context ends within `FORCED_EXIT_S` (the kill paths confirm SIGKILLed groups).
        """
        with self._scope:
            become_subreaper()
            # Before serving: what a `ccx serve` or `ccx mcp` that died without cleaning up
            # left running goes now (docs/reliability.md).
            await recover(self.settings.state_dir, grace=self.settings.kill_grace)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.manager.run)
                try:
                    yield self.manager
                finally:
                    nursery.cancel_scope.cancel()

    def kill(self) -> None:
        """End a shutdown now (a further SIGTERM or SIGINT, PROTOCOL.md 6): SIGKILL every
        group and escapee at once, then give what is left of `running()` `FORCED_EXIT_S`."""
        log.warning("forced_exit", sessions=len(self.manager.running()))
        self.manager.kill_all()
        self._scope.deadline = min(self._scope.deadline, trio.current_time() + FORCED_EXIT_S)


async def _self_check() -> None:
    """A session started in a node ends with it; `kill()` SIGKILLs a TERM-ignoring group and
    ends the node at once instead of after kill_grace."""
    import os

    from ccx.params import ExecuteParams

    trap = ["sh", "-c", "trap '' TERM; echo ready; sleep 60"]
    node = Node(Settings(state_dir="", kill_grace=30.0))
    started = trio.current_time()
    async with node.running() as manager:
        assert manager is node.manager
        session = await manager.execute(ExecuteParams(command=trap), None)
        pgid = session.group.pgid
        node.kill()
        await trio.sleep_forever()  # ended by kill()'s deadline
    assert trio.current_time() - started < 10, "kill() did not cut kill_grace short"
    assert not manager.running(), "a group outlived the node"
    try:
        os.killpg(pgid, 0)
        raise AssertionError("the group is still there")
    except ProcessLookupError:
        pass
    print("ccx.node: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
