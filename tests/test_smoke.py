"""Smoke: execute a command over a real socket and get its exact output and completion."""

from conftest import RawClient, py


async def test_execute_streams_and_completes(client: RawClient) -> None:
    code = "import sys; print('hi'); sys.stderr.write('err'); sys.exit(3)"
    stdout, stderr, completed = await client.run(py(code))
    assert stdout == b"hi\n" and stderr == b"err"
    assert completed["status"] == "exited" and completed["exit_code"] == 3
    assert completed["stdout_bytes"] == 3 and completed["stderr_bytes"] == 3
