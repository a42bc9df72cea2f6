"""Server settings: one frozen `Settings` built from `CCX_*` environment variables and CLI flags.

Inputs: a mapping of environment variables (usually `os.environ`) and optional overrides.
Outputs: a validated `Settings` (the token read from CCX_TOKEN_FILE if given), or
`ConfigError` whose message names the variable at fault; `resolve_loopback`, the rule that a
host is loopback only if every address it resolves to is.
Docs: https://www.attrs.org/en/stable/api.html#attrs.frozen
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any

import attrs

NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,63}")


class ConfigError(ValueError):
    """A setting has a value the server cannot run with; the message says which and why."""


@attrs.frozen
class Option:
    """One setting: its env variable, its type, its default and its help line."""

    name: str
    env: str
    parse: Callable[[str], Any]
    default: Any
    help: str


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected 0/1/true/false, got {text!r}")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _optional_csv(text: str) -> tuple[str, ...] | None:
    return _csv(text)


def _optional_str(text: str) -> str | None:
    return text or None


def _log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in {"debug", "info", "warning", "error", "critical"}:
        raise ValueError("expected one of debug, info, warning, error, critical")
    return level


def _log_format(text: str) -> str:
    fmt = text.strip().lower()
    if fmt not in {"json", "console"}:
        raise ValueError("expected json or console")
    return fmt


def default_state_dir() -> str:
    """Per-user runtime directory for the crash record: $XDG_RUNTIME_DIR/ccx or /tmp/ccx-UID."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "ccx")
    return f"/tmp/ccx-{os.getuid()}"


