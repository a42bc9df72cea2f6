"""The JSON-RPC codec as plain data in, data out (h11 style): no server, no sockets.

`ccx.protocol.parse_frame` never raises for bad input; `structure_params` turns params into
attrs classes or `InvalidParams` naming the field; `encode_utf8` is the wire form.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ccx.errors import InvalidParams, InvalidRequest, ParseError
from ccx.params import AttachParams, ControlParams, ExecuteParams, PtySize
from ccx.protocol import (
    Invalid,
    Request,
    encode,
    encode_utf8,
    notification,
    parse_frame,
    response,
    structure_params,
)


def only(text: str | bytes) -> Request | Invalid:
    frame = parse_frame(text)
    assert not frame.is_batch and len(frame.items) == 1, frame
    return frame.items[0]


def test_a_request_and_a_notification() -> None:
    request = only('{"jsonrpc":"2.0","id":7,"method":"ping","params":{}}')
    assert request == Request("ping", {}, 7, is_notification=False)
    note = only(b'{"jsonrpc":"2.0","method":"ping"}')
    assert isinstance(note, Request) and note.is_notification and note.params is None


@pytest.mark.parametrize(("text", "error", "request_id"), [
    ("{", ParseError, None),
    (b"\xff\xfe", ParseError, None),  # not UTF-8
    ("NaN", ParseError, None),  # Python's json would take it; JSON does not
    ("[" * 100_000, ParseError, None),  # nesting too deep: an error, not a crash
    ("[]", InvalidRequest, None),
    ("1", InvalidRequest, None),
    ('{"jsonrpc":"1.0","id":3,"method":"ping"}', InvalidRequest, 3),
    ('{"jsonrpc":"2.0","id":true,"method":"ping"}', InvalidRequest, None),
    ('{"jsonrpc":"2.0","id":4,"method":5}', InvalidRequest, 4),
    ('{"jsonrpc":"2.0","id":5,"method":"ping","params":"x"}', InvalidRequest, 5),
])
def test_bad_messages_become_invalid_items(text: str | bytes, error: type, request_id: Any) -> None:
    item = only(text)
    assert isinstance(item, Invalid) and type(item.error) is error and item.id == request_id


def test_a_batch_keeps_order_and_drops_client_responses() -> None:
    frame = parse_frame('[{"jsonrpc":"2.0","id":1,"method":"a"},{"jsonrpc":"2.0","id":9,'
                        '"result":1},2,{"jsonrpc":"2.0","id":3,"method":"b"}]')
    assert frame.is_batch
    assert [type(i).__name__ for i in frame.items] == ["Request", "Invalid", "Request"]
    assert [i.id for i in frame.items] == [1, None, 3]


def test_a_lone_response_is_not_answered() -> None:
    assert parse_frame('{"jsonrpc":"2.0","id":1,"result":null}').items == ()


def test_execute_params_defaults_and_extras_ignored() -> None:
    params = structure_params({"command": "echo hi", "unknown": [1]}, ExecuteParams)
    assert params.command == "echo hi" and params.encoding == "utf-8" and not params.stdin
    assert params.pty is None and params.linger == 0
    pty = structure_params({"command": ["sh"], "pty": {"cols": 80, "rows": 24}}, ExecuteParams)
    assert pty.pty == PtySize(80, 24)


@pytest.mark.parametrize(("params", "field"), [
    ({}, "command"),
    ({"command": 5}, "command"),
    ({"command": ["a", 1]}, "command"),
    ({"command": "x", "timeout": "5"}, "timeout"),
    ({"command": "x", "encoding": "latin-1"}, "encoding"),
    ({"command": "x", "stdin": "yes"}, "stdin"),
    ({"command": "x", "pty": {"cols": 0, "rows": 24}}, "pty"),
    ({"command": "x", "env": {"A": 1}}, "env"),
])
def test_bad_execute_params_name_the_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidParams) as caught:
        structure_params(params, ExecuteParams)
    assert field in caught.value.message, caught.value.message


def test_params_must_be_named() -> None:
    with pytest.raises(InvalidParams):
        structure_params(["echo"], ExecuteParams)
    with pytest.raises(InvalidParams) as caught:
        structure_params(None, AttachParams)  # no params: the required session_id is missing
    assert "session_id" in caught.value.message
    assert structure_params({"session_id": "s"}, AttachParams).since_seq == -1


def test_control_type_is_case_insensitive() -> None:
    assert structure_params({"session_id": "s", "type": "pause"}, ControlParams).type == "PAUSE"
    with pytest.raises(InvalidParams):
        structure_params({"session_id": "s", "type": "STOP"}, ControlParams)


def test_encoding_is_compact_utf8_and_agrees_with_text() -> None:
    message = notification("process.output", {"data": "é\u0001", "seq": 0})
    wire = encode_utf8(message)
    assert wire == encode(message).encode("utf-8")
    assert b" " not in wire and json.loads(wire) == message
    assert "é".encode() in wire  # UTF-8 as is, not escaped


def test_a_lone_surrogate_id_is_escaped_not_an_error() -> None:
    wire = encode_utf8(response("\ud800", 1))
    assert wire == b'{"jsonrpc":"2.0","id":"\\ud800","result":1}'
    batch = [notification("x", {"a": "é"}), response(1, None)]
    assert encode_utf8(batch) == encode(batch).encode()
