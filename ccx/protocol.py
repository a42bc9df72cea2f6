"""JSON-RPC 2.0 for ccx, sans-IO: frame text in, typed requests (or ready errors) out, JSON back.

Inputs: the text of one WebSocket frame; result/error/notification values to encode.
Outputs: `Frame` (requests in order, errors for the invalid ones, batch flag; the `RpcError`
family lives in `ccx.errors`), typed params (attrs) structured and validated by one cattrs
converter, and compact JSON encoders.
Docs: https://www.jsonrpc.org/specification
      https://catt.rs/en/stable/validation.html
      https://www.attrs.org/en/stable/
      https://jcristharif.com/msgspec/api.html#msgspec.json.Encoder
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs
import cattrs
import msgspec
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError
from cattrs.v import format_exception

from ccx.errors import InvalidParams, InvalidRequest, ParseError, RpcError
from ccx.events import Event, Output
from ccx.params import ControlParams, ControlType, Encoding, ExecuteParams, PtySize

JSONRPC_VERSION = "2.0"
RequestId = str | int | float | None


# ---------------------------------------------------------------------------------------------
# Parsing frames.


@attrs.frozen
class Request:
    """One valid request or notification (`is_notification` when it had no `id`)."""

    method: str
    params: Mapping[str, Any] | list[Any] | None
    id: RequestId = None
    is_notification: bool = False


@attrs.frozen
class Invalid:
    """A message that could not become a `Request`; answered with `error` under `id`."""

    error: RpcError
    id: RequestId = None


@attrs.frozen
class Frame:
    """What one frame held: its messages in order, and whether it was a batch."""

    items: tuple[Request | Invalid, ...]
    is_batch: bool


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_frame(text: str | bytes) -> Frame:
    """Parse one frame into requests; never raises for bad input, it returns `Invalid` items.

    Responses sent by the client (objects with `result` or `error` and no `method`) are
    dropped: answering them could loop between two JSON-RPC peers.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, too deep
        reason = "nesting too deep" if isinstance(exc, RecursionError) else str(exc)
        return Frame((Invalid(ParseError(f"Parse error: {reason}")),), is_batch=False)
    if isinstance(value, list):
        if not value:
            return Frame((Invalid(InvalidRequest("Invalid Request: empty batch")),), False)
        items = tuple(item for item in map(_parse_message, value) if item is not None)
        return Frame(items, is_batch=True)
    item = _parse_message(value)
    return Frame(() if item is None else (item,), is_batch=False)


def _valid_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str | int)


def _parse_message(value: object) -> Request | Invalid | None:
    if not isinstance(value, dict):
        return Invalid(InvalidRequest("Invalid Request: expected a JSON object"))
    raw_id = value.get("id")
    request_id = raw_id if _valid_id(raw_id) else None
    if "method" not in value and ("result" in value or "error" in value):
        return None  # a response from the client; nothing to answer
    if value.get("jsonrpc") != JSONRPC_VERSION:
        return Invalid(InvalidRequest('Invalid Request: "jsonrpc" must be "2.0"'), request_id)
    if not _valid_id(raw_id):
        return Invalid(InvalidRequest('Invalid Request: "id" must be a string, number or null'))
    method = value.get("method")
    if not isinstance(method, str):
        return Invalid(InvalidRequest('Invalid Request: "method" must be a string'), request_id)
    params = value.get("params")
    if "params" in value and not isinstance(params, dict | list):
        return Invalid(InvalidRequest('Invalid Request: "params" must be an object or array'),
                       request_id)
    return Request(method, params, request_id, is_notification="id" not in value)


# ---------------------------------------------------------------------------------------------
# Encoding.


_msgspec_encode = msgspec.json.Encoder().encode


def _dumps(message: Mapping[str, object]) -> str:
    """Compact JSON. msgspec writes UTF-8 about 8x faster than `json` for a 64 KiB output
    chunk (it was half the server's CPU in `bench/`); `json` takes what msgspec refuses
    (lone surrogates, unknown types) and raises as before."""
    try:
        return _msgspec_encode(message).decode("utf-8")
    except (TypeError, UnicodeError, msgspec.EncodeError):
        return json.dumps(message, ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False)


def response(request_id: RequestId, result: object) -> dict[str, object]:
    return {"jsonrpc": JSONRPC_VERSION, "id": request_id, "result": result}


def error_response(request_id: RequestId, error: RpcError) -> dict[str, object]:
    return {"jsonrpc": JSONRPC_VERSION, "id": request_id, "error": error.to_json()}


def notification(method: str, params: Mapping[str, object]) -> dict[str, object]:
    return {"jsonrpc": JSONRPC_VERSION, "method": method, "params": params}


def encode(message: Mapping[str, object] | list[dict[str, object]]) -> str:
    """Compact JSON text for one frame (an object, or a list for a batch)."""
    if isinstance(message, list):
        return "[" + ",".join(map(_dumps, message)) + "]"
    return _dumps(message)


def _dumps_utf8(message: Mapping[str, object]) -> bytes:
    try:
        return _msgspec_encode(message)
    except (TypeError, UnicodeError, msgspec.EncodeError):
        # ASCII escapes: a lone surrogate (which UTF-8 cannot carry) becomes a valid \udXXX.
        return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("ascii")


def encode_utf8(message: Mapping[str, object] | list[dict[str, object]]) -> bytes:
    """The same compact JSON as `encode`, as the UTF-8 bytes that go on the wire. This is what
    sessions hold and connections send: no `str` copy (1, 2 or 4 bytes per character, plus the
    UTF-8 cache msgspec leaves on it) is kept, and nothing is encoded twice."""
    if isinstance(message, list):
        return b"[" + b",".join(map(_dumps_utf8, message)) + b"]"
    return _dumps_utf8(message)


