"""Start a child on a new pseudo-terminal: the PTY half of `ccx.process.spawn`.

Inputs: argv, the resolved executable, cwd, env, and the window size (cols, rows).
Outputs: the running `trio.Process` (leader of a new session, pgid == sid == pid, with the
slave as stdin, stdout, stderr and controlling terminal) and its `Terminal`: the master fd as
a non-blocking `FdStream`, the window size (`resize` sends SIGWINCH through the kernel) and
the terminal's EOF character. The slave is closed here once the child holds it, so EOF on the
master means every holder of the slave is gone.
Docs: https://trio.readthedocs.io/en/stable/reference-lowlevel.html#trio.lowlevel.FdStream
      https://man7.org/linux/man-pages/man2/TIOCSCTTY.2const.html
      https://man7.org/linux/man-pages/man4/tty_ioctl.4.html
      https://man7.org/linux/man-pages/man3/openpty.3.html
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
import termios
from collections.abc import Mapping, Sequence

import attrs
import trio

DEFAULT_EOF_CHAR = b"\x04"  # ^D, when the terminal's VEOF cannot be read


@attrs.define(eq=False)
class Terminal:
    """The parent's side of a PTY: the master fd as a trio stream, and the window size."""

    master: trio.lowlevel.FdStream
    cols: int
    rows: int

    def resize(self, cols: int, rows: int) -> None:
        """Set the window size; the kernel sends SIGWINCH to the terminal's foreground group
        when the size changes. Raises OSError once the master is closed."""
        set_window_size(self.master.fileno(), cols, rows)
        self.cols, self.rows = cols, rows

    def eof_char(self) -> bytes:
        """The terminal's EOF character (VEOF, ^D unless the child changed it)."""
        try:
            value = termios.tcgetattr(self.master.fileno())[6][termios.VEOF]
        except (OSError, termios.error):
            return DEFAULT_EOF_CHAR
        if isinstance(value, int):
            return bytes([value])
        return bytes(value) or DEFAULT_EOF_CHAR


def set_window_size(fd: int, cols: int, rows: int) -> None:
    """TIOCSWINSZ on a terminal fd (either side of a PTY)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_controlling_terminal() -> None:
    """In the child, after setsid and before exec: its stdin (the slave) becomes its
    controlling terminal, so ^C, job control and SIGWINCH reach it as on a real terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


async def spawn_on_terminal(
    argv: Sequence[str], *, executable: str, cwd: str | None, env: Mapping[str, str],
    size: tuple[int, int],
) -> tuple[trio.Process, Terminal]:
    """openpty, size it, start the child on the slave (stdin, stdout, stderr and controlling
    terminal) in a new session, close the slave here and keep the master as a non-blocking
    `FdStream`.

    The terminal starts as the kernel makes it: cooked mode, echo, ^C/^D/^Z active.
    Raises OSError when exec fails, or ENOTTY when the child cannot take the terminal.
    **Cancellation**: as `trio.lowlevel.open_process`; both fds are closed if it is cancelled.
    """
    master, slave = os.openpty()  # both O_CLOEXEC: no other child inherits them
    try:
        set_window_size(slave, *size)
        try:
            process = await trio.lowlevel.open_process(
                list(argv), executable=executable, cwd=cwd, env=dict(env),
                stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                preexec_fn=_take_controlling_terminal,
            )
        except subprocess.SubprocessError as exc:  # TIOCSCTTY failed in the child
            raise OSError(errno.ENOTTY, f"cannot attach the terminal: {exc}") from None
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)  # the child holds it now; an open slave here would hide EOF
    return process, Terminal(trio.lowlevel.FdStream(master), cols=size[0], rows=size[1])


async def _self_check() -> None:
    process, terminal = await spawn_on_terminal(
        ["sh", "-c", "stty size; read line; echo got $line"], executable="/bin/sh",
        cwd=None, env=os.environ, size=(100, 30))
    output = b""
    while b"30 100" not in output:
        output += await terminal.master.receive_some(1024)
    assert terminal.eof_char() == DEFAULT_EOF_CHAR
    terminal.resize(120, 40)
    assert (terminal.cols, terminal.rows) == (120, 40)
    await terminal.master.send_all(b"hello\n")
    while b"got hello" not in output:
        output += await terminal.master.receive_some(1024)
    assert await process.wait() == 0
    await terminal.master.aclose()
    print("ccx.pty: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
