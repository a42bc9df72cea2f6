"""PROTOCOL.md 10 without a balancer: CCX_PEERS / CCX_PEER_URL parsing and refusals, peers
found through `dns:HOST:PORT` (an address literal resolves to itself) and through the `{node}` template, `scope` checked,
and the client's re-dial URL for a lingering session (`?node=`, or CCX_PEER_URL).

Real servers in-process on loopback ports; nothing mocked.
"""

from __future__ import annotations

import pytest
import trio

from ccx.client import Client, ServerError, connect, node_of, with_node
from ccx.config import ConfigError, Settings
from ccx.server import Server


def test_peers_parse_and_bad_values_are_refused() -> None:
    settings = Settings.from_env({"CCX_NODE_NAME": "a",
                                  "CCX_PEERS": "a=ws://h1:1/ws, b=wss://h2:2/ws"})
    assert settings.peers == ((("a", "ws://h1:1/ws"), ("b", "wss://h2:2/ws")), None)
    assert Settings.from_env({"CCX_NODE_NAME": "a", "CCX_PEERS": "dns:ccx-pods:8003"}).peers \
        == ((), ("ccx-pods", 8003))
    assert Settings.from_env({"CCX_NODE_NAME": "a", "CCX_PEER_URL": "ws://{node}.p:1/ws"}
                             ).peer_url == "ws://{node}.p:1/ws"
    for env, words in (({"CCX_PEERS": "b=ws://h:1/ws"}, "CCX_NODE_NAME"),
                       ({"CCX_NODE_NAME": "a", "CCX_PEERS": "B=ws://h:1/ws"}, "CCX_PEERS"),
                       ({"CCX_NODE_NAME": "a", "CCX_PEERS": "b=http://h:1/ws"}, "CCX_PEERS"),
                       ({"CCX_NODE_NAME": "a", "CCX_PEERS": "dns:host"}, "CCX_PEERS"),
                       ({"CCX_NODE_NAME": "a", "CCX_PEER_URL": "ws://p:1/ws"}, "CCX_PEER_URL")):
        with pytest.raises(ConfigError, match=words):
            Settings.from_env(env)


def test_node_of_and_with_node() -> None:
    assert node_of("ccx-0.tk3x8a.5d41") == "ccx-0"
    assert node_of("5d41") is None and node_of("A.b.c") is None and node_of("a..c") is None
    assert with_node("ws://lb:1/ws?token=t&node=x", "ccx-2") == \
        "ws://lb:1/ws?token=t&node=ccx-2"


async def _pair(nursery: trio.Nursery, a_env: dict[str, str]) -> tuple[Server, Server]:
    b = await nursery.start(Server(Settings(node_name="b", port=0, state_dir="",
                                            kill_grace=0.5)).run)
    env = {k: v.replace("{b_port}", str(b.port)) for k, v in a_env.items()}
    a = await nursery.start(Server(Settings.from_env(env, node_name="a", port=0, state_dir="",
                                                     kill_grace=0.5)).run)
    return a, b


@pytest.mark.parametrize("a_env", [
    {"CCX_PEERS": "dns:127.0.0.1:{b_port}"},
    {"CCX_PEER_URL": "ws://127.0.0.1:{b_port}/ws?node={node}"},
], ids=["dns", "template"])
async def test_a_node_finds_its_peer_by_dns_or_template(
        nursery: trio.Nursery, a_env: dict[str, str]) -> None:
    a, b = await _pair(nursery, a_env)
    async with connect(b.url) as on_b, connect(a.url) as on_a:
        session = await on_b.execute(["sleep", "30"])
        status = await on_a.status(session.id)
        assert status["session_id"] == session.id and status["status"] == "running"
        assert await on_a.control(session.id, "CANCEL") == "cancelling"
        listed = await on_a.call("sessions", {"scope": "cluster"})
        if "CCX_PEERS" in a_env:  # DNS names every node; a template alone names none
            assert [s["node"] for s in listed["sessions"]] == ["b"]
        assert listed["unreachable"] == []
        with pytest.raises(ServerError) as bad:
            await on_a.call("sessions", {"scope": "world"})
        assert bad.value.code == -32602
    a.stop()
    b.stop()


async def test_without_a_node_name_nothing_is_forwarded(nursery: trio.Nursery) -> None:
    server = await nursery.start(Server(Settings(port=0, state_dir="")).run)
    async with connect(server.url) as client:
        with pytest.raises(ServerError) as error:
            await client.status("b.x.y")
        assert error.value.code == -32002
        listed = await client.call("sessions", {"scope": "cluster"})
        assert listed == {"sessions": [], "unreachable": []}
        assert "cluster" not in (await client.server_info())["capabilities"]
    server.stop()


def test_redial_url_names_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    client = Client("ws://lb:8003/ws")
    client._register("ccx-1.inc.abc", 1, 1, linger=30)
    assert client.redial_url() == "ws://lb:8003/ws?node=ccx-1"
    monkeypatch.setenv("CCX_PEER_URL", "ws://{node}.ccx-pods:8003/ws")
    assert client.redial_url() == "ws://ccx-1.ccx-pods:8003/ws"
    monkeypatch.delenv("CCX_PEER_URL")
    plain = Client("ws://lb:8003/ws")
    plain._register("abc", 1, 1, linger=30)
    assert plain.redial_url() == "ws://lb:8003/ws"
