"""Many nodes as one service (PROTOCOL.md 10, "Routing"): finding peers, forwarding requests
that name another node's session, relaying its notifications, and the cluster-wide list.

Inputs: `Settings` (CCX_NODE_NAME, CCX_PEERS, CCX_PEER_URL, the shared token), this node's
incarnation, and from `ccx.api` the method, params and calling connection (`Owner`) of a
request whose session id names another node.
Outputs: `Cluster.route()` (None: serve here; a `Target`: forward), `Cluster.forward()` (the
owning node's result, or its error as `PassedOn`, or -32008 `SessionLost` within 5 s when the
node is unreachable or has restarted), `Cluster.sessions()` (every node's sessions plus
`unreachable`, within 2 s), and `Cluster.release()` for a connection that closed.

Connections to peers are made with the project's own client (`ccx.client.Client`), with the
shared token, two kinds (docs/protocol-notes.md, "Forwarding"):
- *pooled*: one per peer, shared by every caller, for requests that only ask and answer
  (`status`, `control`, `resize`, `sessions`, and the `server.info` that names a peer);
- *links*: one per (calling connection, peer), dialed on the connection's first `attach`,
  `watch`, `unwatch` or `input` for that peer and closed with it. The link is the owner (or
  watcher) on the owning node, so section 8 holds unchanged: when the client's connection
  closes, its links close and the owner applies linger or cancel; `process.detached` comes
  through. Notifications arriving on a link are passed on as they are, one at a time, to the
  client's connection; the link reads the next frame only once the client's writer has taken
  the previous one, so a slow client slows the owning node's session, and so its child, and
  the forwarding node holds at most one frame per link. Notifications of sessions of different
  clients never share a link, so one client's slowness never holds up another's output, and
  one client's unread `input` never blocks another's requests.
- *MCP links*: as links, but MCP connections (`tools/call` of a tool whose `session_id` names
  another node is made there, so `read_output` claims the session for the link).
A peer that stops answering is dropped (closed in the background) and reported lost. A link
that ends under its client (the owning node died, or was dropped as hung) tells the client
`process.detached {"session_id", "node", "reason": "unreachable"}` for each session it was
relaying (docs/protocol-notes.md, "Node loss"). Deadlines: one per forwarded request; `input`,
MCP `send_input` and `read_output`, which wait on the child, instead wait as long as the owning
node answers a `ping` on the pooled connection (nothing is timed per relayed frame).
Size (over 400 lines): peers, the pooled connections, the per-connection links and the
forwarding rules (which method goes where, -32008) are one state machine over one map of
connections.
Docs: ../shared/PROTOCOL.md section 10; https://trio.readthedocs.io/en/stable/reference-core.html
      https://docs.python.org/3/library/socket.html#socket.getaddrinfo
"""

from __future__ import annotations

import functools
import json
import socket
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ccx.client import NOTIFICATION_PREFIX, Client, ConnectionLost, ServerError, node_of
from ccx.config import Settings
from ccx.errors import InternalError, PassedOn, SessionLost
from ccx.events import Detached
from ccx.log import get_logger
from ccx.owner import Owner, OwnerGone

log = get_logger("ccx.cluster")

DIAL_TIMEOUT_S = 2.0  # dial + server.info of a peer; beyond it the peer is unreachable
CALL_TIMEOUT_S = 4.0  # a forwarded request (but input) answers within 5 s, or -32008
# A forwarded `input` (MCP `send_input`, `read_output`) waits on the child as a local one
# does, for as long as the owning node shows it is alive: once it has waited PROBE_AFTER_S, and
# every PROBE_AFTER_S from then on, the node is sent a `ping` on the pooled connection, which
# must be answered within PROBE_TIMEOUT_S; else -32008 unreachable, within 5 s of a hang.
PROBE_AFTER_S = 1.0
PROBE_TIMEOUT_S = CALL_TIMEOUT_S - PROBE_AFTER_S
SCOPE_TIMEOUT_S = 1.5  # `sessions {"scope": "cluster"}`: how long peers get to answer
LINKED = frozenset({"attach", "watch", "unwatch", "input"})  # go over the caller's link
RETRYABLE = frozenset({"status", "control", "resize", "attach", "watch", "unwatch",
                       "sessions"})  # safe to send again on a fresh connection
