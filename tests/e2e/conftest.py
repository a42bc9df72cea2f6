"""Fixtures for the end-to-end tests with the real Claude Code CLI (tests/e2e).

Rules: as everywhere in tests/ (127.0.0.1, port 0, real processes and signals, a deadline on
every test, no process group left behind); in addition the only fake is the peer Claude Code
talks to, the Anthropic Messages API (`mock_anthropic`). Claude Code runs offline: a private
HOME and TMPDIR per test, the mock as ANTHROPIC_BASE_URL, no non-essential traffic, no
auto-update, no retries.

The CLI is installed by `.ci/claude-code` into a cache kept between runs; when PyPI or npm
cannot be reached, every test here is skipped with one line saying so.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_cli import ServeProcess, start_serve, stop_serve

from .mock_anthropic import MockAnthropic, serve_mock

INSTALLER = Path(__file__).resolve().parents[2] / ".ci" / "claude-code"
EX_TEMPFAIL = 75  # the installer's "registry unreachable"
# Claude Code asks once before using a key from the environment; the answer it keeps is the
# key's last 20 characters (`customApiKeyResponses` in ~/.claude.json).
API_KEY = "sk-ant-e2e-mock-key-0123456789"


_installed: list[str] = []  # the installer's answer, asked once per test run


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Install Claude Code (or find it installed) before the first test here; if PyPI or npm
    cannot be reached, skip every test here with one line (skips raised in a fixture would be
    reported once per test)."""
    if not _installed:
        done = subprocess.run(["bash", str(INSTALLER)], capture_output=True, text=True,
                              timeout=900)
        if done.returncode == EX_TEMPFAIL:
            first = done.stderr.strip().splitlines()[:1] or ["registry unreachable"]
            _installed.append("skip: Claude Code not installable (no network to PyPI/npm?): "
                              + first[0])
        else:
            assert done.returncode == 0, f"{INSTALLER} failed:\n{done.stderr}"
            _installed.append(done.stdout.strip().splitlines()[-1])
    if _installed[0].startswith("skip: "):
        pytest.skip(_installed[0].removeprefix("skip: "))


@pytest.fixture(scope="session")
def claude_bin() -> str:
    """Path of the installed `claude` (pytest_runtest_setup installed it or skipped)."""
    return _installed[0]


@pytest.fixture
def mock() -> Iterator[MockAnthropic]:
    server, stop = serve_mock()
    try:
        yield server
    finally:
        stop()


@dataclass
class Claude:
    """Claude Code set up to run offline against *mock*: its binary, home, work dir, env."""

    bin: str
    home: Path
    work: Path
    env: dict[str, str]  # what a session's `env` must add (or `ccx run --env`)
    mark: str  # E2E_MARK in that env: every process of this Claude Code carries it


    def print_argv(self, prompt: str, *extra: str) -> list[str]:
        return [self.bin, "-p", prompt, "--output-format", "stream-json", "--verbose",
                "--allowedTools", "Bash", *extra]

    def env_flags(self) -> list[str]:
        return [flag for k, v in self.env.items() for flag in ("--env", f"{k}={v}")]


@pytest.fixture
def claude(claude_bin: str, mock: MockAnthropic, tmp_path: Path) -> Claude:
    mark = f"ccx-e2e-{uuid.uuid4().hex[:12]}"
    home, work, tmp = tmp_path / "home", tmp_path / "work", tmp_path / "tmp"
    for directory in (home / ".claude", work, tmp):
        directory.mkdir(parents=True)
    # Interactive mode asks about onboarding, trusting the folder and using the key unless
    # already answered; print mode needs none of it, only --allowedTools for Bash.
    (home / ".claude.json").write_text(json.dumps({
        "hasCompletedOnboarding": True,
        "customApiKeyResponses": {"approved": [API_KEY[-20:]], "rejected": []},
        "projects": {str(work): {"hasTrustDialogAccepted": True}},
    }))
    (home / ".claude" / "settings.json").write_text(json.dumps(
        {"permissions": {"allow": ["Bash"]}}))
    env = {
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "ANTHROPIC_BASE_URL": mock.url,
        "ANTHROPIC_API_KEY": API_KEY,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "E2E_MARK": mark,
    }
    return Claude(claude_bin, home, work, env, mark)


@pytest.fixture
def serve() -> Iterator[ServeProcess]:
    """A real `ccx serve` process (for `ccx run`, `ccx attach` and the terminal tests)."""
    server = start_serve("--kill-grace", "2")
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            stop_serve(server)
