"""nox sessions for ccx: tests, lint (ruff), typecheck (mypy --strict), selftest, selfchecks.

Run `nox -l` to list them; `nox -s tests -- -k pause` passes arguments through to pytest.
Docs: https://nox.thea.codes/en/stable/
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The pytest suite: real processes, sockets and signals on 127.0.0.1."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def selftest(session: nox.Session) -> None:
    """The product-level check: `ccx selftest` against a private in-process server."""
    session.install("-e", ".")
    session.run("ccx", "selftest")


@nox.session(python="3.11")
def selfchecks(session: nox.Session) -> None:
    """Every module's own `python -m ccx.<module>` check (`ccx.selfchecks` finds them)."""
    session.install("-e", ".")
    session.run("python", "-m", "ccx.selfchecks")


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", "ccx", "tests", "noxfile.py")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy", "ccx")


@nox.session(python="3.11")
def container(session: nox.Session) -> None:
    """The image built with podman and run for real (tests/test_container.py; root, podman,
    runc, slirp4netns, debootstrap: .ci/container installs them in CI)."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "container", "tests/test_container.py", *session.posargs)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """ccx against websocketd and a raw pipe: bench/results.json, a table, bench/firehose.png.

    `nox -s bench -- --quick` is the < 60 s form. websocketd comes from apt-get when missing
    (the peer is skipped, with a line saying so, when it cannot be installed).
    """
    session.install("-e", ".", "matplotlib>=3.7", "msgspec>=0.18")
    session.run("python", "-m", "bench.run", *session.posargs)
