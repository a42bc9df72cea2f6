"""Structured logging: JSON lines (or console) on stderr with bound context ids.

Inputs: a level and a format ("json" or "console").
Outputs: structlog configured process-wide; `get_logger()` for modules; the context ids
`connection_id`, `request_id`, `session_id` come from `structlog.contextvars`; taps
(`add_tap`) that see every event before it is rendered (MCP forwards a caller's session lines
as `notifications/message`).
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


# A tap gets (level, event dict with the bound context merged in); it must not block or log.
LogTap = Callable[[str, dict[str, Any]], None]
_taps: list[LogTap] = []


def forward_to_taps(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: show each event to the taps; never changes or drops it."""
    if _taps:
        merged = {**structlog.contextvars.get_contextvars(), **event_dict}
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
    print("ccx.log: PASS")
