"""Server settings: one frozen `Settings` built from `CCX_*` environment variables and CLI flags.

Inputs: a mapping of environment variables (usually `os.environ`) and optional overrides.
Outputs: a validated `Settings` (the token read from CCX_TOKEN_FILE if given), or
`ConfigError` whose message names the variable at fault; `OPTIONS`, one `Option` per setting
(variable `CCX_<NAME>`, parser, default, help line), derived from the `Settings` fields, so
a new setting is one `setting(...)` field; `resolve_loopback`, the rule that a host is
loopback only if every address it resolves to is.
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

NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a DNS label (RFC 1123)


class ConfigError(ValueError):
    """A setting has a value the server cannot run with; the message says which and why."""


@attrs.frozen
class Option:
    """One setting as the CLI and the environment see it: derived from a `Settings` field."""

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


# CCX_PEERS parsed: the static map's (name, url) pairs, and dns:HOST:PORT as (HOST, PORT).
Peers = tuple[tuple[tuple[str, str], ...], tuple[str, int] | None]


def _peers(text: str) -> Peers | None:
    """CCX_PEERS: `name=ws://host:port/ws,...`, or `dns:HOST:PORT`."""
    text = text.strip()
    if not text:
        return None
    if text.startswith("dns:"):
        host, _, port = text[4:].rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected dns:HOST:PORT")
        return (), (host.strip("[]"), int(port))
    pairs = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        name, sep, url = (part.strip() for part in item.partition("="))
        if not sep or not NODE_NAME.fullmatch(name):
            raise ValueError(f"expected name=ws://host:port/ws, got {item!r}")
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"{name}: the URL must start with ws:// or wss://")
        pairs.append((name, url))
    return tuple(pairs), None


def _peer_url(text: str) -> str | None:
    """CCX_PEER_URL: a ws:// or wss:// URL with `{node}` in it."""
    text = text.strip()
    if not text:
        return None
    if "{node}" not in text or not text.startswith(("ws://", "wss://")):
        raise ValueError("expected a ws:// URL with {node} in it, e.g. "
                         "ws://{node}.ccx-pods:8003/ws")
    return text


def setting(default: Any, parse: Callable[[str], Any], help_line: str) -> Any:
    """A `Settings` field that is also the variable `CCX_<NAME>` and the flag `--<name>`:
    its default, its parser (variable text to value) and its help line, written once."""
    return attrs.field(default=default, metadata={"parse": parse, "help": help_line})


