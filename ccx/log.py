"""Structured logging: JSON lines (or console) on stderr with bound context ids.

Inputs: a level and a format ("json" or "console").
Outputs: structlog configured process-wide; `get_logger()` for modules; the context ids
`connection_id`, `request_id`, `session_id` come from `structlog.contextvars`; taps
(`add_tap`) that see every event before it is rendered (MCP forwards a caller's session lines
as `notifications/message`); `clip`, which every event's values go through (a processor), so
a client-chosen request id, method or argv never puts more than ~`LOG_VALUE_CHARS`
characters per field into a log line.
Docs: https://www.structlog.org/en/stable/contextvars.html
      https://www.structlog.org/en/stable/standard-library.html
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


LOG_VALUE_CHARS = 256  # per logged value (a string, or a list's items together)
NOT_CLIPPED = frozenset({"event", "exception", "exc_info", "stack", "stack_info"})


def clip(value: Any, limit: int = LOG_VALUE_CHARS) -> Any:
    """*value* cut for a log line: a string to *limit* characters, a list or tuple to items
    totalling *limit* characters (each string item clipped too), with a note of what was
    cut (`…(+N chars)`, `…(+N items)`). Other values are returned unchanged."""
    if isinstance(value, str):
        if len(value) <= limit:
            return value
        return f"{value[:limit]}…(+{len(value) - limit} chars)"
    if isinstance(value, list | tuple):
        kept: list[Any] = []
        budget = limit
        for index, item in enumerate(value):
            if budget <= 0:
                kept.append(f"…(+{len(value) - index} items)")
                break
            item = clip(item, budget)
            budget -= len(item) if isinstance(item, str) else len(repr(item))
            kept.append(item)
        return kept
    return value


def clip_values(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: `clip` every value but the event name and tracebacks."""
    for key, value in event_dict.items():
        if key not in NOT_CLIPPED:
            event_dict[key] = clip(value)
    return event_dict


# A tap gets (level, event dict with the bound context merged in); it must not block or log.
LogTap = Callable[[str, dict[str, Any]], None]
_taps: list[LogTap] = []


def forward_to_taps(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: show each event to the taps; never changes or drops it."""
    if _taps:
        merged = {k: v if k in NOT_CLIPPED else clip(v)
                  for k, v in {**structlog.contextvars.get_contextvars(), **event_dict}.items()}
        for tap in list(_taps):
            try:
                tap(method_name, merged)
            except Exception:  # a broken tap must not break logging
                pass
    return event_dict


def add_tap(tap: LogTap) -> None:
    """Show every later log event to *tap* (installs `forward_to_taps` if missing)."""
    processors = list(structlog.get_config()["processors"])
    if forward_to_taps not in processors:
        structlog.configure(processors=[forward_to_taps, *processors])
    _taps.append(tap)


def remove_tap(tap: LogTap) -> None:
    if tap in _taps:
        _taps.remove(tap)


def configure(level: str = "info", fmt: str = "json") -> None:
    """Send every log event to stderr, one JSON object per line unless *fmt* is "console"."""
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            forward_to_taps,
            structlog.contextvars.merge_contextvars,
            clip_values,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """A lazy logger that carries *name* as `component` in every event.

    Lazy: modules create loggers at import time, before `configure()` runs.
    """
    return structlog.get_logger(component=name)


if __name__ == "__main__":
    import io
    import json

    configure("info", "json")
    buffer = io.StringIO()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=buffer))
    with structlog.contextvars.bound_contextvars(session_id="s1"):
        get_logger("demo").info("spawned", pid=1)
    event = json.loads(buffer.getvalue())
    assert event["session_id"] == "s1" and event["event"] == "spawned", event
    assert clip("x" * 300) == "x" * 256 + "…(+44 chars)"
    cut = clip(["a" * 200, "b" * 100, "c"])
    assert cut == ["a" * 200, "b" * 56 + "…(+44 chars)", "…(+1 items)"], cut
    print("ccx.log: PASS")
