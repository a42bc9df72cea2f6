"""`ccx serve --token` puts the token in argv, readable by every local user in
/proc/PID/cmdline: the server says so in its log and points at CCX_TOKEN_FILE / CCX_TOKEN.
(Reading the token from a file is the transport side's; this only checks the warning.)
Rules: a real `ccx serve` on 127.0.0.1, port 0, stopped with SIGTERM; a deadline on each step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

CCX = str(Path(sys.executable).with_name("ccx"))


def _events_until_listening(*args: str) -> list[dict[str, object]]:
    proc = subprocess.Popen([CCX, "serve", "--port", "0", *args], stderr=subprocess.PIPE,
                            env={**os.environ, "CCX_LOG_FORMAT": "json"})
    assert proc.stderr is not None
    events: list[dict[str, object]] = []
    try:
        for line in proc.stderr:
            events.append(json.loads(line))
            if events[-1].get("event") == "listening":
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
    assert events and events[-1].get("event") == "listening", events
    return events


def test_token_flag_is_warned_about() -> None:
    warned = [e for e in _events_until_listening("--token", "s3cret")
              if e.get("event") == "token_in_argv"]
    assert warned and "CCX_TOKEN_FILE" in str(warned[0]["hint"])
    assert "s3cret" not in json.dumps(warned)


def test_no_warning_without_the_flag() -> None:
    events = _events_until_listening()
    assert not [e for e in events if e.get("event") == "token_in_argv"]
