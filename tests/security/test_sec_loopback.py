"""`--host localhost` trusted by its spelling (security finding 2): with /etc/hosts mapping
`localhost` elsewhere the server listened beyond loopback without a token. A host counts as
loopback only if every address it resolves to is loopback (PROTOCOL.md 6); `[::1]` binds,
and a name that does not resolve is a clean start-up error, not a traceback.

Rules: /etc/hosts is replaced only inside a private mount namespace (`unshare --mount` and a
bind mount; root needed, else skipped), never for the machine; the addresses mapped there are
TEST-NET (192.0.2.0/24), which no interface has, so nothing ever listens beyond loopback even
if the check were missing; real `ccx serve` processes, each with a deadline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from sechelp import ccx_serve

from ccx.config import ConfigError, Settings, resolve_loopback

CCX = str(Path(sys.executable).parent / "ccx")


def _serve_with_hosts(tmp_path: Path, hosts: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`ccx serve ARGS` in a mount namespace whose /etc/hosts is *hosts*; it must exit."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private /etc/hosts")
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text(hosts)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCX_")}
    env["CCX_STATE_DIR"] = str(tmp_path / "state")
    script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
    return subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", str(hosts_file),
                           CCX, "serve", "--port", "0", *args],
                          env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("hosts", [
    "192.0.2.1 localhost\n",  # before the fix: accepted, then tried to listen there
    "127.0.0.1 localhost\n192.0.2.1 localhost\n",  # one non-loopback address is enough
])
def test_localhost_that_resolves_elsewhere_needs_a_token(tmp_path: Path, hosts: str) -> None:
    result = _serve_with_hosts(tmp_path, hosts, "--host", "localhost")
    assert result.returncode == 2, result
    assert "refusing to bind localhost without CCX_TOKEN" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_unresolvable_host_is_a_clean_error(tmp_path: Path) -> None:
    result = _serve_with_hosts(tmp_path, "127.0.0.1 localhost\n", "--host", "ip6-localhost")
    assert result.returncode == 2, result  # before the fix: an ExceptionGroup traceback
    assert "cannot resolve" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_resolver_check() -> None:
    assert resolve_loopback("127.0.0.1") and resolve_loopback("::1")
    assert resolve_loopback("[::1]") and resolve_loopback("localhost")
    assert not resolve_loopback("0.0.0.0") and not resolve_loopback("192.0.2.1")
    with pytest.raises(ConfigError, match="cannot resolve"):
        Settings(host="no-such-host.invalid").check_exposure()


async def test_bracketed_ipv6_loopback_binds(tmp_path: Path) -> None:
    with ccx_serve(tmp_path, {"CCX_HOST": "[::1]"}) as served:
        with trio.fail_after(10):  # before the fix: the server exited with a traceback
            stream = await trio.open_tcp_stream("::1", served.port)
            async with stream:
                await stream.send_all(f"GET /health HTTP/1.1\r\nHost: [::1]:{served.port}\r\n"
                                      "Connection: close\r\n\r\n".encode())
                data = b""
                while b"\r\n" not in data:
                    chunk = await stream.receive_some(4096)
                    assert chunk, data
                    data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK"), data


def test_port_in_use_is_a_clean_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CCX_")}
        env["CCX_STATE_DIR"] = str(tmp_path / "state")
        result = subprocess.run([CCX, "serve", "--port", str(port)], env=env,
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result
    assert "cannot listen on 127.0.0.1" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
