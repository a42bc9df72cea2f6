"""The session state table (`ccx.session.TRANSITIONS`) as data: which control request is
allowed in which state, and where it leads (PROTOCOL.md section 2)."""

from __future__ import annotations

import pytest

from ccx.session import ENDED, TRANSITIONS, State

LIVE = [State.RUNNING, State.PAUSED, State.CANCELLING]


@pytest.mark.parametrize(("state", "request_", "target"), [
    (State.RUNNING, "PAUSE", State.PAUSED),
    (State.RUNNING, "RESUME", State.RUNNING),  # idempotent
    (State.RUNNING, "CANCEL", State.CANCELLING),
    (State.PAUSED, "PAUSE", State.PAUSED),  # a no-op with the same result
    (State.PAUSED, "RESUME", State.RUNNING),
    (State.PAUSED, "CANCEL", State.CANCELLING),
    (State.CANCELLING, "CANCEL", State.CANCELLING),
])
def test_allowed_transitions(state: State, request_: str, target: State) -> None:
    assert TRANSITIONS[state][request_] is target


@pytest.mark.parametrize("request_", ["PAUSE", "RESUME"])
def test_no_pause_or_resume_while_cancelling(request_: str) -> None:
    assert request_ not in TRANSITIONS[State.CANCELLING]


def test_ended_states_take_no_request() -> None:
    assert {State.EXITED, State.KILLED, State.CANCELLED, State.TIMEOUT} == ENDED
    assert all(s.ended for s in ENDED) and not any(s.ended for s in LIVE)
    assert not set(TRANSITIONS) & ENDED  # answered before the table: CANCEL gives the status


def test_every_state_is_on_the_wire_as_protocol_names_it() -> None:
    assert {s.value for s in State} == {"running", "paused", "cancelling", "exited", "killed",
                                        "cancelled", "timeout"}
