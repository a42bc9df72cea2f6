"""A real `ccx serve` in a subprocess, for the attacks in tests/security.

Rules: it binds 127.0.0.1 on a port the OS picks; its log (JSON lines on stderr) goes to a
file the test reads; it is stopped (SIGTERM, then SIGKILL of its group) when the block ends;
an optional RLIMIT_NOFILE is set in the child before exec (an int: soft and hard, so the
server cannot raise it, as `ulimit -n` would; or a (soft, hard) pair).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

CCX = [str(Path(sys.executable).parent / "ccx")]


@attrs.define
class Served:
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0

    def log(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                events.append({"event": "<raw>", "line": line})
        return events

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def ccx_serve(tmp_path: Path, env: dict[str, str] | None = None, *,
              nofile: int | tuple[int, int] | None = None,
              args: tuple[str, ...] = (), start_timeout: float = 20) -> Iterator[Served]:
    """Run `ccx serve --port 0` until the block ends; yield it once it logged `listening`."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CCX_")}
    full_env.update({"CCX_HOST": "127.0.0.1", "CCX_PORT": "0", "CCX_KILL_GRACE": "1",
                     "CCX_STATE_DIR": str(tmp_path / "state"), **(env or {})})
    log_path = tmp_path / "serve.log"

    def limit() -> None:
        if nofile is not None:  # an int sets both limits, (soft, hard) each
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (nofile, nofile) if isinstance(nofile, int) else nofile)

    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([*CCX, "serve", *args], env=full_env, stdin=subprocess.DEVNULL,
                                   stdout=log_file, stderr=log_file, preexec_fn=limit,
                                   start_new_session=True)
    served = Served(process, log_path)
    try:
        deadline = time.monotonic() + start_timeout
        while not served.port:
            if process.poll() is not None:
                raise AssertionError(f"ccx serve exited {process.returncode}: "
                                     f"{served.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"ccx serve did not listen: {served.log_text()}")
            for event in served.log():
                if event.get("event") == "listening":
                    served.port = int(event["port"])
            time.sleep(0.02)
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
