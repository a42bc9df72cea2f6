"""The real Claude Code CLI under ccx's native API and MCP, against the mock Messages API.

Rules: see tests/e2e/conftest.py. An in-process ccx server (the `server`/`connect` fixtures of
tests/conftest.py, which check at teardown that no process group is left); waits are on ccx's
notifications and on the requests the mock recorded; /proc is polled only to wait for the
Bash tool's own processes, the thing under test.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
import trio
from conftest import RawClient, completion, join, wait_for
from mcp import ClientSession
from mcp.client.websocket import websocket_client
from test_mcp import structured

from ccx.server import Server

from .conftest import Claude
from .helpers import descendants, events, marked, result_event, unique, user_message
from .mock_anthropic import MockAnthropic, Recorded, Reply

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # MCP websocket_client
Connect = Callable[..., Awaitable[RawClient]]
RUN_S = 120  # Claude Code starts in 1-2 s; this is for a 2-core machine with both cores busy


async def mock_saw(mock: MockAnthropic, predicate: Callable[[list[Recorded]], bool]) -> None:
    await trio.to_thread.run_sync(lambda: mock.wait_for(predicate, timeout=RUN_S),
                                  abandon_on_cancel=True)


def saw_reply(label: str) -> Callable[[list[Recorded]], bool]:
    return lambda requests: any(r.reply == label for r in requests)


async def execute(client: RawClient, claude: Claude, argv: list[str],
                  **params: Any) -> str:
    started = await client.execute(argv, cwd=str(claude.work), env=claude.env, **params)
    return str(started["session_id"])


async def test_print_mode_stream_json(claude: Claude, mock: MockAnthropic,
                                      client: RawClient) -> None:
    marker = mock.script(unique("hello"), Reply.say("Hello from the mock, through ccx."))
    with trio.fail_after(RUN_S):
        out, err, done = await client.run(claude.print_argv(f"Say hello. {marker}"),
                                          cwd=str(claude.work), env=claude.env)
    assert (done["status"], done["exit_code"]) == ("exited", 0), err
    found = events(out)
    assert (found[0]["type"], found[0]["subtype"]) == ("system", "init")
    result = result_event(out)
    assert result["result"] == "Hello from the mock, through ccx."
    assert result["is_error"] is False
    assert f"text:{marker}" in mock.replies()
    assert done["stdout_bytes"] == len(out)


async def test_failing_api_passes_the_exit_code_on(claude: Claude, mock: MockAnthropic,
                                                   client: RawClient) -> None:
    marker = mock.script(unique("fail"), Reply.error(500, "scripted overload"))
    with trio.fail_after(RUN_S):
        out, err, done = await client.run(claude.print_argv(f"Fail. {marker}"),
                                          cwd=str(claude.work), env=claude.env)
    assert done["status"] == "exited" and done["exit_code"] not in (0, None), (done, err)
    result = result_event(out)
    assert result["is_error"] is True and "scripted overload" in result["result"]
    assert mock.replies().count(f"error:{marker}") == 1  # CLAUDE_CODE_MAX_RETRIES=0


async def test_cancel_during_bash_tool_leaves_no_process(claude: Claude, mock: MockAnthropic,
                                                         client: RawClient) -> None:
    # A process tree and a daemonized grandchild (setsid: it leaves the session too).
    command = "sh -c 'sleep 300 & (setsid sleep 301 &); sleep 302'"
    marker = mock.script(unique("cancel"), Reply.bash(command, then="unreachable"))
    session_id = await execute(client, claude, claude.print_argv(f"Run it. {marker}"))
    await mock_saw(mock, saw_reply(f"bash:{marker}"))

    def sleeps() -> list[str]:
        return sorted(comm for _, comm in marked(claude.mark).values() if comm == "sleep")

    await wait_for(lambda: len(sleeps()) == 3, timeout=RUN_S)  # the tool's whole tree runs
    reply = await client.result("control", session_id=session_id, type="CANCEL")
    assert reply["status"] == "cancelling"
    done = await completion(client, session_id, timeout=60)
    assert done["status"] == "cancelled"
    assert marked(claude.mark) == {}, "processes of the cancelled run are still alive"
    assert not any(r.reply.startswith("tool_result") for r in mock.requests)


async def test_pause_stops_the_bash_tool_and_resume_finishes(
        claude: Claude, mock: MockAnthropic, client: RawClient) -> None:
    ticks = claude.work / "ticks"
    command = f"for i in $(seq 40); do echo tick >> {ticks}; sleep 0.1; done; echo looped"
    marker = mock.script(unique("pause"), Reply.bash(command, then="Ticks done."))
    argv = claude.print_argv(f"Tick. {marker}")
    started = await client.execute(argv, cwd=str(claude.work), env=claude.env)
    session_id = started["session_id"]

    def lines() -> int:
        return ticks.read_text().count("\n") if ticks.exists() else 0

    await wait_for(lambda: lines() >= 3, timeout=RUN_S)  # the tool's loop is running
    with trio.fail_after(30):
        reply = await client.result("control", session_id=session_id, type="PAUSE")
    assert reply["status"] == "paused"
    tree = {**descendants(started["pid"]), **marked(claude.mark)}
    # The tool's loop shell is in it (its `sleep 0.1` child only between two ticks: on a
    # loaded machine the pause may land while the shell itself runs).
    assert {comm for _, comm in tree.values()} >= {"bash"}, tree
    running = {pid: v for pid, v in tree.items() if v[0] != "T"}
    assert not running, f"not stopped after PAUSE: {running} (tree {tree})"
    before = lines()
    await trio.sleep(1.0)  # ten loop periods: a stopped loop writes nothing
    assert lines() == before, "the Bash tool kept writing while paused"
    assert lines() < 40

    assert (await client.result("control", session_id=session_id, type="RESUME"))["status"] \
        == "running"
    done = await completion(client, session_id, timeout=RUN_S)
    assert (done["status"], done["exit_code"]) == ("exited", 0)
    assert lines() == 40
    tool_result = next(r for r in mock.requests if r.reply == f"tool_result:{marker}")
    assert "looped" in str(tool_result.last_user_blocks())  # the tool's output came back
    outputs = [m["params"] for m in client.notifications
               if m["method"] == "process.output" and m["params"]["session_id"] == session_id]
    assert result_event(join(outputs, "stdout"))["result"] == "Ticks done."


async def test_lingering_session_reattached_after_its_client_left(
        claude: Claude, mock: MockAnthropic, server: Server, connect: Connect) -> None:
    release = claude.work / "release"
    command = (f"echo before-$((1+1)); while [ ! -e {release} ]; do sleep 0.05; done; "
               f"echo after-$((2+2))")
    marker = mock.script(unique("linger"), Reply.bash(command, then="Survived the drop."))
    first = await connect(server)
    started = await first.execute(claude.print_argv(f"Wait. {marker}"), cwd=str(claude.work),
                                  env=claude.env, linger=120, encoding="base64")
    session_id = started["session_id"]
    seen: list[dict[str, Any]] = []
    with trio.fail_after(RUN_S):  # read until Claude Code has reported the tool call
        while b'"tool_use"' not in join(seen, "stdout"):
            seen.append(await first.notification("process.output", session_id))
    await first.ws.aclose()  # the client goes away mid-run; the session lingers
    release.touch()  # the tool finishes and Claude Code writes the rest while detached
    await mock_saw(mock, saw_reply(f"tool_result:{marker}"))

    second = await connect(server)
    attached = await second.result("attach", session_id=session_id)  # everything still held
    assert attached["session_id"] == session_id
    with trio.fail_after(RUN_S):
        replayed, done = await second.run_to_completion(session_id)
    assert (done["status"], done["exit_code"]) == ("exited", 0)
    assert [o["seq"] for o in replayed] == list(range(len(replayed)))  # nothing lost or twice
    assert replayed[: len(seen)] == seen  # the same bytes the first client got, in order
    assert len(replayed) > len(seen)
    out = join(replayed, "stdout")
    assert result_event(out)["result"] == "Survived the drop."
    assert len(out) == done["stdout_bytes"]
    tool_result = next(r for r in mock.requests if r.reply == f"tool_result:{marker}")
    [block] = [b for b in tool_result.last_user_blocks() if b["type"] == "tool_result"]
    assert "before-2" in str(block["content"]) and "after-4" in str(block["content"])
    assert all(base64.b64decode(o["data"]) for o in replayed)


async def test_multi_turn_over_stdin(claude: Claude, mock: MockAnthropic,
                                     client: RawClient) -> None:
    one = mock.script(unique("first"), Reply.say("First answer."))
    two = mock.script(unique("second"), Reply.say("Second answer."))
    argv = [claude.bin, "-p", "--input-format", "stream-json", "--output-format",
            "stream-json", "--verbose", "--allowedTools", "Bash"]
    session_id = await execute(client, claude, argv, stdin=True)
    stdout = b""

    async def next_result() -> dict[str, Any]:
        nonlocal stdout
        with trio.fail_after(RUN_S):
            while True:
                output = await client.notification("process.output", session_id)
                if output["stream"] == "stdout":
                    stdout += join([output], "stdout")
                complete = stdout[: stdout.rfind(b"\n") + 1]
                results = [e for e in events(complete) if e["type"] == "result"] \
                    if complete else []
                if len(results) > answered:
                    return results[answered]

    answered = 0
    await client.result("input", session_id=session_id, data=user_message(f"Hi. {one}"))
    assert (await next_result())["result"] == "First answer."
    answered = 1
    await client.result("input", session_id=session_id, data=user_message(f"Again. {two}"))
    assert (await next_result())["result"] == "Second answer."
    await client.result("input", session_id=session_id, data="", eof=True)
    done = await completion(client, session_id, timeout=RUN_S)
    assert (done["status"], done["exit_code"]) == ("exited", 0)
    # One conversation: the second request carried the first turn and its answer.
    second = next(r for r in mock.requests if r.reply == f"text:{two}")
    assert one in str(second.body["messages"]) and "First answer." in str(second.body["messages"])


async def test_mcp_execute_tool_runs_claude(claude: Claude, mock: MockAnthropic,
                                            server: Server) -> None:
    marker = mock.script(unique("mcp"), Reply.say("Answer via MCP."))

    async def main(session: ClientSession) -> dict[str, Any]:
        return structured(await session.call_tool("execute", {
            "command": claude.print_argv(f"Answer. {marker}"), "cwd": str(claude.work),
            "env": claude.env, "timeout": RUN_S}))

    async def in_asyncio() -> dict[str, Any]:  # the SDK's client is asyncio: a worker thread
        with anyio.fail_after(RUN_S):
            async with websocket_client(f"ws://127.0.0.1:{server.port}/ws") as streams, \
                    ClientSession(*streams) as session:
                await session.initialize()
                return await main(session)

    done = await trio.to_thread.run_sync(functools.partial(anyio.run, in_asyncio,
                                                           backend="asyncio"))
    assert (done["status"], done["exit_code"]) == ("exited", 0), done
    assert result_event(done["stdout"].encode())["result"] == "Answer via MCP."
