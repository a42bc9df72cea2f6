"""Run every module's own self-check (`python -m ccx.<module>`) and report one line each.

Inputs: the `ccx` package's source files. A module takes part when it ends in an
`if __name__ == "__main__":` block; the entry points (`ENTRY_POINTS`, whose block runs a
command, not a check) are left out.
Outputs: `PASS`/`FAIL` with the time taken per module on stdout, the output of failed ones,
exit status 0 only if every check ran, exited 0 and printed its `: PASS` line (a check that
stays silent fails). Checks run one after the other, each bounded by `CHECK_TIMEOUT_S`; the
whole run takes well under a minute. `nox -s selfchecks` and `.ci/run` call this.
Docs: https://docs.python.org/3/library/__main__.html
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

MAIN_BLOCK = 'if __name__ == "__main__":'
ENTRY_POINTS = frozenset({"ccx.cli", "ccx.selftest", "ccx.selfchecks"})
CHECK_TIMEOUT_S = 60.0  # one module's check; the slowest takes a few seconds
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def modules_with_checks() -> list[str]:
    """Dotted names of the package's modules that end in a `__main__` block, sorted."""
    found = []
    for root, _dirs, files in os.walk(PACKAGE_DIR):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            with open(path, encoding="utf-8") as f:
                if MAIN_BLOCK not in f.read():
                    continue
            relative = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[: -len(".py")]
            module = relative.replace(os.sep, ".")
            if module not in ENTRY_POINTS:
                found.append(module)
    return sorted(found)


def run_check(module: str) -> tuple[bool, float, str]:
    """(passed, seconds, output) of `python -m module`."""
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", module], capture_output=True,
                              timeout=CHECK_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        partial = bytes(exc.stdout or b"") + bytes(exc.stderr or b"")
        return False, time.monotonic() - started, partial.decode(errors="replace") + "\nTIMEOUT"
    output = (done.stdout + done.stderr).decode(errors="replace")
    passed = done.returncode == 0 and f"{module}: PASS" in done.stdout.decode(errors="replace")
    return passed, time.monotonic() - started, output


def main() -> int:
    modules = modules_with_checks()
    failed = []
    for module in modules:
        passed, seconds, output = run_check(module)
        print(f"{'PASS' if passed else 'FAIL'} {module} ({seconds:.1f} s)", flush=True)
        if not passed:
            failed.append(module)
            print(output, flush=True)
    print(f"{len(modules) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