OPTIONS: tuple[Option, ...] = (
    Option("host", "CCX_HOST", str, "127.0.0.1", "address to bind"),
    Option("port", "CCX_PORT", int, 8003, "TCP port (0 = any free port)"),
    Option("token", "CCX_TOKEN", _optional_str, None,
           "shared secret clients must present (Bearer header or ?token=)"),
    Option("token_file", "CCX_TOKEN_FILE", _optional_str, None,
           "file holding the token (surrounding whitespace stripped); keeps it out of argv "
           "and the environment"),
    Option("insecure", "CCX_INSECURE", _bool, False,
           "allow a non-loopback bind without a token"),
    Option("allowed_commands", "CCX_ALLOWED_COMMANDS", _optional_csv, None,
           "comma-separated executable names or absolute paths; unset = any"),
    Option("allowed_env", "CCX_ALLOWED_ENV", _csv, (),
           "comma-separated env names execute may set although, with an allow-list, they "
           "could make an allowed program run other code (PATH, LD_*, BASH_ENV, GIT_*...)"),
    Option("allow_shell", "CCX_ALLOW_SHELL", _bool, False, "allow execute with shell=true"),
    Option("allowed_origins", "CCX_ALLOWED_ORIGINS", _csv, (),
           "extra allowed Origin values, comma separated; * allows all"),
    Option("allowed_hosts", "CCX_ALLOWED_HOSTS", _csv, (),
           "on a loopback bind, extra Host header names accepted besides loopback ones "
           "(e.g. a local reverse proxy's); * accepts any"),
    Option("max_connections", "CCX_MAX_CONNECTIONS", int, 1024,
           "open TCP connections, whole server; beyond it a new one is answered 503"),
    Option("max_pending_heads", "CCX_MAX_PENDING_HEADS", int, 64,
           "connections still sending their HTTP request head; beyond it the oldest is "
           "closed"),
    Option("head_timeout", "CCX_HEAD_TIMEOUT", float, 10.0,
           "seconds a connection has to send its complete HTTP request head"),
    Option("max_sessions", "CCX_MAX_SESSIONS", int, 64,
           "live sessions, whole server (ended ones holding unread output count too)"),
    Option("max_sessions_per_connection", "CCX_MAX_SESSIONS_PER_CONNECTION", int, 16,
           "live sessions owned by one connection (counted the same way)"),
    Option("max_watchers", "CCX_MAX_WATCHERS", int, 16,
           "connections watching one session at once (PROTOCOL.md 11); beyond, -32003"),
    Option("max_message_bytes", "CCX_MAX_MESSAGE_BYTES", int, 1024 * 1024,
           "largest client frame in bytes (bigger closes with 1009)"),
    Option("kill_grace", "CCX_KILL_GRACE", float, 5.0,
           "seconds between SIGTERM and SIGKILL on cancel (and the most any session gets "
           "at server shutdown)"),
    Option("max_kill_grace", "CCX_MAX_KILL_GRACE", float, 300.0,
           "largest kill_grace an execute may ask for (larger values are refused)"),
    Option("ws_ping_interval", "CCX_WS_PING_INTERVAL", float, 0.0,
           "seconds between server pings (0 = off)"),
    Option("tcp_keepalive", "CCX_TCP_KEEPALIVE", float, 60.0,
           "seconds a connection may be idle before TCP keepalive probes check the peer"),
    Option("tcp_user_timeout", "CCX_TCP_USER_TIMEOUT", float, 120.0,
           "seconds sent data (or a probe) may stay unacknowledged before the connection "
           "is dropped and its sessions released; a slow reader is never cut off"),
    Option("retention", "CCX_RETENTION", float, 3600.0,
           "seconds an ended session (and output nobody received) is kept"),
    Option("max_linger", "CCX_MAX_LINGER", float, 86400.0,
           "largest linger an execute may ask for (larger values are clamped)"),
    Option("replay_bytes", "CCX_REPLAY_BYTES", int, 8 * 1024 * 1024,
           "per session: unsent output held before the child is throttled, and again "
           "recently sent output kept for replay"),
    Option("ended_replay_bytes", "CCX_ENDED_REPLAY_BYTES", int, 256 * 1024 * 1024,
           "whole server: sent output kept for replay by ended sessions; beyond it the "
           "oldest ended sessions' replay goes first (their unsent output never)"),
    Option("max_held_bytes", "CCX_MAX_HELD_BYTES", int, 1024 * 1024 * 1024,
           "whole server: bytes of output held in memory by all sessions, live and ended, as "
           "kept (JSON-encoded); when full, sent replay output is forgotten (oldest first), "
           "then execute gets -32003 and sessions with unsent output are throttled"),
    Option("max_input_bytes", "CCX_MAX_INPUT_BYTES", int, 8 * 1024 * 1024,
           "per connection: bytes of input frames read but not yet written to the child; "
           "beyond it the connection's input waits, as on a pipe"),
    Option("node_name", "CCX_NODE_NAME", _optional_str, None,
           "prefix of session ids (e.g. the pod name) so an id tells which server has it"),
    Option("mcp_buffer_bytes", "CCX_MCP_BUFFER_BYTES", int, 1024 * 1024,
           "MCP: unread output held per session and stream before the child is throttled"),
    Option("mcp_tail_bytes", "CCX_MCP_TAIL_BYTES", int, 32 * 1024,
           "MCP: bytes of each stream the execute tool returns (the end; the rest is counted)"),
    Option("mcp_http_idle", "CCX_MCP_HTTP_IDLE", float, 3600.0,
           "MCP over HTTP: seconds a session without requests or open streams is kept"),
    Option("mcp_sse_max", "CCX_MCP_SSE_MAX", float, 0.0,
           "MCP over HTTP: seconds after which a response stream is closed for the client to "
           "resume with Last-Event-ID (for proxies with response timeouts); 0 = never"),
    Option("mcp_http_max_sessions", "CCX_MCP_HTTP_MAX_SESSIONS", int, 256,
           "MCP over HTTP: sessions kept; beyond it the longest idle one is ended"),
    Option("track_interval", "CCX_TRACK_INTERVAL", float, 0.5,
           "seconds between scans for descendants that left their session's group "
           "(0 = scan only when a session ends)"),
    Option("state_dir", "CCX_STATE_DIR", str, default_state_dir(),
           "directory of the crash record (live process groups), so the next start kills "
           "what a SIGKILLed server left running; empty = off"),
    Option("log_level", "CCX_LOG_LEVEL", _log_level, "info", "debug, info, warning, error"),
    Option("log_format", "CCX_LOG_FORMAT", _log_format, "json", "json or console"),
)


def read_token_file(path: str) -> str:
    """The token in *path*, surrounding whitespace stripped; `ConfigError` if the file cannot
    be read or holds only whitespace."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"CCX_TOKEN_FILE={path!r}: cannot read it: {exc}") from None
    if not token:
        raise ConfigError(f"CCX_TOKEN_FILE={path!r}: the file is empty")
    return token


def bind_host(host: str) -> str:
    """*host* as the socket layer takes it: an IPv6 literal without its brackets."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def resolve_loopback(host: str) -> bool:
    """True only if every address *host* resolves to (what a bind would use) is loopback.

    A name is never trusted by its spelling: `/etc/hosts` may map `localhost` anywhere.
    Raises `ConfigError` if *host* does not resolve at all.
    """
    try:
        infos = socket.getaddrinfo(bind_host(host) or None, 0, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"CCX_HOST={host!r}: cannot resolve it: {exc}") from None
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(address).split("%", 1)[0]).is_loopback
        for address in addresses)


