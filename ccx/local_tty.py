"""The local terminal of `ccx run --tty`: raw mode, window size, keystrokes and SIGWINCH.

Inputs: the process's own fds 0 and 1 and a remote PTY session (anything with `send()` and
`resize()`, i.e. `ccx.client.RemoteSession`).
Outputs: `raw_mode()` (the terminal is restored on every way out, exceptions included),
`window_size()`, and two tasks that forward keystrokes as `input` and window changes as
`resize` until cancelled.
Raw mode turns off the local line discipline entirely (no echo, no ^C signal, no output
processing): the remote terminal does all of it, so ^C reaches the remote foreground program.
Docs: https://docs.python.org/3/library/tty.html
      https://docs.python.org/3/library/termios.html
      https://trio.readthedocs.io/en/stable/reference-io.html#trio.open_signal_receiver
"""

from __future__ import annotations

import contextlib
import os
import signal
import termios
import tty
from collections.abc import Iterator
from typing import Any, Protocol

import trio

DEFAULT_SIZE = (80, 24)  # (cols, rows) when neither stdin nor stdout is a terminal
READ_BYTES = 64 * 1024


class RemoteTerminal(Protocol):
    async def send(self, data: bytes | str, *, eof: bool = False) -> int: ...

    async def resize(self, cols: int, rows: int) -> dict[str, Any]: ...


def local_tty() -> int | None:
    """The fd whose window size we mirror: stdin if it is a terminal, else stdout, else None."""
    for fd in (0, 1):
        if os.isatty(fd):
            return fd
    return None


def window_size() -> tuple[int, int]:
    """(cols, rows) of the local terminal, or `DEFAULT_SIZE`."""
    fd = local_tty()
    if fd is None:
        return DEFAULT_SIZE
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return DEFAULT_SIZE
    return (size.columns or DEFAULT_SIZE[0], size.lines or DEFAULT_SIZE[1])


@contextlib.contextmanager
def raw_mode(fd: int = 0) -> Iterator[None]:
    """Put terminal *fd* in raw mode for the block; restore its exact settings afterwards,
    however the block ends. Does nothing when *fd* is not a terminal."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        # TCSADRAIN: let what we already wrote reach the screen with the raw settings.
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def forward_keystrokes(session: RemoteTerminal) -> None:
    """Send what arrives on stdin as keystrokes until stdin ends (then ^D once).

    A terminal is read when the kernel says it is readable, so no thread is left blocked in
    read(2) (and no keystroke swallowed) after we return; anything else (a pipe, a file) is
    read in a worker thread.
    **Cancellation**: safe at any point.
    """
    is_tty = os.isatty(0)
    while True:
        if is_tty:
            await trio.lowlevel.wait_readable(0)
            data = os.read(0, READ_BYTES)
        else:
            data = await trio.to_thread.run_sync(os.read, 0, READ_BYTES, abandon_on_cancel=True)
        if not data:
            await session.send(b"", eof=True)
            return
        await session.send(data)


async def forward_window_changes(session: RemoteTerminal, sent: tuple[int, int]) -> None:
    """Resize the remote terminal whenever ours changes (SIGWINCH); *sent* is the size the
    remote terminal has now (a change before the signal handler was in place still counts).

    **Cancellation**: safe at any point.
    """
    with trio.open_signal_receiver(signal.SIGWINCH) as changes:
        last = sent
        while True:
            size = window_size()
            if size != last:
                await session.resize(*size)
                last = size
            await changes.__anext__()


def _self_check() -> None:
    """raw_mode on a real PTY: no echo, no line discipline inside, every setting back after."""
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        with raw_mode(slave):
            inside = termios.tcgetattr(slave)
            assert not inside[3] & (termios.ICANON | termios.ECHO | termios.ISIG), inside[3]
        assert termios.tcgetattr(slave) == before, "terminal not restored"
        null = os.open(os.devnull, os.O_RDONLY)
        with raw_mode(null):  # not a terminal: nothing to do
            pass
        os.close(null)
    finally:
        os.close(master)
        os.close(slave)
    cols, rows = window_size()
    assert cols > 0 and rows > 0
    print("ccx.local_tty: PASS")


if __name__ == "__main__":
    _self_check()
