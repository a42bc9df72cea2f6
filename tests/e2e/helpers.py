"""What the e2e tests read back: Claude Code's stream-json events and the processes of a run,
seen from outside (/proc), independently of ccx."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any


def unique(word: str) -> str:
    """A marker no other prompt or process contains."""
    return f"{word}-{uuid.uuid4().hex[:10]}"


def events(stdout: bytes) -> list[dict[str, Any]]:
    """Claude Code's stream-json output: one JSON object per line, every line complete."""
    text = stdout.decode()
    assert text.endswith("\n"), f"output ends inside a line: {text[-200:]!r}"
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def result_event(stdout: bytes) -> dict[str, Any]:
    """The run's one `result` event, which must also be its last event."""
    found = events(stdout)
    results = [e for e in found if e.get("type") == "result"]
    assert len(results) == 1 and found[-1] is results[0], [e.get("type") for e in found]
    return results[0]


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, ppid, comm) of *pid*, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    comm = raw[raw.index(b"(") + 1 : raw.rfind(b")")].decode(errors="replace")
    fields = raw[raw.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), comm


def marked(mark: str) -> dict[int, tuple[str, str]]:
    """{pid: (state, comm)} of every live (non-zombie) process whose environment has
    E2E_MARK=*mark*: a Claude Code run and all it started, escaped daemons included."""
    needle = f"E2E_MARK={mark}".encode()
    found: dict[int, tuple[str, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        stat = _stat(int(entry))
        if needle in environ and stat is not None and stat[0] != "Z":
            found[int(entry)] = (stat[0], stat[2])
    return found


def descendants(pid: int) -> dict[int, tuple[str, str]]:
    """{pid: (state, comm)} of *pid* and every live process below it (by parent links)."""
    table: dict[int, tuple[str, int, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            table[int(entry)] = stat
    found, todo = {}, [pid]
    while todo:
        current = todo.pop()
        if current in table and table[current][0] != "Z":
            found[current] = (table[current][0], table[current][2])
        todo += [child for child, (_, ppid, _) in table.items() if ppid == current]
    return found


def user_message(text: str) -> str:
    """One line of Claude Code's stream-json input format: a user turn."""
    return json.dumps({"type": "user", "message": {"role": "user", "content": text}}) + "\n"