@attrs.frozen(kw_only=True)
class Settings:
    """Everything `ccx serve` needs to know, validated once at start-up."""

    host: str = "127.0.0.1"
    port: int = 8003
    token: str | None = None
    token_file: str | None = None
    insecure: bool = False
    allowed_commands: tuple[str, ...] | None = None
    allowed_env: tuple[str, ...] = ()
    allow_shell: bool = False
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    max_connections: int = 1024
    max_pending_heads: int = 64
    head_timeout: float = 10.0
    max_sessions: int = 64
    max_sessions_per_connection: int = 16
    max_watchers: int = 16
    max_message_bytes: int = 1024 * 1024
    kill_grace: float = 5.0
    max_kill_grace: float = 300.0
    ws_ping_interval: float = 0.0
    tcp_keepalive: float = 60.0
    tcp_user_timeout: float = 120.0
    retention: float = 3600.0
    max_linger: float = 86400.0
    replay_bytes: int = 8 * 1024 * 1024
    ended_replay_bytes: int = 256 * 1024 * 1024
    max_held_bytes: int = 1024 * 1024 * 1024
    max_input_bytes: int = 8 * 1024 * 1024
    node_name: str | None = None
    mcp_buffer_bytes: int = 1024 * 1024
    mcp_tail_bytes: int = 32 * 1024
    mcp_http_idle: float = 3600.0
    mcp_sse_max: float = 0.0
    mcp_http_max_sessions: int = 256
    track_interval: float = 0.5
    state_dir: str = attrs.field(factory=default_state_dir)
    log_level: str = "info"
    log_format: str = "json"

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"CCX_PORT: {self.port} is not a TCP port (0-65535)")
        for name in ("max_sessions", "max_sessions_per_connection", "max_watchers",
                     "max_message_bytes",
                     "replay_bytes", "mcp_buffer_bytes", "mcp_tail_bytes", "max_held_bytes",
                     "max_input_bytes", "max_connections", "max_pending_heads",
                     "mcp_http_max_sessions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"CCX_{name.upper()}: must be at least 1")
        if self.ended_replay_bytes < 0:
            raise ConfigError("CCX_ENDED_REPLAY_BYTES: must not be negative")
        for name in ("kill_grace", "max_kill_grace", "ws_ping_interval", "retention",
                     "max_linger", "mcp_http_idle", "mcp_sse_max", "track_interval",
                     "tcp_keepalive", "tcp_user_timeout"):
            value = getattr(self, name)
            if math.isnan(value) or value < 0:
                raise ConfigError(f"CCX_{name.upper()}: must be a number, not negative")
        for name in ("kill_grace", "max_kill_grace"):  # a grace must end
            if math.isinf(getattr(self, name)):
                raise ConfigError(f"CCX_{name.upper()}: must be finite")
        if self.kill_grace > self.max_kill_grace:
            raise ConfigError(f"CCX_KILL_GRACE ({self.kill_grace:g}) is above "
                              f"CCX_MAX_KILL_GRACE ({self.max_kill_grace:g})")
        if self.node_name is not None and not NODE_NAME.fullmatch(self.node_name):
            raise ConfigError(f"CCX_NODE_NAME: {self.node_name!r} is not 1-63 characters of "
                              "letters, digits, '.', '_' or '-'")
        if self.head_timeout <= 0:
            raise ConfigError("CCX_HEAD_TIMEOUT: must be positive")
        if self.token_file is not None:
            if self.token is not None:
                raise ConfigError("CCX_TOKEN and CCX_TOKEN_FILE are both set; use one")
            object.__setattr__(self, "token", read_token_file(self.token_file))
        if self.allowed_commands is not None and not self.allowed_commands:
            raise ConfigError("CCX_ALLOWED_COMMANDS: set but empty; unset it to allow any")

    @property
    def is_loopback(self) -> bool:
        """Every address the host resolves to is loopback (resolved each time asked)."""
        return resolve_loopback(self.host)

    def check_exposure(self) -> None:
        """Refuse a non-loopback bind without a token unless CCX_INSECURE=1; refuse a host
        that does not resolve (`ConfigError` either way)."""
        if not self.is_loopback and self.token is None and not self.insecure:
            raise ConfigError(
                f"refusing to bind {self.host} without CCX_TOKEN: anyone who can reach it could "
                "run commands. Set CCX_TOKEN, bind 127.0.0.1, or set CCX_INSECURE=1."
            )

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Read every `CCX_*` variable, then apply *overrides* (CLI flags; None = not given)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for option in OPTIONS:
            raw = environ.get(option.env)
            if raw is None:
                continue
            try:
                values[option.name] = option.parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{option.env}={raw!r}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None


if __name__ == "__main__":
    settings = Settings.from_env({"CCX_PORT": "9000", "CCX_ALLOWED_COMMANDS": "echo, /bin/cat"})
    assert settings.port == 9000 and settings.allowed_commands == ("echo", "/bin/cat")
    assert Settings.from_env({}, host="::1").is_loopback
    try:
        Settings.from_env({"CCX_HOST": "0.0.0.0"}).check_exposure()
    except ConfigError:
        pass
    else:
        raise AssertionError("non-loopback bind without token must be refused")
    print("ccx.config: PASS")
