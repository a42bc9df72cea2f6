"""The `memory` workload's clients: many sessions write with nobody reading (detached), then
each is read back in full by attaching.

Run as `python -m bench.memory start SPEC_JSON` (one process: starts every session over
`connections` connections, then closes them all, so each session lingers detached) or
`python -m bench.memory read SPEC_JSON` (one process per connection: attaches its share of the
sessions at once with `since_seq` -1 and reads each to `process.completed`).
Inputs (SPEC_JSON keys): `url`, `argv` (the command each session runs), `count`,
`connections`, `session_ids` (read), `out` (result path).
Outputs: a JSON result at `out`: the session ids (start); per session the bytes of output
received, whether seqs ran 0, 1, 2... without a gap, and the completion (read).
`bench/run.py` samples the server's RSS and the spool's size on disk meanwhile.
Docs: ../shared/PROTOCOL.md section 8 (detach, attach, replay); docs/performance.md.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from bench.reader import decode_json
from bench.wsclient import WsClient

LINGER_S = 3600


class Conn:
    """One WebSocket connection to ccx with numbered requests."""

    def __init__(self, url: str) -> None:
        self.ws = WsClient(url, timeout=None)
        self.next_id = 1

    def call(self, method: str, params: dict[str, Any]) -> int:
        request_id, self.next_id = self.next_id, self.next_id + 1
        self.ws.send_text(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method,
                                      "params": params}))
        return request_id

    def pull(self) -> list[dict[str, Any]]:
        if self.ws.receive_into_buffer() == 0:
            raise ConnectionError("server closed the connection")
        return [decode_json(p) for _, p in self.ws.messages()]


def start(spec: dict[str, Any]) -> dict[str, Any]:
    """Start `count` sessions (linger) over `connections` connections, then close them."""
    conns = [Conn(spec["url"]) for _ in range(spec["connections"])]
    waiting: dict[tuple[int, int], None] = {}
    for index in range(spec["count"]):
        which = index % len(conns)
        waiting[(which, conns[which].call("execute", {"command": spec["argv"],
                                                      "linger": LINGER_S}))] = None
    ids: list[str] = []
    errors: list[Any] = []
    for which, conn in enumerate(conns):
        while any(key[0] == which for key in waiting):
            for message in conn.pull():
                key = (which, message.get("id", -1))
                if key in waiting:
                    del waiting[key]
                    if "result" in message:
                        ids.append(message["result"]["session_id"])
                    else:
                        errors.append(message.get("error"))
        conn.ws.close()
    return {"session_ids": ids, "errors": errors, "started_at": time.time()}


def read(spec: dict[str, Any]) -> dict[str, Any]:
    """Attach every session of `session_ids` on one connection; read each to its end."""
    conn = Conn(spec["url"])
    tallies = {sid: {"bytes": 0, "next_seq": 0, "gaps": 0, "completed": None, "error": None}
               for sid in spec["session_ids"]}
    attaching = {conn.call("attach", {"session_id": sid, "since_seq": -1}): sid
                 for sid in tallies}
    open_ = len(tallies)
    while open_:
        for message in conn.pull():
            method = message.get("method")
            if method == "process.output":
                params = message["params"]
                tally = tallies[params["session_id"]]
                data: str = params["data"]
                tally["bytes"] += len(data) if data.isascii() else len(data.encode())
                if params["seq"] != tally["next_seq"]:
                    tally["gaps"] += 1
                tally["next_seq"] = params["seq"] + 1
            elif method == "process.completed":
                tallies[message["params"]["session_id"]]["completed"] = message["params"]
                open_ -= 1
            elif method is None and "error" in message:
                sid = attaching.get(message.get("id", -1), "")
                if sid in tallies:
                    tallies[sid]["error"] = message["error"]
                    open_ -= 1
    conn.ws.close()
    return {"sessions": tallies}


def main() -> None:
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    result = start(spec) if mode == "start" else read(spec)
    with open(spec["out"], "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main()
