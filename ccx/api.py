"""Native JSON-RPC methods (PROTOCOL.md section 2) as plain async functions on the manager.

Inputs: a `Call` (manager, the calling connection as `Owner`, raw params).
Outputs: result dicts, or an `RpcError` raised for the dispatcher to answer. `dispatch()` runs
one parsed request and returns its response (None for notifications); work that must follow
the response on the wire (execute's notifications) is queued on `Call.after_response`.
Docs: https://www.jsonrpc.org/specification#request_object
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import attrs
import structlog
import trio

from ccx import __version__
from ccx.errors import InternalError, InvalidParams, InvalidState, MethodNotFound, RpcError
from ccx.log import get_logger
from ccx.manager import SessionManager
from ccx.output import CHANNEL_CHUNKS, CHUNK_BYTES
from ccx.owner import Owner
from ccx.params import (
    AttachParams,
    ControlParams,
    DrainParams,
    ExecuteParams,
    InputParams,
    NoParams,
    ResizeParams,
    SessionParams,
    SessionsParams,
)
from ccx.protocol import Request, RequestId, error_response, response, structure_params
from ccx.session import Session

log = get_logger("ccx.api")

PROTOCOL_VERSION = 1


@attrs.define
class Call:
    """One method call: who asks, with what, and what must happen once it is answered."""

    manager: SessionManager
    owner: Owner | None
    params: Any
    after_response: list[Callable[[], None]] = attrs.field(factory=list)


Handler = Callable[[Call], Awaitable[dict[str, object]]]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


async def execute(call: Call) -> dict[str, object]:
    params = structure_params(call.params, ExecuteParams)
    session = await call.manager.execute(params, call.owner)
    call.after_response.append(session.announce)
    return {"session_id": session.id, "status": "started", "pid": session.group.pid,
            "pgid": session.group.pgid}


async def _forwarded(call: Call, method: str, *, relays: bool = False) -> dict[str, object] | None:
    """PROTOCOL.md 10: if the params name a session of another node, the owning node's
    answer to this very request (its error passed on as it is; -32008 if it is lost); None
    to serve it here. *relays* (attach, watch): the session's notifications that follow on
    the caller's link wait until this request's response is sent."""
    params = call.params if isinstance(call.params, dict) else None
    if params is None:
        return None
    target = call.manager.cluster.route(params.get("session_id"))
    if target is None:
        return None
    gate = None
    if relays and call.owner is not None:
        gate = trio.Event()
        call.after_response.append(gate.set)
    result = await call.manager.cluster.forward(target, method, params, call.owner, gate)
    return dict(result)


def _target(call: Call, session_id: str | None) -> Session:
    if session_id is not None:
        return call.manager.get(session_id)
    owned = call.manager.owned_by(call.owner) if call.owner is not None else []
    if len(owned) != 1:
        raise InvalidParams(
            "Invalid params: session_id is required unless this connection owns exactly one "
            f"live session (it owns {len(owned)})"
        )
    return owned[0]


async def control(call: Call) -> dict[str, object]:
    if (forwarded := await _forwarded(call, "control")) is not None:
        return forwarded
    params = structure_params(call.params, ControlParams)
    session = _target(call, params.session_id)
    started = time.perf_counter()
    if params.type == "PAUSE":
        state = await session.pause()
    elif params.type == "RESUME":
        state = session.resume()
    else:
        state = session.cancel(by_client=True)
    call.manager.metrics.observe_control(params.type, time.perf_counter() - started)
    return {"session_id": session.id, "status": state.value}


async def input_(call: Call) -> dict[str, object]:
    if (forwarded := await _forwarded(call, "input")) is not None:
        return forwarded
    params = structure_params(call.params, InputParams)
    session = call.manager.get(params.session_id)
    if params.encoding == "base64":
        try:
            data = base64.b64decode(params.data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidParams("Invalid params: data is not valid base64") from None
    else:
        data = params.data.encode("utf-8", errors="surrogatepass")
    if session.state.ended:
        raise InvalidState(f"session has ended ({session.state.value})",
                           {"status": session.state.value})
    written = await session.write_input(data, eof=params.eof)
    return {"session_id": session.id, "bytes": written}


async def resize(call: Call) -> dict[str, object]:
    if (forwarded := await _forwarded(call, "resize")) is not None:
        return forwarded
    params = structure_params(call.params, ResizeParams)
    session = call.manager.get(params.session_id)
    return {"session_id": session.id, **session.resize(params.cols, params.rows)}


async def sessions(call: Call) -> dict[str, object]:
    params = structure_params(call.params, SessionsParams)
    infos = [attrs.asdict(s.info()) for s in call.manager.all(params.tag)]
    if params.scope == "cluster":  # PROTOCOL.md 10: every node reached, and who was not
        return await call.manager.cluster.sessions(infos, params.tag)
    return {"sessions": infos}


async def attach(call: Call) -> dict[str, object]:
    if (forwarded := await _forwarded(call, "attach", relays=True)) is not None:
        return forwarded
    params = structure_params(call.params, AttachParams)
    if call.owner is None:
        raise InvalidState("attach needs a connection to deliver to")
    session = call.manager.attach(params.session_id, params.since_seq, call.owner)
    call.after_response.append(session.announce)
    return {"session_id": session.id, "status": session.state.value, "pid": session.group.pid,
            "pgid": session.group.pgid, "next_seq": session.next_seq}


async def watch(call: Call) -> dict[str, object]:
    """PROTOCOL.md section 11: as `attach`, but the session stays where it is."""
    if (forwarded := await _forwarded(call, "watch", relays=True)) is not None:
        return forwarded
    params = structure_params(call.params, AttachParams)
    if call.owner is None:
        raise InvalidState("watch needs a connection to deliver to")
    session, watcher = call.manager.watch(params.session_id, params.since_seq, call.owner)
    call.after_response.append(watcher.gate.set)
    return {"session_id": session.id, "status": session.state.value, "pid": session.group.pid,
            "pgid": session.group.pgid, "next_seq": watcher.replay_end}


async def unwatch(call: Call) -> dict[str, object]:
    if (forwarded := await _forwarded(call, "unwatch")) is not None:
        return forwarded
    params = structure_params(call.params, SessionParams)
    if call.owner is not None:
        call.manager.unwatch(params.session_id, call.owner)
    return {"session_id": params.session_id, "watching": False}


async def status(call: Call) -> dict[str, object]:
    if (forwarded := await _forwarded(call, "status")) is not None:
        return forwarded
    params = structure_params(call.params, SessionParams)
    return attrs.asdict(call.manager.get(params.session_id).info())


async def ping(call: Call) -> dict[str, object]:
    return {"pong": True, "time": _now()}


async def drain(call: Call) -> dict[str, object]:
    """PROTOCOL.md 10: stop taking sessions (optionally cancelling the rest after `timeout`
    seconds), or with `undo` take them again."""
    params = structure_params(call.params, DrainParams)
    return call.manager.drain(timeout=params.timeout, undo=params.undo)


async def server_info(call: Call) -> dict[str, object]:
    structure_params(call.params if isinstance(call.params, dict) else None, NoParams)
    settings = call.manager.settings
    capabilities = ["execute", "control", "input", "stdin", "base64", "batch", "timeout",
                    "linger", "attach", "replay", "pty", "resize", "drain", "watch"]
    if settings.node_name is not None:
        capabilities.append("cluster")  # PROTOCOL.md 10: forwarding, scope "cluster"
    if settings.allow_shell:
        capabilities.append("shell")
    return {
        "name": "ccx",
        "version": __version__,
        "protocol": PROTOCOL_VERSION,
        "limits": {
            "max_sessions": settings.max_sessions,
            "max_sessions_per_connection": settings.max_sessions_per_connection,
            "max_watchers": settings.max_watchers,
            "max_message_bytes": settings.max_message_bytes,
            "chunk_bytes": CHUNK_BYTES,
            "channel_chunks": CHANNEL_CHUNKS,
            "kill_grace": settings.kill_grace,
            "max_kill_grace": settings.max_kill_grace,
            "allowed_commands": list(settings.allowed_commands)
            if settings.allowed_commands is not None else None,
            "allowed_env": list(settings.allowed_env),
            "allow_shell": settings.allow_shell,
            "max_linger": settings.max_linger,
            "replay_bytes": settings.replay_bytes,
            "retention": settings.retention,
            "max_held_bytes": settings.max_held_bytes,
            "max_input_bytes": settings.max_input_bytes,
        },
        "capabilities": capabilities,
        "node": settings.node_name,
        "incarnation": call.manager.incarnation if settings.node_name else None,
        "draining": call.manager.draining,
        "busy": len(call.manager.busy()),  # what `drain` answers as `sessions`, read-only
    }


METHODS: dict[str, Handler] = {
    "execute": execute,
    "control": control,
    "input": input_,
    "resize": resize,
    "sessions": sessions,
    "attach": attach,
    "watch": watch,
    "unwatch": unwatch,
    "status": status,
    "ping": ping,
    "server.info": server_info,
    "drain": drain,
}


def error_reply(request_id: RequestId, exc: Exception) -> tuple[dict[str, object], str]:
    """The response for a request that raised *exc*, and its log outcome: an `RpcError` as
    itself, anything else as -32603 with its traceback logged. Call it in the except block."""
    if isinstance(exc, RpcError):
        reply = error_response(request_id, exc)
        return reply, f"error {exc.to_json()['code']}"
    log.exception("request_crashed")
    return error_response(request_id, InternalError(f"Internal error: {exc!r}")), "error -32603"


async def dispatch(request: Request, call: Call) -> dict[str, object] | None:
    """Run one request; return its response, or None for a notification. Never raises
    anything but cancellation: errors become JSON-RPC errors, bugs become -32603."""
    started = time.monotonic()
    outcome = "ok"
    with structlog.contextvars.bound_contextvars(request_id=request.id, method=request.method):
        try:
            handler = METHODS.get(request.method)
            if handler is None:
                raise MethodNotFound(f"Method not found: {request.method}")
            result = await handler(call)
            reply = response(request.id, result)
        except Exception as exc:
            reply, outcome = error_reply(request.id, exc)
        log.info("request", outcome=outcome,
                 duration_ms=round((time.monotonic() - started) * 1000, 3))
    return None if request.is_notification else reply


async def _self_check() -> None:
    """Requests through `dispatch` as a transport sends them: ping, an unknown method, bad
    params, execute (and its notifications, after the response), status."""
    import json

    import trio

    from ccx.config import Settings
    from ccx.events import Event
    from ccx.protocol import encode_event, parse_frame

    sent: list[dict[str, Any]] = []

    class Collector:
        async def send_message(self, message: dict[str, object]) -> None:
            sent.append(message)

        async def send_frame(self, frame: bytes) -> None:
            sent.append(json.loads(frame))

        async def send_event(self, event: Event) -> None:
            await self.send_frame(encode_event(event))

    owner = Collector()
    manager = SessionManager(Settings(state_dir="", kill_grace=0.5))

    async def ask(method: str, params: object = None) -> tuple[Call, dict[str, Any]]:
        """One request, as a transport hands it over; the call (its hooks) and the reply."""
        message = {"jsonrpc": "2.0", "id": 1, "method": method}
        if params is not None:
            message["params"] = params
        request = parse_frame(json.dumps(message)).items[0]
        assert isinstance(request, Request)
        call = Call(manager, owner, request.params)
        reply = await dispatch(request, call)
        assert reply is not None
        return call, reply

    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        assert (await ask("ping"))[1]["result"]["pong"] is True
        assert (await ask("nope"))[1]["error"]["code"] == -32601
        assert (await ask("execute", {"command": 5}))[1]["error"]["code"] == -32602
        call, reply = await ask("execute", {"command": ["echo", "hi"]})
        session_id = reply["result"]["session_id"]
        for hook in call.after_response:
            hook()
        await manager.get(session_id).wait_done()
        methods = [m["method"] for m in sent]
        assert methods[0] == "process.started" and methods[-1] == "process.completed", methods
        assert (await ask("status", {"session_id": session_id}))[1]["result"]["exit_code"] == 0
        nursery.cancel_scope.cancel()
    print("ccx.api: PASS")


if __name__ == "__main__":
    import trio

    trio.run(_self_check)
