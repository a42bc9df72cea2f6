"""What a session tells its owner and watchers, as typed events; and their compact records.

Inputs: what a session's output part observes (`ccx.output`): the start, output read from a
stream, PAUSE/RESUME taking effect, the end; what a watcher or hand-over notices (lagged,
detached). Outputs: frozen events, one per notification of PROTOCOL.md sections 3, 8
and 11; and `pack`/`unpack`, which turn an event into the bytes a session's outbox holds (and
spools to disk, `ccx.spool`) and back. A record is not JSON: output is one header byte and the
payload, so the spool holds raw output, not its escaped JSON. Encoding for the wire is the
sinks' business (`ccx.protocol.encode_event` for a WebSocket; an MCP buffer takes `data` as
it is), so nothing below the methods layer builds JSON-RPC.
Events are frozen `msgspec.Struct`s rather than attrs classes: one is made per output chunk
on the hot path, and a Struct is made in a fifth of the time of a frozen attrs instance.
Docs: https://jcristharif.com/msgspec/structs.html
      https://jcristharif.com/msgspec/api.html#msgspec.msgpack.encode
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

STREAMS = ("stdout", "stderr", "pty")  # an output record's header byte indexes this
_STREAM_INDEX = {name: index for index, name in enumerate(STREAMS)}
_TEXT = 0x80  # header bit: `data` is UTF-8 text (the session's encoding is "utf-8")


class Started(msgspec.Struct, frozen=True):
    session_id: str
    pid: int
    pgid: int
    command: list[str]
    method: ClassVar[str] = "process.started"


class Output(msgspec.Struct, frozen=True):
    """Output of one stream with its `seq`. `data` is the raw bytes read (`text` False: the
    session's encoding is base64) or the UTF-8 of the text they decoded to (`text` True)."""

    session_id: str
    stream: str
    seq: int
    data: bytes
    text: bool
    method: ClassVar[str] = "process.output"


class Paused(msgspec.Struct, frozen=True):
    session_id: str
    method: ClassVar[str] = "process.paused"


class Resumed(msgspec.Struct, frozen=True):
    session_id: str
    method: ClassVar[str] = "process.resumed"


class Completed(msgspec.Struct, frozen=True):
    session_id: str
    status: str
    exit_code: int | None
    signal: str | None
    duration_s: float
    stdout_bytes: int
    stderr_bytes: int
    reason: str | None = None  # "drain" | "shutdown": the node ended it (PROTOCOL.md 10)
    method: ClassVar[str] = "process.completed"


class Lagged(msgspec.Struct, frozen=True):
    """A watcher fell behind what is held (PROTOCOL.md 11); its watch ends."""

    session_id: str
    first_seq: int
    method: ClassVar[str] = "process.lagged"


class Detached(msgspec.Struct, frozen=True):
    """Another connection attached the session (PROTOCOL.md 8); or, with `node` and `reason`
    (the -32008 data), the node relaying it lost the owning node (PROTOCOL.md 10)."""

    session_id: str
    node: str | None = None
    reason: str | None = None  # "unreachable"
    method: ClassVar[str] = "process.detached"


Event = Started | Output | Paused | Resumed | Completed | Lagged | Detached
_CONTROLS: dict[str, type[Started | Paused | Resumed | Completed]] = {
    kind.method: kind for kind in (Started, Paused, Resumed, Completed)}


def pack(event: Event) -> bytes:
    """The record of *event*, without its session id (the outbox is the session's own):
    output is a header byte (stream index, text bit) and `data`; the rest, msgpack."""
    if isinstance(event, Output):
        header = _STREAM_INDEX[event.stream] | (_TEXT if event.text else 0)
        return bytes((header,)) + event.data
    fields = msgspec.structs.astuple(event)[1:]
    return msgspec.msgpack.encode((event.method, *fields))


def unpack(session_id: str, method: str, record: bytes, seq: int | None) -> Event:
    """The event whose record is *record* (`pack`); output needs its *seq* back."""
    if method == Output.method:
        assert seq is not None, "output records are held with their seq"
        header = record[0]
        return Output(session_id, STREAMS[header & 0x7F], seq, record[1:],
                      bool(header & _TEXT))
    name, *fields = msgspec.msgpack.decode(record)
    return _CONTROLS[name](session_id, *fields)


if __name__ == "__main__":
    samples: list[Event] = [
        Started("s", 1, 1, ["echo", "é"]),
        Output("s", "stderr", 7, b"\x00\xff raw", False),
        Output("s", "pty", 8, "é\n".encode(), True),
        Paused("s"), Resumed("s"),
        Completed("s", "exited", 0, None, 0.5, 3, 0),
        Completed("s", "cancelled", None, "SIGTERM", 1.0, 0, 0, "drain"),
    ]
    for sample in samples:
        seq = sample.seq if isinstance(sample, Output) else None
        assert unpack("s", sample.method, pack(sample), seq) == sample, sample
    assert len(pack(samples[1])) == 1 + len(b"\x00\xff raw")  # raw bytes: no escaping
    print("ccx.events: PASS")
