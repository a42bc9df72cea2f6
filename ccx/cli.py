"""The `ccx` command: serve, mcp, run, attach, ps, pause, resume, cancel, status, drain, health,
selftest.

Inputs: argv, `CCX_*` environment (server settings; `CCX_URL`/`CCX_TOKEN` for client commands).
Outputs: a running server (`ccx serve`), or a client action with a meaningful exit code:
`ccx run` exits with the remote exit code (128+N for a signal, 124 timeout, 130 after Ctrl-C,
141 when the local stdout pipe closed); a session cancelled from elsewhere (`ccx cancel`, a
drain, a shutdown) gets one status line on stderr and exits 128+N of the signal that ended it
(143, `EXIT_CANCELLED`, when it exited by itself after the cancel); `ccx drain --wait` exits 0
once the node has no live session, 1 at its deadline or once someone undid the drain (a
Kubernetes preStop hook: PROTOCOL.md 10, docs/deploy.md).
Size (over 400 lines): one module per entry point is the rule (`ccx` and its subcommands:
serve, run, attach, pause/resume/cancel, status, ps, drain, health, selftest, mcp), each a
short function over `ccx.client`; splitting them would only scatter the argument parser.
Docs: https://docs.python.org/3/library/argparse.html
      https://trio.readthedocs.io/en/stable/reference-io.html#signals
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import trio

from ccx import __version__
from ccx.config import OPTIONS, ConfigError, Settings
from ccx.log import configure, get_logger

DEFAULT_URL = "ws://127.0.0.1:8003/ws"
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
EXIT_CANCELLED = 128 + signal.SIGTERM  # cancelled elsewhere, and it exited by itself
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE: no server to talk to
HEALTH_TIMEOUT_S = 3.0  # < the HEALTHCHECK/compose timeout (5 s): see deploy/Dockerfile
READ_BYTES = 64 * 1024


TOKEN_IN_ARGV_HINT = ("--token puts the token in the server's command line, which every "
                      "local user can read (/proc/PID/cmdline, ps); use CCX_TOKEN_FILE "
                      "(or CCX_TOKEN) instead")


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("CCX_URL", DEFAULT_URL),
                        help=f"server URL (env CCX_URL, default {DEFAULT_URL})")
    parser.add_argument("--token", default=os.environ.get("CCX_TOKEN"),
                        help="server token (env CCX_TOKEN)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccx", description=(
        "Run long-lived commands behind a WebSocket JSON-RPC 2.0 API."))
    parser.add_argument("--version", action="version", version=f"ccx {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server",
                                description="Run the ccx server. Every flag mirrors a CCX_* "
                                "environment variable; a flag wins over its variable.")
    _add_setting_flags(serve)

    run = commands.add_parser("run", help="run a command remotely, streaming its output",
                              description="Run CMD on the server. stdout/stderr arrive byte-"
                              "exact; local stdin is forwarded when it is not a terminal.")
    _add_client_options(run)
    run.add_argument("--cwd", help="working directory on the server")
    run.add_argument("--env", action="append", default=[], metavar="K=V",
                     help="extra environment variable (repeatable)")
    run.add_argument("--timeout", type=float, help="seconds before the server cancels it")
    run.add_argument("--kill-grace", type=float, help="seconds between SIGTERM and SIGKILL")
    run.add_argument("--shell", action="store_true", help="run CMD with /bin/sh -c")
    run.add_argument("--linger", type=float, default=0.0, metavar="S",
                     help="keep the session running S seconds after a lost connection; "
                     "ccx re-dials and resumes the stream without a gap")
    run.add_argument("--tag", help="label the session (ccx ps --tag)")
    run.add_argument("-t", "--tty", action="store_true",
                     help="run CMD on a pseudo-terminal of this terminal's size: keystrokes "
                     "(Ctrl-C too) and window size changes go to it, output comes back raw")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")

    attach = commands.add_parser("attach", help="re-join a running or ended session",
                                 description="Stream a session's held and new output, as "
                                 "`ccx run` does, and exit with its exit code. Ctrl-C leaves a "
                                 "lingering session running (and cancels one without linger). "
                                 "A PTY session takes this terminal over as `ccx run --tty` "
                                 "does (raw mode, resized to it); Ctrl-C is then typed to it.")
    _add_client_options(attach)
    attach.add_argument("session_id")
    attach.add_argument("--since-seq", type=int, default=-1, metavar="N",
                        help="replay only output after seq N (default: all still held)")

    for name, help_text in (("pause", "SIGSTOP a session's group"),
                            ("resume", "SIGCONT a session's group"),
                            ("cancel", "cancel a session (TERM, grace, KILL)")):
        sub = commands.add_parser(name, help=help_text)
        _add_client_options(sub)
        sub.add_argument("session_id")

    status = commands.add_parser("status", help="show one session")
    _add_client_options(status)
    status.add_argument("session_id")
    status.add_argument("--json", action="store_true")

    ps = commands.add_parser("ps", help="list sessions")
    _add_client_options(ps)
    ps.add_argument("--json", action="store_true", help="machine-readable output")
    ps.add_argument("--tag", help="only sessions with this tag")
    ps.add_argument("--all", action="store_true",
                    help="every node's sessions (PROTOCOL.md 10, scope cluster), and which "
                    "nodes did not answer")

    drain = commands.add_parser(
        "drain", help="stop the node taking new sessions (PROTOCOL.md 10)",
        description="Make the node refuse execute (-32007) while the rest keeps working. "
        "--timeout T: the node cancels the sessions still live after T s. --wait: return "
        "once no session is live (exit 0), or exit 1 after T + the node's kill grace "
        "(CCX_KILL_GRACE) + 2 s (no deadline without --timeout) or when the drain is undone "
        "meanwhile. --undo: take new sessions again.")
    _add_client_options(drain)
    drain.add_argument("--timeout", type=float, metavar="T",
                       help="seconds before the node cancels what is still running")
    drain.add_argument("--wait", action="store_true",
                       help="wait until the node has no live session")
    drain.add_argument("--undo", action="store_true", help="end the drain")

    health = commands.add_parser("health", help="exit 0 when the server's /health is ok")
    _add_client_options(health)
    health.add_argument("--timeout", type=float, default=HEALTH_TIMEOUT_S,
                        help=f"seconds to wait for the answer (default {HEALTH_TIMEOUT_S:g}; "
                        "below the image's HEALTHCHECK timeout of 5 s, so a hung server is "
                        "reported by this command, not killed by the runtime)")

    commands.add_parser("selftest", help="boot a private server and check it for real")

    mcp = commands.add_parser("mcp", help="serve MCP on stdin/stdout (for Claude Code & co.)",
                              description="Be a local MCP server on stdio: protocol messages "
                              "on stdout, logs on stderr. Sessions die when stdin closes. "
                              "Settings come from the same CCX_* variables as ccx serve.")
    _add_setting_flags(mcp)
    return parser


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; each mirrors a CCX_* variable and wins over it."""
    for option in OPTIONS:
        flag = "--" + option.name.replace("_", "-")
        help_text = f"{option.help} (env {option.env}, default {option.default!r})"
        if option.parse.__name__ == "_bool":
            parser.add_argument(flag, dest=option.name, action="store_const", const="1",
                                default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=option.name, default=None, metavar=option.env,
                                help=help_text)