# A relayed notification that is not output (the only kind a link looks into, unparsed
# output passing by with one prefix test): the few that end what a link relays of a session.
OUTPUT_PREFIX = NOTIFICATION_PREFIX + '"process.output"'
ENDS_ATTACH = frozenset({"process.completed", "process.detached"})
ENDS_WATCH = frozenset({"process.completed", "process.lagged"})


@attrs.frozen
class Target:
    """A session id naming another node: where the request goes."""

    node: str
    incarnation: str


class Unreachable(Exception):
    """A peer could not be dialed, or answered with another name."""


@attrs.define(eq=False)
class Conn:
    """One open connection to a peer, with the name and incarnation it gave."""

    client: Client
    node: str | None
    incarnation: str | None
    url: str
    # Set for a link: a forwarded attach/watch whose result the link has read but this node
    # has not yet sent to the client; the link relays nothing more until it is sent, so what
    # followed the result on the owning node never overtakes it on the client's connection.
    # (Added as the result is read, not as the request goes: what the link reads before the
    # result goes on, else the result would wait behind it.)
    gates: list[trio.Event] = attrs.field(factory=list)
    # A link's sessions whose notifications it relays (attached, watched through it): told
    # `process.detached` with the -32008 data if the link is lost (docs/protocol-notes.md,
    # "Node loss"), unless the client's own connection closed it (`released`).
    attached: set[str] = attrs.field(factory=set)
    watched: set[str] = attrs.field(factory=set)
    released: bool = False
    waiting: trio.CancelScope = attrs.field(factory=trio.CancelScope)  # for the link's end

    @property
    def alive(self) -> bool:
        return not self.client.closed

    def hold(self, gate: trio.Event) -> None:
        """Relay nothing more until *gate* is set (a forwarded result was just read)."""
        self.gates.append(gate)


