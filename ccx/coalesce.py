"""One call shared by every task that asks for it at the same time (a /proc scan, mostly).

Inputs: an async function taking the number of tasks that will share its result
(`Coalesced(fn)`; a scan may choose to run on the event loop when many wait for it).
Outputs: `await coalesced()`, the result of a call of *fn* that began after this await did,
shared with every other task that awaited meanwhile: while one call runs, the tasks that
arrive wait for it to end and then share the next one. So a result is never older than the
request, and N concurrent requests cost two calls, not N (shutdown of 1,000 sessions scans
/proc a handful of times instead of thousands: PROTOCOL.md 10, section 5's bound at any size).
The result is shared: callers must not change it.
Docs: https://trio.readthedocs.io/en/stable/reference-core.html#trio.Event
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import attrs
import outcome
import trio

T = TypeVar("T")


@attrs.define(eq=False)
class _Round(Generic[T]):
    done: trio.Event = attrs.field(factory=trio.Event)
    result: outcome.Outcome[T] | None = None
    waiters: int = 0


@attrs.define(eq=False)
class Coalesced(Generic[T]):
    fn: Callable[[int], Awaitable[T]]
    _running: _Round[T] | None = None
    _next: _Round[T] | None = None

    async def __call__(self) -> T:
        """The result of a call that began after this one was made.

        **Cancellation**: the task that runs the call for everyone runs it shielded (the
        others depend on it); a waiting task can be cancelled at any time.
        """
        if self._next is None:
            self._next = _Round()
        mine = self._next
        mine.waiters += 1
        while not mine.done.is_set():
            running = self._running
            if running is None:  # nobody runs a call: this task runs `mine` for everyone
                self._running, self._next = mine, None
                try:
                    with trio.CancelScope(shield=True):
                        mine.result = await outcome.acapture(self.fn, mine.waiters)
                finally:
                    self._running = None
                    mine.done.set()
            else:
                await running.done.wait()
        result = mine.result
        if isinstance(result, outcome.Value):
            return result.value  # type: ignore[no-any-return]
        assert isinstance(result, outcome.Error)
        raise RuntimeError("the shared call failed") from result.error


async def _self_check() -> None:
    """Ten tasks asking during one call share the next call; a later ask gets a new one."""
    calls: list[int] = []
    started = trio.Event()

    async def count(shared_by: int) -> int:
        calls.append(shared_by)
        started.set()
        await trio.sleep(0.05)
        return len(calls)

    shared = Coalesced(count)
    results: list[int] = []

    async def ask() -> None:
        results.append(await shared())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)  # runs call 1 alone
        await started.wait()
        for _ in range(10):  # arrive while call 1 runs: they share call 2
            nursery.start_soon(ask)
    assert calls == [1, 10] and sorted(results) == [1] + [2] * 10, (calls, results)
    assert await shared() == 3
    print("ccx.coalesce: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
