"""The outbox (unsent frames + recently sent output for replay) as plain data: budgets in
raw output bytes, eviction oldest first, -32006 beyond what is held, rewind for a new owner
(PROTOCOL.md section 8)."""

from __future__ import annotations

import pytest

from ccx.errors import ReplayUnavailable
from ccx.outbox import Held, Outbox


def output(box: Outbox, raw: int = 4, frame: bytes = b"f") -> Held:
    held = Held("process.output", frame, box.take_seq(), raw_bytes=raw)
    box.push(held)
    return held


def test_budget_counts_raw_bytes_not_frames() -> None:
    box = Outbox(budget_bytes=10)
    output(box, raw=4, frame=b"x" * 1000)  # a frame far larger than its raw bytes
    output(box, raw=4, frame=b"x" * 1000)
    assert box.pending_bytes == 8 and box.has_room
    output(box, raw=4)
    assert not box.has_room  # 12 >= 10: stop reading the child


def test_control_notifications_cost_nothing_and_are_not_replayed() -> None:
    box = Outbox(budget_bytes=10)
    box.push(Held("process.paused", b"{}"))
    assert box.pending_bytes == 0
    box.delivered()
    assert not box.sent and box.first_seq == 0


def test_sent_output_is_evicted_oldest_first() -> None:
    box = Outbox(budget_bytes=10)
    for _ in range(4):
        output(box)
    for _ in range(4):
        box.delivered()
    assert [h.seq for h in box.sent] == [2, 3] and box.sent_bytes == 8
    assert box.first_seq == 2


def test_the_newest_sent_frame_stays_even_over_budget() -> None:
    box = Outbox(budget_bytes=10)
    output(box, raw=64)
    box.delivered()
    assert [h.seq for h in box.sent] == [0]


@pytest.mark.parametrize("since", [-1, 1, 3, 5])
def test_replay_from_what_is_held(since: int) -> None:
    box = Outbox(budget_bytes=10)
    for _ in range(4):
        output(box)
    for _ in range(4):
        box.delivered()
    box.check_replay(since)  # first_seq is 2: after 1 is the oldest that is still whole


def test_replay_of_forgotten_output_is_refused_with_first_seq() -> None:
    box = Outbox(budget_bytes=10)
    for _ in range(4):
        output(box)
    for _ in range(4):
        box.delivered()
    with pytest.raises(ReplayUnavailable) as caught:
        box.check_replay(0)
    assert caught.value.data == {"first_seq": 2}


def test_rewind_requeues_after_since_and_appends_the_tail() -> None:
    box = Outbox(budget_bytes=100)
    for _ in range(5):
        output(box)
    box.push(Held("process.paused", b"p"))
    box.delivered()
    box.delivered()  # seq 0 and 1 went out; 2, 3, 4 and a paused notice are pending
    completed = Held("process.completed", b"c")
    box.rewind(0, [completed])
    assert [h.seq for h in box.sent] == [0]
    assert [h.seq for h in box.pending] == [1, 2, 3, 4, None]
    assert box.pending[-1] is completed  # the queued "paused" was replaced by the tail
    assert box.pending_bytes == 16


def test_forget_sent_keeps_unsent() -> None:
    box = Outbox(budget_bytes=100)
    for _ in range(3):
        output(box)
    box.delivered()
    assert box.forget_sent() == 4
    assert box.sent_bytes == 0 and [h.seq for h in box.pending] == [1, 2]
    box.check_replay(0)  # the client has seq 0; 1 and 2 are still held
    box.check_replay(-1)
    assert box.first_seq == 1