@attrs.define(eq=False)
class Cluster:
    """Peers of this node and the connections to them."""

    settings: Settings
    incarnation: str
    _nursery: trio.Nursery | None = None
    _pooled: dict[str, Conn] = attrs.field(factory=dict)  # url -> the shared connection
    _dialing: dict[str, trio.Lock] = attrs.field(factory=dict)
    _links: dict[Owner, dict[str, Conn]] = attrs.field(factory=dict)  # owner -> url -> link
    _learned: dict[str, str] = attrs.field(factory=dict)  # node -> url, found through DNS

    @property
    def node(self) -> str | None:
        return self.settings.node_name

    @property
    def static(self) -> dict[str, str]:
        return dict(self.settings.peers[0]) if self.settings.peers else {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the peer connections until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # ----------------------------------------------------------------------------- routing

    def route(self, session_id: object) -> Target | None:
        """None: the session is this node's (or the id names no node): serve it here.
        A `Target`: forward. An id of this node's earlier incarnation: -32008 restarted."""
        if self.node is None or not isinstance(session_id, str):
            return None
        node = node_of(session_id)
        if node is None:
            return None
        incarnation = session_id.split(".", 2)[1]
        if node == self.node:
            if incarnation != self.incarnation:
                raise lost(node, "restarted")
            return None
        return Target(node, incarnation)

    async def forward(self, target: Target, method: str, params: dict[str, Any],
                      owner: Owner | None, gate: trio.Event | None = None) -> Any:
        """Send *method* to the session's node and return its result; its error comes back as
        `PassedOn`. -32008 when the node cannot be reached or has restarted. *gate* (for
        `attach`/`watch`): notifications on the caller's link wait until it is set."""
        linked = owner is not None and method in LINKED
        for attempt in (1, 2):
            conn = await self._conn(target.node, owner if linked else None)
            if conn.incarnation != target.incarnation:
                raise lost(target.node, "restarted")
            try:
                result = await self._call(conn, target.node, method, params,
                                          patient=method == "input",
                                          on_reply=None if gate is None else
                                          functools.partial(conn.hold, gate))
            except ServerError as exc:
                raise PassedOn(exc.code, exc.message, exc.data) from None
            except trio.TooSlowError:
                self._drop(conn)
                raise lost(target.node, "unreachable") from None
            except ConnectionLost:
                if method not in RETRYABLE:
                    raise InternalError(f"connection to node {target.node} lost during "
                                        f"{method}; it may or may not have been done",
                                        {"node": target.node}) from None
                if attempt == 2:
                    raise lost(target.node, "unreachable") from None
                log.info("peer_connection_lost", node=target.node, method=method, retry=True)
                continue
            if linked:
                sid = str(params["session_id"])  # a str: `route` named its node
                kept = {"attach": conn.attached, "watch": conn.watched}.get(method)
                if kept is not None:
                    kept.add(sid)
                elif method == "unwatch":
                    conn.watched.discard(sid)
            return result
        raise AssertionError("not reached")  # pragma: no cover

    async def _call(self, conn: Conn, node: str, method: str, params: dict[str, Any], *,
                    patient: bool = False, on_reply: Callable[[], None] | None = None) -> Any:
        """*method* on *conn*, answered within CALL_TIMEOUT_S, or, *patient* (input, which
        waits for the child), for as long as *node* answers pings; `trio.TooSlowError`
        otherwise. One deadline (or one prober) per request: nothing per relayed frame."""
        if not patient:
            with trio.fail_after(CALL_TIMEOUT_S):
                return await conn.client.call(method, params, on_reply=on_reply)
        assert self._nursery is not None
        with trio.CancelScope() as waiting:
            prober = trio.CancelScope()

            async def probe() -> None:
                with prober:
                    await self._until_silent(conn.url, node)
                    waiting.cancel()

            self._nursery.start_soon(probe)
            try:
                return await conn.client.call(method, params, on_reply=on_reply)
            finally:
                prober.cancel()
        raise trio.TooSlowError

    async def _until_silent(self, url: str, node: str) -> None:
        """Return once *node* (at *url*) fails to answer a `ping` within PROBE_TIMEOUT_S,
        asked every PROBE_AFTER_S on the pooled connection (which no client's input or
        output holds up); the pooled connection is then dropped."""
        while True:
            await trio.sleep(PROBE_AFTER_S)
            pooled = None
            try:
                with trio.fail_after(PROBE_TIMEOUT_S):
                    pooled = await self._pooled_conn(url, node)
                    await pooled.client.call("ping")
            except ServerError:  # an answer all the same: the node is alive
                continue
            except (Unreachable, ConnectionLost, trio.TooSlowError) as exc:
                log.info("peer_silent", node=node, why=str(exc) or type(exc).__name__)
                if pooled is not None:
                    self._drop(pooled)
                return

    async def forward_tool(self, target: Target, name: str, arguments: dict[str, Any],
                           owner: Owner, version: str) -> dict[str, Any]:
        """An MCP `tools/call` naming another node's session, made there over this MCP
        connection's MCP link to that node (so `read_output` claims the session for the link,
        and the link's closing releases it); the tool result as that node gave it."""
        pooled = await self._conn(target.node, None)  # names the node and its incarnation
        if pooled.incarnation != target.incarnation:
            raise lost(target.node, "restarted")
        links = self._links.setdefault(owner, {})
        key = f"mcp {version} {pooled.url}"
        conn = links.get(key)
        # As for native requests; `read_output` may wait `wait_s` by design and `send_input`
        # waits for the child to read: as `input`, no deadline while the node answers pings.
        call = {"name": name, "arguments": arguments}
        try:
            if conn is None or not conn.alive:
                with trio.fail_after(DIAL_TIMEOUT_S):
                    conn = await self._dial_mcp(pooled, version)
                links[key] = conn
            return dict(await self._call(conn, target.node, "tools/call", call,
                                         patient=name in ("read_output", "send_input")))
        except ServerError as exc:
            raise PassedOn(exc.code, exc.message, exc.data) from None
        except trio.TooSlowError:
            if conn is not None:
                self._drop(conn)
            raise lost(target.node, "unreachable") from None
        except (Unreachable, ConnectionLost):
            raise lost(target.node, "unreachable") from None

    async def _dial_mcp(self, pooled: Conn, version: str) -> Conn:
        assert self._nursery is not None

        async def ignore(text: str) -> None:  # progress and log messages of the peer: none
            return None                         # of ours (read_output reports none)

        client = Client(pooled.url, self.settings.token, relay=ignore, subprotocols=["mcp"])
        try:
            await self._nursery.start(_own, client)
            await client.call("initialize", {
                "protocolVersion": version, "capabilities": {},
                "clientInfo": {"name": f"ccx-node-{self.node}", "version": "1"}})
            await client.notify("notifications/initialized")
        except Exception as exc:  # OSError, HandshakeError, ServerError... (maybe grouped)
            self._nursery.start_soon(client.aclose)  # not waited for: a hung peer
            raise Unreachable(f"{pooled.url} (MCP): {exc!r}") from None
        return Conn(client, pooled.node, pooled.incarnation, pooled.url)

    async def _conn(self, node: str, owner: Owner | None) -> Conn:
        """An open connection to *node*: the caller's link to it, or the pooled one."""
        try:
            with trio.fail_after(DIAL_TIMEOUT_S * 2):
                url = await self._url_of(node)
                if owner is None:
                    return await self._pooled_conn(url, node)
                links = self._links.setdefault(owner, {})
                conn = links.get(url)
                if conn is None or not conn.alive:
                    conn = await self._dial(url, node, relay_to=owner)
                    links[url] = conn
                return conn
        except (Unreachable, trio.TooSlowError) as exc:
            log.info("peer_unreachable", node=node, why=str(exc) or type(exc).__name__)
            raise lost(node, "unreachable") from None

    async def _pooled_conn(self, url: str, node: str | None) -> Conn:
        lock = self._dialing.setdefault(url, trio.Lock())
        async with lock:
            conn = self._pooled.get(url)
            if conn is None or not conn.alive:
                conn = await self._dial(url, node)
                self._pooled[url] = conn
            elif node is not None and conn.node != node:
                raise Unreachable(f"{url} is node {conn.node}, not {node}")
            return conn

    async def _url_of(self, node: str) -> str:
        """Where *node* is: the static map, then a name found through DNS, then CCX_PEER_URL,
        then a fresh DNS look-up."""
        url = self.static.get(node) or self._learned.get(node)
        if url is None and self.settings.peer_url is not None:
            url = self.settings.peer_url.replace("{node}", node)
        if url is None and self.settings.peers and self.settings.peers[1] is not None:
            await self._discover()
            url = self._learned.get(node)
        if url is None:
            raise Unreachable(f"no address known for node {node}")
        return url

    async def _dial(self, url: str, node: str | None,
                    relay_to: Owner | None = None) -> Conn:
        """Open a connection to *url*, ask its name and incarnation; `Unreachable` if it does
        not answer in time or is not *node*."""
        nursery = self._nursery
        assert nursery is not None
        conn: Conn | None = None

        async def relay(text: str) -> None:
            assert conn is not None and relay_to is not None
            while conn.gates:  # a forwarded attach/watch result not yet sent: wait for it
                await conn.gates[0].wait()
                conn.gates = [g for g in conn.gates if not g.is_set()]
            try:
                await relay_to.send_frame(text.encode("utf-8", "surrogatepass"))
            except OwnerGone:  # the client is gone: so is what it owned through this link
                nursery.start_soon(client.aclose)
            if not text.startswith(OUTPUT_PREFIX):  # rare: may end what the link relays
                _relayed(conn, text)

        client = Client(url, self.settings.token, relay=relay if relay_to is not None else None)
        try:
            with trio.fail_after(DIAL_TIMEOUT_S):
                await nursery.start(_own, client)
                info = await client.call("server.info")
        except Exception as exc:  # OSError, HandshakeError, TooSlowError, ServerError...
            # (trio raises a dial's failure wrapped in an ExceptionGroup)
            nursery.start_soon(client.aclose)  # not waited for: a hung peer
            raise Unreachable(f"{url}: {exc!r}") from None
        conn = Conn(client, info.get("node"), info.get("incarnation"), url)
        if node is not None and conn.node != node:
            nursery.start_soon(client.aclose)  # not waited for: a hung peer
            raise Unreachable(f"{url} answers as node {conn.node!r}, not {node!r}")
        log.info("peer_connected", url=url, node=conn.node, incarnation=conn.incarnation,
                 link=relay_to is not None)
        if relay_to is not None:
            nursery.start_soon(self._tell_if_lost, conn, relay_to)
        return conn

    async def _tell_if_lost(self, link: Conn, owner: Owner) -> None:
        """Once *link* ends, unless its client's connection closed it: tell the client, for
        each session the link was relaying, `process.detached` with the -32008 data (the
        contract's "no further notifications of it"), after anything relayed before and any
        forwarded attach/watch result still being sent."""
        with link.waiting:  # cancelled by `_drop` (a node that stopped answering)
            await link.client.ended.wait()
        while link.gates:
            await link.gates[0].wait()
            link.gates = [g for g in link.gates if not g.is_set()]
        lost = sorted(link.attached | link.watched)
        link.attached.clear()
        link.watched.clear()
        if link.released or not lost:
            return
        log.info("peer_link_lost", node=link.node, sessions=len(lost))
        for sid in lost:
            try:
                await owner.send_event(Detached(sid, link.node, "unreachable"))
            except OwnerGone:
                return

    def _drop(self, conn: Conn) -> None:
        """Forget a connection whose peer does not answer, and close it in the background
        (a close handshake with a hung peer takes the client's whole close timeout)."""
        if self._pooled.get(conn.url) is conn:
            del self._pooled[conn.url]
        for links in self._links.values():
            for key, link in list(links.items()):
                if link is conn:
                    del links[key]
        conn.waiting.cancel()  # a link's client hears now that its sessions are lost
        assert self._nursery is not None
        self._nursery.start_soon(conn.client.aclose)

    def release(self, owner: Owner) -> None:
        """*owner*'s connection closed: close its links, so each owning node applies linger
        or cancel to what the link owned (PROTOCOL.md 8) and ends its watches."""
        links = self._links.pop(owner, {})
        for conn in links.values():
            conn.released = True
            for gate in conn.gates:
                gate.set()
            if self._nursery is not None:
                self._nursery.start_soon(conn.client.aclose)

    # ----------------------------------------------------------------------------- the fleet

    async def _discover(self) -> dict[str, str | None]:
        """`dns:HOST:PORT`: every address HOST resolves to is a node; ask each its name.
        Returns url -> name (None: did not answer); learns name -> url."""
        assert self.settings.peers is not None and self.settings.peers[1] is not None
        host, port = self.settings.peers[1]
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("peers_unresolved", host=host, error=str(exc))
            return {}
        urls = sorted({_ws_url(str(info[4][0]), port) for info in infos})
        names: dict[str, str | None] = {}

        async def ask(url: str) -> None:
            try:
                conn = await self._pooled_conn(url, None)
            except Unreachable:
                names[url] = None
                return
            names[url] = conn.node
            if conn.node is not None:
                self._learned[conn.node] = url

        with trio.move_on_after(DIAL_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for url in urls:
                    nursery.start_soon(ask, url)
        return {url: names.get(url) for url in urls}

    async def sessions(self, local: list[dict[str, object]],
                       tag: str | None) -> dict[str, object]:
        """`sessions {"scope": "cluster"}`: this node's and every reachable peer's sessions,
        each with `node`, plus `unreachable` (names, or addresses of unnamed ones); within
        SCOPE_TIMEOUT_S whatever the peers do: every peer is asked at once."""
        found: list[dict[str, object]] = [{**info, "node": self.node} for info in local]
        targets: dict[str, str | None] = {url: name for name, url in self.static.items()
                                          if name != self.node}
        if self.settings.peers and self.settings.peers[1] is not None:
            host, port = self.settings.peers[1]
            with trio.move_on_after(SCOPE_TIMEOUT_S / 2):
                try:
                    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                except OSError as exc:
                    log.warning("peers_unresolved", host=host, error=str(exc))
                    infos = []
                for info in infos:
                    targets.setdefault(_ws_url(str(info[4][0]), port), None)
        params = {"tag": tag} if tag is not None else {}
        answered: set[str] = set()

        async def ask(url: str, name: str | None) -> None:
            try:
                conn = await self._pooled_conn(url, name)
                if conn.node is not None and conn.node != self.node:
                    self._learned.setdefault(conn.node, url)
                    targets[url] = conn.node
                result = [] if conn.node == self.node else \
                    (await conn.client.call("sessions", params))["sessions"]
            except (Unreachable, ConnectionLost, ServerError) as exc:
                log.info("peer_unreachable", url=url, node=name, why=str(exc))
                return
            answered.add(url)
            if conn.node != self.node:
                found.extend({**info, "node": conn.node} for info in result)

        with trio.move_on_after(SCOPE_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for url, name in list(targets.items()):
                    nursery.start_soon(ask, url, name)
        unreachable = sorted(name or url for url, name in targets.items()
                             if url not in answered)
        return {"sessions": found, "unreachable": unreachable}


def lost(node: str, reason: str) -> SessionLost:
    return SessionLost(f"session lost: node {node} is {reason}",
                       {"node": node, "reason": reason})


def _relayed(link: Conn, text: str) -> None:
    """A notification other than output went through *link*: a completion, a move to another
    connection (`process.detached`), or a watcher's lag ends what the link relays of it."""
    try:
        message = json.loads(text)
        method, sid = message["method"], message["params"]["session_id"]
    except (ValueError, KeyError, TypeError):
        return
    if method in ENDS_ATTACH:
        link.attached.discard(sid)
    if method in ENDS_WATCH:
        link.watched.discard(sid)


def _ws_url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"ws://{host}:{port}/ws"


async def _own(client: Client, *, task_status: trio.TaskStatus[None]) -> None:
    """Run *client*'s connection; a failure once it is up only ends that connection."""
    up = False

    class Status:
        def started(self, value: None = None) -> None:
            nonlocal up
            up = True
            task_status.started()

    try:
        await client._run(task_status=Status())
    except Exception:
        if not up:
            raise
        log.exception("peer_connection_crashed", url=client.url)


async def _self_check() -> None:
    """Two servers on loopback named a and b, each listing both: a session started on b is
    found, controlled and attached through a; an id of a's earlier incarnation gets -32008
    restarted, and an id of a node nobody knows -32008 unreachable."""
    from ccx.client import Output, connect
    from ccx.server import Server

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    ports = {"a": free_port(), "b": free_port()}
    peers = ",".join(f"{n}=ws://127.0.0.1:{p}/ws" for n, p in ports.items())
    async with trio.open_nursery() as nursery:
        servers = {n: await nursery.start(Server(Settings.from_env(
            {"CCX_PEERS": peers}, node_name=n, port=p, state_dir="", kill_grace=0.5)).run)
            for n, p in ports.items()}
        async with connect(servers["b"].url) as b, connect(servers["a"].url) as a:
            session = await b.execute(["sh", "-c", "echo one; read x; echo $x"], stdin=True)
            sid = session.id
            assert (await a.status(sid))["session_id"] == sid
            listed = await a.call("sessions", {"scope": "cluster"})
            assert {s["node"] for s in listed["sessions"]} == {"b"}, listed
            assert listed["unreachable"] == []
            moved = await a.attach(sid, linger=0)
            await a.send_input(sid, "two\n")
            seen = [e async for e in moved.events() if isinstance(e, Output)]
            assert b"".join(o.data for o in seen) == b"one\ntwo\n", seen
            old = f"a.{'0' * 6}.x"
            for sid_, reason in ((old, "restarted"), ("zz.1.x", "unreachable")):
                try:
                    await a.status(sid_)
                except ServerError as exc:
                    assert exc.code == -32008 and exc.data["reason"] == reason, exc.data
                else:
                    raise AssertionError("a lost node must give -32008")
        for server in servers.values():
            server.stop()
    print("ccx.cluster: PASS")


if __name__ == "__main__":
    trio.run(_self_check)