OMITTED_WHEN_NONE = ("node", "reason")  # of `Completed` and `Detached`; other nulls are sent


def event_params(event: Event) -> dict[str, object]:
    """The `params` of *event*'s notification (PROTOCOL.md sections 3, 8, 11)."""
    if isinstance(event, Output):
        params: dict[str, object] = {"session_id": event.session_id, "stream": event.stream}
        if event.text:
            params["data"] = event.data.decode("utf-8")
        else:
            params["data"] = base64.b64encode(event.data).decode("ascii")
            params["encoding"] = "base64"
        params["seq"] = event.seq
        return params
    params = msgspec.structs.asdict(event)
    for key in OMITTED_WHEN_NONE:  # only a session the node ended (or lost) says why
        if key in params and params[key] is None:
            del params[key]
    return params


def encode_event(event: Event) -> bytes:
    """*event* as the UTF-8 JSON notification a WebSocket sink sends: encoded once, when
    it goes to that sink (`ccx.events`: sessions hold compact records, not JSON)."""
    return _dumps_utf8(notification(event.method, event_params(event)))


def _strict(kind: type) -> Any:
    def structure(value: object, _: type) -> object:
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"expected a number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError("expected a finite number")
            return float(value)
        if isinstance(value, bool) and kind is int:
            raise TypeError("expected an integer, got bool")
        if not isinstance(value, kind):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return structure


def _command(value: object, _: type) -> str | list[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(part, str) for part in value):
        return list(value)
    raise TypeError("expected a string or an array of strings")


def _control_type(value: object, _: type) -> str:
    if not isinstance(value, str) or value.upper() not in ("PAUSE", "RESUME", "CANCEL"):
        raise ValueError("expected PAUSE, RESUME or CANCEL")
    return value.upper()


def _encoding(value: object, _: type) -> str:
    if value not in ("utf-8", "base64"):
        raise ValueError('expected "utf-8" or "base64"')
    return str(value)


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=False, detailed_validation=True)
    for kind in (str, int, float, bool):
        converter.register_structure_hook(kind, _strict(kind))
    converter.register_structure_hook(str | list[str], _command)
    converter.register_structure_hook_func(lambda t: t == ControlType, _control_type)
    converter.register_structure_hook_func(lambda t: t == Encoding, _encoding)
    return converter


def _describe(exc: BaseException, kind: type | None) -> str:
    """cattrs' message for one field, keeping what our own validators say about a value."""
    if type(exc) is ValueError and str(exc):
        return f"invalid value ({exc})"
    return format_exception(exc, kind)


converter = _make_converter()
P = TypeVar("P")


def structure_params(params: object, kind: type[P]) -> P:
    """Validate *params* into *kind*; raise `InvalidParams` with cattrs' per-field messages."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidParams("Invalid params: expected an object (named params)")
    try:
        return converter.structure(params, kind)
    except (ClassValidationError, ForbiddenExtraKeysError) as exc:
        problems = cattrs.transform_error(exc, path="params", format_exception=_describe)
        raise InvalidParams("Invalid params: " + "; ".join(problems),
                            {"errors": problems}) from None
    except (TypeError, ValueError) as exc:
        raise InvalidParams(f"Invalid params: {exc}") from None


if __name__ == "__main__":
    frame = parse_frame('[{"jsonrpc":"2.0","id":1,"method":"ping"},{"id":2},1]')
    assert frame.is_batch and isinstance(frame.items[0], Request)
    assert isinstance(frame.items[1], Invalid) and frame.items[1].id == 2
    assert isinstance(parse_frame("{").items[0].error, ParseError)  # type: ignore[union-attr]
    assert isinstance(parse_frame("[" * 100000).items[0], Invalid)
    params = structure_params({"command": ["echo", "hi"], "extra": 1}, ExecuteParams)
    assert params.command == ["echo", "hi"] and params.encoding == "utf-8"
    try:
        structure_params({"command": "x", "timeout": "5"}, ExecuteParams)
    except InvalidParams as exc:
        assert "timeout" in exc.message, exc.message
    else:
        raise AssertionError("a string timeout must be refused")
    assert structure_params({"type": "pause", "session_id": "a"}, ControlParams).type == "PAUSE"
    pty = structure_params({"command": "sh", "pty": {"cols": 80, "rows": 24}}, ExecuteParams)
    assert pty.pty == PtySize(80, 24), pty
    for bad in ({"cols": 0, "rows": 24}, {"cols": 80}, {"cols": 80, "rows": True}, [80, 24]):
        try:
            structure_params({"command": "sh", "pty": bad}, ExecuteParams)
        except InvalidParams:
            pass
        else:
            raise AssertionError(f"pty {bad!r} must be refused")
    message = {"jsonrpc": "2.0", "id": "\ud800", "result": ["é", 1]}
    assert encode_utf8(message) == b'{"jsonrpc":"2.0","id":"\\ud800","result":["\\u00e9",1]}'
    batch = [notification("x", {"a": "é"}), response(1, None)]
    assert encode_utf8(batch) == encode(batch).encode()
    output = Output("s", "stdout", 3, "é\n".encode(), True)
    assert encode_event(output) == (b'{"jsonrpc":"2.0","method":"process.output","params":'
                                    b'{"session_id":"s","stream":"stdout","data":"\xc3\xa9\\n",'
                                    b'"seq":3}}'), encode_event(output)
    raw = Output("s", "stderr", 4, b"\xff", False)
    assert event_params(raw) == {"session_id": "s", "stream": "stderr", "data": "/w==",
                                 "encoding": "base64", "seq": 4}
    print("ccx.protocol: PASS")