def default_state_dir() -> str:
    """Per-user runtime directory for the crash record: $XDG_RUNTIME_DIR/ccx or /tmp/ccx-UID."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "ccx")
    return f"/tmp/ccx-{os.getuid()}"




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

    host: str = setting("127.0.0.1", str, "address to bind")
    port: int = setting(8003, int, "TCP port (0 = any free port)")
    token: str | None = setting(None, _optional_str,
        "shared secret clients must present (Bearer header or ?token=)")
    token_file: str | None = setting(None, _optional_str,
        "file holding the token (surrounding whitespace stripped); keeps it out of argv and "
        "the environment")
    insecure: bool = setting(False, _bool, "allow a non-loopback bind without a token")
    allowed_commands: tuple[str, ...] | None = setting(None, _optional_csv,
        "comma-separated executable names or absolute paths; unset = any")
    allowed_env: tuple[str, ...] = setting((), _csv,
        "comma-separated env names execute may set although, with an allow-list, they could "
        "make an allowed program run other code (PATH, LD_*, BASH_ENV, GIT_*...)")
    allow_shell: bool = setting(False, _bool, "allow execute with shell=true")
    allowed_origins: tuple[str, ...] = setting((), _csv,
        "extra allowed Origin values, comma separated; * allows all")
    allowed_hosts: tuple[str, ...] = setting((), _csv,
        "on a loopback bind, extra Host header names accepted besides loopback ones (e.g. a "
        "local reverse proxy's); * accepts any")
    max_connections: int = setting(1024, int,
        "open TCP connections, whole server; beyond it a new one is answered 503")
    max_pending_heads: int = setting(64, int,
        "connections still sending their HTTP request head; beyond it the oldest is closed")
    head_timeout: float = setting(10.0, float,
        "seconds a connection has to send its complete HTTP request head")
    max_sessions: int = setting(64, int,
        "live sessions, whole server (ended ones holding unread output count too)")
    max_sessions_per_connection: int = setting(16, int,
        "live sessions owned by one connection (counted the same way)")
    max_watchers: int = setting(16, int,
        "connections watching one session at once (PROTOCOL.md 11); beyond, -32003")
    max_message_bytes: int = setting(1024 * 1024, int,
        "largest client frame in bytes (bigger closes with 1009)")
    kill_grace: float = setting(5.0, float,
        "seconds between SIGTERM and SIGKILL on cancel (and the most any session gets at "
        "server shutdown)")
    max_kill_grace: float = setting(300.0, float,
        "largest kill_grace an execute may ask for (larger values are refused)")
    ws_ping_interval: float = setting(0.0, float, "seconds between server pings (0 = off)")
    tcp_keepalive: float = setting(60.0, float,
        "seconds a connection may be idle before TCP keepalive probes check the peer")
    tcp_user_timeout: float = setting(120.0, float,
        "seconds sent data (or a probe) may stay unacknowledged before the connection is "
        "dropped and its sessions released; a slow reader is never cut off")
    retention: float = setting(3600.0, float,
        "seconds an ended session (and output nobody received) is kept")
    max_linger: float = setting(86400.0, float,
        "largest linger an execute may ask for (larger values are clamped)")
    replay_bytes: int = setting(8 * 1024 * 1024, int,
        "per session: unsent output held before the child is throttled, and again recently "
        "sent output kept for replay")
    ended_replay_bytes: int = setting(256 * 1024 * 1024, int,
        "whole server: sent output kept for replay by ended sessions; beyond it the oldest "
        "ended sessions' replay goes first (their unsent output never)")
    max_held_bytes: int = setting(1024 * 1024 * 1024, int,
        "whole server: bytes of output held in memory by all sessions, live and ended, as "
        "kept (JSON-encoded); when full, sent replay output is forgotten (oldest first), then "
        "execute gets -32003 and sessions with unsent output are throttled")
    max_input_bytes: int = setting(8 * 1024 * 1024, int,
        "per connection: bytes of input frames read but not yet written to the child; beyond "
        "it the connection's input waits, as on a pipe")
    node_name: str | None = setting(None, _optional_str,
        "this node's name, a DNS label (e.g. the pod name): session ids become "
        "<node>.<incarnation>.<rest> (PROTOCOL.md 10)")
    peers: tuple[tuple[tuple[str, str], ...], tuple[str, int] | None] | None = setting(
        None, _peers,
        "the other nodes (PROTOCOL.md 10): name=ws://host:port/ws,... (may list this node), "
        "or dns:HOST:PORT (every address of HOST is a node, asked its name)")
    peer_url: str | None = setting(None, _peer_url,
        "a URL with {node} reaching a node CCX_PEERS does not map, e.g. "
        "ws://{node}.ccx-pods:8003/ws")
    drain_timeout: float = setting(0.0, float,
        "seconds SIGTERM lets sessions run on (draining: no new ones) before cancelling "
        "the rest and shutting down; 0 = cancel at once")
    mcp_buffer_bytes: int = setting(1024 * 1024, int,
        "MCP: unread output held per session and stream before the child is throttled")
    mcp_tail_bytes: int = setting(32 * 1024, int,
        "MCP: bytes of each stream the execute tool returns (the end; the rest is counted)")
    mcp_http_idle: float = setting(3600.0, float,
        "MCP over HTTP: seconds a session without requests or open streams is kept")
    mcp_sse_max: float = setting(0.0, float,
        "MCP over HTTP: seconds after which a response stream is closed for the client to "
        "resume with Last-Event-ID (for proxies with response timeouts); 0 = never")
    mcp_http_max_sessions: int = setting(256, int,
        "MCP over HTTP: sessions kept; beyond it the longest idle one is ended")
    track_interval: float = setting(0.5, float,
        "seconds between scans for descendants that left their session's group (0 = scan only "
        "when a session ends)")
    state_dir: str = setting(attrs.Factory(default_state_dir), str,
        "directory of the crash record (live process groups), so the next start kills what a "
        "SIGKILLed server left running; empty = off")
    spool_dir: str = setting("", str,
        "directory where sessions hold their output (unsent, and recently sent for replay) "
        "on disk; empty = <state_dir>/spool (the default state dir if that is off); 'memory' "
        "= hold it in RAM")
    log_level: str = setting("info", _log_level, "debug, info, warning, error")
    log_format: str = setting("json", _log_format, "json or console")

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
                     "tcp_keepalive", "tcp_user_timeout", "drain_timeout"):
            value = getattr(self, name)
            if math.isnan(value) or value < 0:
                raise ConfigError(f"CCX_{name.upper()}: must be a number, not negative")
        for name in ("kill_grace", "max_kill_grace", "drain_timeout"):  # a grace must end
            if math.isinf(getattr(self, name)):
                raise ConfigError(f"CCX_{name.upper()}: must be finite")
        if self.kill_grace > self.max_kill_grace:
            raise ConfigError(f"CCX_KILL_GRACE ({self.kill_grace:g}) is above "
                              f"CCX_MAX_KILL_GRACE ({self.max_kill_grace:g})")
        if self.node_name is not None and not NODE_NAME.fullmatch(self.node_name):
            raise ConfigError(f"CCX_NODE_NAME: {self.node_name!r} is not a DNS label (1-63 "
                              "characters of a-z, 0-9 and '-', starting and ending with a "
                              "letter or digit)")
        if (self.peers or self.peer_url) and self.node_name is None:
            raise ConfigError("CCX_PEERS and CCX_PEER_URL need CCX_NODE_NAME: ids must name "
                              "their node for requests to be forwarded")
        if self.head_timeout <= 0:
            raise ConfigError("CCX_HEAD_TIMEOUT: must be positive")
        if self.token_file is not None:
            if self.token is not None:
                raise ConfigError("CCX_TOKEN and CCX_TOKEN_FILE are both set; use one")
            object.__setattr__(self, "token", read_token_file(self.token_file))
        if self.allowed_commands is not None and not self.allowed_commands:
            raise ConfigError("CCX_ALLOWED_COMMANDS: set but empty; unset it to allow any")

    @property
    def spool_base(self) -> str | None:
        """Where held output is spooled (`ccx.spool`), or None to hold it in memory."""
        if self.spool_dir == "memory":
            return None
        return self.spool_dir or os.path.join(self.state_dir or default_state_dir(), "spool")

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


def _option(field: attrs.Attribute[Any]) -> Option:
    default = field.default
    factory = getattr(default, "factory", None)  # attrs.Factory: the value it makes now
    return Option(field.name, f"CCX_{field.name.upper()}", field.metadata["parse"],
                  factory() if callable(factory) else default, field.metadata["help"])


# Every setting, in field order: what `from_env` reads and what the CLI offers as flags.
OPTIONS: tuple[Option, ...] = tuple(_option(field) for field in attrs.fields(Settings))


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
