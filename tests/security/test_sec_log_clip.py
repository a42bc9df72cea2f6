"""Client-chosen strings logged in full (security finding 5): a 100 KB request id, method or
argv became a 100 KB log line (per request: disk and log pipelines fill fast). Every logged
value is clipped to ~256 characters (`ccx.log.clip`), tracebacks excepted.

Rules: a real `ccx serve` (debug logging, so every event is seen) on 127.0.0.1, port 0;
waits on the server's answers; deadlines on all I/O.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio
import trio_websocket
from sechelp import ccx_serve

from ccx.log import LOG_VALUE_CHARS

BIG = 100_000
SLACK = 40  # the "…(+N chars)" note


def _longest_value(event: dict[str, object]) -> int:
    longest = 0
    for key, value in event.items():
        if key in ("exception", "event"):
            continue
        if isinstance(value, list):
            longest = max(longest, len(json.dumps(value)) - 4 * len(value))
        else:
            longest = max(longest, len(str(value)))
    return longest


async def test_huge_ids_methods_and_argv_are_clipped_in_logs(tmp_path: Path) -> None:
    with ccx_serve(tmp_path, {"CCX_LOG_LEVEL": "debug"}) as served:
        with trio.fail_after(20):
            async with trio_websocket.open_websocket("127.0.0.1", served.port, "/ws",
                                                     use_ssl=False) as ws:
                big_id = "i" * BIG
                await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": big_id,
                                                  "method": "m" * BIG}))
                reply = json.loads(await ws.get_message())
                assert reply["error"]["code"] == -32601, reply
                await ws.send_message(json.dumps({
                    "jsonrpc": "2.0", "id": big_id, "method": "execute",
                    "params": {"command": ["echo", *(["a" * 1000] * 100)]}}))
                while True:
                    message = json.loads(await ws.get_message())
                    assert "error" not in message, message
                    if message.get("method") == "process.completed":
                        break
                await ws.send_message(json.dumps({
                    "jsonrpc": "2.0", "id": big_id, "method": "execute",
                    "params": {"command": ["/no/such/" + "x" * BIG]}}))
                reply = json.loads(await ws.get_message())
                assert "error" in reply, reply
        events = served.log()
        assert any(e.get("event") == "spawned" for e in events), events
        worst = max(events, key=_longest_value)
        assert _longest_value(worst) <= LOG_VALUE_CHARS + SLACK, str(worst)[:1000]
        assert max(len(line) for line in served.log_text().splitlines()) < 8 * 1024
