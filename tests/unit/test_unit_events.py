"""Typed session events (`ccx.events`) and their two encodings, as plain synchronous tests:
the compact record an outbox holds (and spools) and the JSON-RPC notification a WebSocket
sink sends (`ccx.protocol.encode_event`, PROTOCOL.md sections 3, 8, 11)."""

from __future__ import annotations

import json

import pytest

from ccx.events import (
    Completed,
    Detached,
    Event,
    Lagged,
    Output,
    Paused,
    Resumed,
    Started,
    pack,
    unpack,
)
from ccx.protocol import encode_event

SID = "node-a.k1x2y3abcdef.0123456789abcdef"
RECORDED: list[Event] = [
    Started(SID, 10, 10, ["claude", "-p", "é"]),
    Output(SID, "stdout", 0, "héllo\n".encode(), True),
    Output(SID, "stderr", 1, b"\x00\xff\x01", False),
    Output(SID, "pty", 2, b"", True),
    Paused(SID),
    Resumed(SID),
    Completed(SID, "exited", 0, None, 1.5, 6, 3),
    Completed(SID, "cancelled", None, "SIGTERM", 2.0, 0, 0, "drain"),
]


@pytest.mark.parametrize("event", RECORDED, ids=lambda e: type(e).__name__)
def test_a_record_gives_the_same_event_back(event: Event) -> None:
    seq = event.seq if isinstance(event, Output) else None
    assert unpack(SID, event.method, pack(event), seq) == event


def test_an_output_record_is_its_raw_bytes_and_one_header_byte() -> None:
    data = b"\x01" * 1000  # 6000 bytes once escaped as JSON
    assert len(pack(Output(SID, "stdout", 5, data, False))) == 1001


@pytest.mark.parametrize(("event", "params"), [
    (Started(SID, 10, 11, ["a"]), {"session_id": SID, "pid": 10, "pgid": 11, "command": ["a"]}),
    (Output(SID, "stdout", 3, "é\u0001".encode(), True),
     {"session_id": SID, "stream": "stdout", "data": "é\u0001", "seq": 3}),
    (Output(SID, "stderr", 4, b"\xff\xfe", False),
     {"session_id": SID, "stream": "stderr", "data": "//4=", "encoding": "base64", "seq": 4}),
    (Paused(SID), {"session_id": SID}),
    (Resumed(SID), {"session_id": SID}),
    (Completed(SID, "killed", None, "SIGKILL", 0.25, 1, 2),
     {"session_id": SID, "status": "killed", "exit_code": None, "signal": "SIGKILL",
      "duration_s": 0.25, "stdout_bytes": 1, "stderr_bytes": 2}),
    (Completed(SID, "cancelled", None, "SIGTERM", 1.0, 0, 0, "shutdown"),
     {"session_id": SID, "status": "cancelled", "exit_code": None, "signal": "SIGTERM",
      "duration_s": 1.0, "stdout_bytes": 0, "stderr_bytes": 0, "reason": "shutdown"}),
    (Lagged(SID, 7), {"session_id": SID, "first_seq": 7}),
    (Detached(SID), {"session_id": SID}),
    (Detached(SID, "node-b", "unreachable"),
     {"session_id": SID, "node": "node-b", "reason": "unreachable"}),
], ids=lambda value: type(value).__name__ if not isinstance(value, dict) else "")
def test_each_event_is_the_notification_the_contract_names(event: Event,
                                                           params: dict[str, object]) -> None:
    frame = encode_event(event)
    assert json.loads(frame) == {"jsonrpc": "2.0", "method": event.method, "params": params}
    assert b" " not in frame.replace(b'" "', b"")  # compact JSON, UTF-8 as is