# ----------------------------------------------------------------------------------- serve


def _settings(args: argparse.Namespace) -> Settings:
    env = dict(os.environ)
    for option in OPTIONS:  # flags become the env values they mirror, then parse as env
        value = getattr(args, option.name)
        if value is not None:
            env[option.env] = value
    return Settings.from_env(env)


def cmd_serve(args: argparse.Namespace) -> int:
    from ccx.server import serve

    try:
        settings = _settings(args)
        settings.check_exposure()
    except ConfigError as exc:
        print(f"ccx serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure(settings.log_level, settings.log_format)
    if args.token is not None:  # a log line, so stderr stays one JSON event per line
        get_logger("ccx.cli").warning("token_in_argv", hint=TOKEN_IN_ARGV_HINT)
    try:
        trio.run(serve, settings)
    except (OSError, BaseExceptionGroup) as exc:  # e.g. address in use (inside a nursery)
        error = _first_os_error(exc)
        if error is None:
            raise
        print(f"ccx serve: cannot listen on {settings.host}:{settings.port}: {error}",
              file=sys.stderr)
        return 1
    return 0


def _first_os_error(exc: BaseException) -> OSError | None:
    """*exc* if it is an OSError, else the only leaf of an exception group that is one."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _first_os_error(exc.exceptions[0])
    return None


# ----------------------------------------------------------------------------------- run


def _exit_code(completed: Any, interrupted: bool) -> int:
    if completed.status == "timeout":
        return EXIT_TIMEOUT
    if interrupted:
        return EXIT_INTERRUPTED
    if completed.exit_code is not None and completed.status != "cancelled":
        return int(completed.exit_code)  # a cancelled job's own exit code (0 too) is not it
    if completed.signal:
        try:
            return 128 + int(signal.Signals[completed.signal])
        except KeyError:
            pass
    return EXIT_CANCELLED


def _cancelled_line(completed: Any) -> str:
    """The status line of a session cancelled from elsewhere (`ccx cancel`, drain, shutdown)."""
    reason = f" (reason: {completed.reason})" if completed.reason else ""
    if completed.signal:
        ending = f"ended by {completed.signal}"
    elif completed.exit_code is not None:
        ending = f"exited with {completed.exit_code}"
    else:
        ending = "ended"
    return f"ccx: session {completed.session_id} was cancelled{reason}; it {ending}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def _stream(session: Any, *, forward_stdin: bool, detach_on_interrupt: bool,
                  terminal: tuple[int, int] | None = None) -> int:
    """Copy *session*'s output to fds 1/2 until it completes; return the exit code.

    Ctrl-C cancels the remote session (a second one leaves at once), or, with
    *detach_on_interrupt*, just leaves it running for a later `ccx attach`. With *terminal*
    (the remote PTY's size) the local terminal is in raw mode, so Ctrl-C is a keystroke for
    the remote program; keystrokes and window changes are forwarded.
    """
    from ccx.client import Completed, ConnectionLost, Detached, Output, ServerError
    from ccx.local_tty import forward_keystrokes, forward_window_changes, raw_mode

    interrupted = False

    async def forward_stdin_task() -> None:
        try:
            while True:
                data = await trio.to_thread.run_sync(os.read, 0, READ_BYTES,
                                                     abandon_on_cancel=True)
                await session.send(data, eof=not data)
                if not data:
                    return
        except (ServerError, ConnectionLost, OSError):
            # The child closed its stdin or ended, or the connection closed (a shutdown that
            # cut an `input` call short): nothing more to forward. The session's completion
            # (or the output loop's own ConnectionLost) decides the exit code.
            return

    async def watch_interrupts(cancel_scope: trio.CancelScope) -> None:
        nonlocal interrupted
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if interrupted or detach_on_interrupt:  # leave now
                    interrupted = True
                    cancel_scope.cancel()
                    return
                interrupted = True
                await session.cancel()

    async def forward_terminal_task(size: tuple[int, int]) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(forward_keystrokes, session)
                nursery.start_soon(forward_window_changes, session, size)
        except* (ServerError, ConnectionLost, OSError):
            pass  # the session or its connection ended: nothing more to forward

    result = None
    with raw_mode(0) if terminal is not None else contextlib.nullcontext(), \
            trio.CancelScope() as outer:
        async with trio.open_nursery() as nursery:
            if terminal is not None:
                nursery.start_soon(forward_terminal_task, terminal)
            elif forward_stdin:
                nursery.start_soon(forward_stdin_task)
            nursery.start_soon(watch_interrupts, outer)
            try:
                async for event in session.events():
                    if isinstance(event, Output):
                        fd = 2 if event.stream == "stderr" else 1
                        await trio.to_thread.run_sync(_write_all, fd, event.data)
                    elif isinstance(event, Completed):
                        result = event
                    elif isinstance(event, Detached):
                        print(f"ccx: {event}", file=sys.stderr)
                        return 1
            except BrokenPipeError:  # `| head -1` closed our stdout: stop the job
                with trio.move_on_after(5):
                    await session.cancel()
                return EXIT_BROKEN_PIPE
            finally:
                nursery.cancel_scope.cancel()
    if result is None:
        if detach_on_interrupt:
            print(f"ccx: left session {session.id} running; rejoin with: "
                  f"ccx attach {session.id}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.status == "cancelled" and not interrupted:
        print(_cancelled_line(result), file=sys.stderr)
    return _exit_code(result, interrupted)


async def _run(args: argparse.Namespace) -> int:
    from ccx.client import ServerError, connect

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("ccx run: no command given (ccx run -- CMD ARGS)", file=sys.stderr)
        return EXIT_USAGE
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"ccx run: --env wants K=V, got {item!r}", file=sys.stderr)
            return EXIT_USAGE
        env[key] = value
    forward_stdin = not os.isatty(0) and not args.tty
    size = None
    if args.tty:
        from ccx.local_tty import window_size

        size = window_size()
        if "TERM" in os.environ:  # the remote terminal is ours: programs must know its kind
            env.setdefault("TERM", os.environ["TERM"])
    async with connect(args.url, args.token) as client:
        try:
            session = await client.execute(
                " ".join(argv) if args.shell else argv, shell=args.shell, cwd=args.cwd,
                env=env or None, timeout=args.timeout, kill_grace=args.kill_grace,
                stdin=forward_stdin, encoding="base64", linger=args.linger, tag=args.tag,
                pty=size)
        except ServerError as exc:
            print(f"ccx run: {exc.message}", file=sys.stderr)
            return EXIT_USAGE if exc.code == -32602 else 1
        if args.linger > 0 and os.isatty(2):
            print(f"ccx: session {session.id} survives a lost connection for {args.linger:g}s;"
                  f" rejoin with: ccx attach {session.id}", file=sys.stderr)
        return await _stream(session, forward_stdin=forward_stdin, detach_on_interrupt=False,
                             terminal=size)


async def _attach(args: argparse.Namespace) -> int:
    from ccx.client import ServerError, connect

    async with connect(args.url, args.token) as client:
        try:
            info = await client.status(args.session_id)
            session = await client.attach(args.session_id, since_seq=args.since_seq,
                                          linger=float(info.get("linger") or 0.0))
        except ServerError as exc:
            print(f"ccx attach: {exc.message}", file=sys.stderr)
            return 1
        terminal = None
        if info.get("pty") and os.isatty(0) and info.get("status") in ("running", "paused"):
            from ccx.local_tty import window_size

            size = window_size()  # a PTY session takes this terminal over
            try:
                await session.resize(*size)
                terminal = size
            except ServerError:
                pass  # it ended meanwhile: its held output and completion still come
        # Leaving a session without linger would cancel it anyway: then Ctrl-C cancels. On
        # a PTY, Ctrl-C is the remote program's; SIGTERM from elsewhere leaves.
        return await _stream(session, forward_stdin=False,
                             detach_on_interrupt=session.linger > 0, terminal=terminal)


def cmd_run(args: argparse.Namespace) -> int:
    from ccx.client import ConnectionLost

    try:
        return trio.run(_run if args.command == "run" else _attach, args)
    except (OSError, ConnectionLost) as exc:
        print(f"ccx {args.command}: cannot reach {args.url}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except Exception as exc:  # trio-websocket handshake errors (401, 403...)
        print(f"ccx {args.command}: {_describe(exc)}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def _describe(exc: BaseException) -> str:
    """An error for a person: an exception group says what is inside it."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in exc.exceptions)
    return f"{exc}" if str(exc) else type(exc).__name__


# ----------------------------------------------------------------------------------- queries


def _ps(args: argparse.Namespace, params: dict[str, Any]) -> tuple[str | None, Any]:
    """The server's node name (None without CCX_NODE_NAME) and its sessions (with --all the
    whole result of scope cluster: sessions and unreachable), one connection."""
    from ccx.client import connect

    async def go() -> tuple[str | None, Any]:
        async with connect(args.url, args.token) as client:
            info = await client.call("server.info", {})
            result = await client.call("sessions", params)
            return info.get("node"), result if args.all else result["sessions"]

    return trio.run(go)


def _client_call(args: argparse.Namespace, method: str, params: dict[str, Any]) -> Any:
    from ccx.client import connect

    async def go() -> Any:
        async with connect(args.url, args.token) as client:
            return await client.call(method, params)

    return trio.run(go)


DRAIN_POLL_S = 0.5  # how often `ccx drain --wait` asks for the live count
DRAIN_WAIT_MARGIN_S = 2.0  # after T + kill grace, the cancelled sessions' completions


def cmd_drain(args: argparse.Namespace) -> int:
    from ccx.client import ConnectionLost, ServerError, connect

    if args.undo and (args.wait or args.timeout is not None):
        print("ccx drain: --undo takes no --wait or --timeout", file=sys.stderr)
        return EXIT_USAGE
    if args.timeout is not None and not args.timeout >= 0:
        print("ccx drain: --timeout must not be negative", file=sys.stderr)
        return EXIT_USAGE

    async def go() -> int:
        async with connect(args.url, args.token) as client:
            params: dict[str, Any] = {"undo": True} if args.undo else {}
            if args.timeout is not None:
                params["timeout"] = args.timeout
            result = await client.call("drain", params)
            print(json.dumps(result), flush=True)
            if not args.wait:
                return 0
            deadline = float("inf")
            if args.timeout is not None:
                # The node's own CCX_KILL_GRACE (server.info), the grace its drain timeout
                # gives sessions that did not ask for another (docs/protocol-notes.md).
                info = await client.call("server.info", {})
                deadline = (trio.current_time() + args.timeout
                            + float(info["limits"]["kill_grace"]) + DRAIN_WAIT_MARGIN_S)
            with trio.move_on_at(deadline):
                busy = result["sessions"]
                while busy:
                    await trio.sleep(DRAIN_POLL_S)
                    # Read-only (server.info), so a drain someone undid is not started again.
                    info = await client.call("server.info", {})
                    if not info["draining"]:
                        print("ccx drain: the node is no longer draining (the drain was "
                              "undone); stopped waiting", file=sys.stderr)
                        return 1
                    busy = info["busy"]
                print(json.dumps({"draining": True, "sessions": busy}), flush=True)
                return 0
            print(f"ccx drain: {busy} sessions still live at the deadline",
                  file=sys.stderr)
            return 1

    try:
        return trio.run(go)
    except ServerError as exc:
        print(f"ccx drain: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ConnectionLost) as exc:
        print(f"ccx drain: cannot reach {args.url}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def _age(started_at: str) -> str:
    seconds = max(0, int(time.time() - datetime.fromisoformat(started_at).timestamp()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _bytes(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n}{unit}"
        n //= 1024
    return f"{n}T"


def cmd_query(args: argparse.Namespace) -> int:
    from ccx.client import ConnectionLost, ServerError

    try:
        if args.command == "ps":
            params: dict[str, Any] = {"tag": args.tag} if args.tag is not None else {}
            if args.all:
                params["scope"] = "cluster"
            node, result = _ps(args, params)
            if args.json:
                print(json.dumps(result, indent=2))
                return 0
            sessions = result["sessions"] if args.all else result
            nodes = [s.get("node") or node or "" for s in sessions] if args.all \
                else [node or "" for _ in sessions]
            node_width = max([len(n) for n in [node or "", *nodes]])
            width = max([32, *(len(s["session_id"]) for s in sessions)])
            node_head = f"{'NODE':{max(node_width, 4)}}  " if node_width else ""
            print(f"{node_head}{'ID':{width}}  {'STATUS':10} {'PID':>7} {'AGE':>5} {'OUT':>6}"
                  "  COMMAND")
            for s, on in zip(sessions, nodes, strict=True):
                out = _bytes(s["stdout_bytes"] + s["stderr_bytes"])
                node_cell = f"{on:{max(node_width, 4)}}  " if node_width else ""
                print(f"{node_cell}{s['session_id']:{width}}  {s['status']:10} {s['pid']:>7} "
                      f"{_age(s['started_at']):>5} {out:>6}  {' '.join(s['command'])}")
            for down in result.get("unreachable", []) if args.all else []:
                print(f"{down}: unreachable (its sessions are not listed)")
        elif args.command == "status":
            info = _client_call(args, "status", {"session_id": args.session_id})
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                for key, value in info.items():
                    print(f"{key:13} {value}")
        else:
            result = _client_call(args, "control", {"session_id": args.session_id,
                                                    "type": args.command.upper()})
            print(result["status"])
    except ServerError as exc:
        print(f"ccx {args.command}: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ConnectionLost) as exc:
        print(f"ccx {args.command}: cannot reach {args.url}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return 0


def health_url(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    secure = parts.scheme in ("wss", "https")
    return parts.hostname or "127.0.0.1", parts.port or (443 if secure else 80), secure


def cmd_health(args: argparse.Namespace) -> int:
    host, port, secure = health_url(args.url)
    connection_class = http.client.HTTPSConnection if secure else http.client.HTTPConnection
    try:
        connection = connection_class(host, port, timeout=args.timeout)
        connection.request("GET", "/health")
        reply = connection.getresponse()
        body = json.loads(reply.read() or b"{}")
    except (OSError, ValueError) as exc:
        print(f"ccx health: {host}:{port}: {exc}", file=sys.stderr)
        return 1
    ok = reply.status == 200 and body.get("status") == "ok"
    print(json.dumps(body))
    return 0 if ok else 1


def cmd_mcp(args: argparse.Namespace) -> int:
    """MCP on stdio. Nothing but protocol messages may reach stdout: logs go to stderr."""
    from ccx.transport.stdio import serve_stdio

    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"ccx mcp: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure(settings.log_level, settings.log_format)
    trio.run(serve_stdio, settings)
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from ccx.selftest import main as selftest

    return selftest()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"serve": cmd_serve, "run": cmd_run, "attach": cmd_run, "health": cmd_health,
                "selftest": cmd_selftest, "mcp": cmd_mcp, "drain": cmd_drain}
    return handlers.get(args.command, cmd_query)(args)


if __name__ == "__main__":
    sys.exit(main())
