"""A local stand-in for the Anthropic Messages API: the peer Claude Code talks to in tests/e2e.

Inputs: `POST /v1/messages` (any query string, e.g. `?beta=true`), streaming (SSE) or not.
Outputs: a scripted reply chosen by a marker found in the latest user prompt of a request that
offers tools (the agent's own turn); every other request (titles, summaries...) gets a short
text. Every request is recorded (`requests`), with a condition variable to wait on.
Docs: https://docs.anthropic.com/en/api/messages
      https://docs.anthropic.com/en/api/messages-streaming
Runs in a thread (`http.server`), on 127.0.0.1, port 0; nothing here is trio, so sync tests
(subprocesses, tmux) and trio tests use it alike.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "claude-mock-1"
_ids = itertools.count(1)


@dataclass(frozen=True)
class Reply:
    """What the mock answers to a prompt carrying a marker.

    kind "text": `text` as the assistant's answer. kind "bash": a `tool_use` of the Bash tool
    running `command`; once its `tool_result` comes back, `text` is the answer. kind "error":
    HTTP `status` with an Anthropic error body (no retry helps: `CLAUDE_CODE_MAX_RETRIES=0`).
    """

    kind: str
    text: str = ""
    command: str = ""
    status: int = 200
    timeout_ms: int = 300_000

    @staticmethod
    def say(text: str) -> Reply:
        return Reply("text", text=text)

    @staticmethod
    def bash(command: str, then: str, timeout_ms: int = 300_000) -> Reply:
        return Reply("bash", text=then, command=command, timeout_ms=timeout_ms)

    @staticmethod
    def error(status: int, message: str) -> Reply:
        return Reply("error", text=message, status=status)


@dataclass
class Recorded:
    path: str
    body: dict[str, Any]
    reply: str  # "script:<marker>", "tool_result:<marker>", "other", "error:<marker>"

    def last_user_blocks(self) -> list[dict[str, Any]]:
        return _last_user_blocks(self.body)


def _last_user_blocks(body: dict[str, Any]) -> list[dict[str, Any]]:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content", "")
            if isinstance(content, str):
                return [{"type": "text", "text": content}]
            return list(content)
    return []


def _texts(blocks: list[dict[str, Any]]) -> str:
    return "\n".join(b.get("text", "") for b in blocks if b.get("type") == "text")


@dataclass
class MockAnthropic:
    scripts: dict[str, Reply] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    port: int = 0

    def script(self, marker: str, reply: Reply) -> str:
        """Answer prompts containing *marker* with *reply*; returns the marker."""
        self.scripts[marker] = reply
        return marker

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_for(self, predicate: Callable[[list[Recorded]], bool],
                 timeout: float = 60) -> list[Recorded]:
        """Block until *predicate(requests)* holds (AssertionError after *timeout* s)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate(self.requests):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"mock never saw it; replies: "
                                         f"{[r.reply for r in self.requests]}")
                self.changed.wait(left)
            return list(self.requests)

    def replies(self) -> list[str]:
        with self.changed:
            return [r.reply for r in self.requests]

    # -- choosing a reply ---------------------------------------------------------------------

    def choose(self, body: dict[str, Any]) -> tuple[str, Reply]:
        blocks = _last_user_blocks(body)
        if not body.get("tools"):  # side requests (titles, summaries): not the agent's turn
            return "other", Reply.say("ok")
        if any(b.get("type") == "tool_result" for b in blocks):
            # The tool ran: the answer of the script whose marker started this conversation.
            everything = json.dumps(body.get("messages", []))
            for marker, reply in self.scripts.items():
                if marker in everything and reply.kind == "bash":
                    return f"tool_result:{marker}", Reply.say(reply.text)
            return "tool_result:?", Reply.say("done")
        prompt = _texts(blocks)
        for marker, reply in self.scripts.items():
            if marker in prompt:
                return f"{reply.kind}:{marker}", reply
        return "unscripted", Reply.say("no script for this prompt")


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _content(reply: Reply) -> tuple[list[dict[str, Any]], str]:
    """The assistant content blocks and stop reason for a text or bash reply."""
    if reply.kind == "bash":
        block = {"type": "tool_use", "id": f"toolu_mock{next(_ids):06d}", "name": "Bash",
                 "input": {"command": reply.command, "description": "run the scripted command",
                           "timeout": reply.timeout_ms}}
        return [block], "tool_use"
    return [{"type": "text", "text": reply.text}], "end_turn"


def _stream(reply: Reply, model: str) -> Iterator[bytes]:
    blocks, stop = _content(reply)
    message = {"id": f"msg_mock{next(_ids):06d}", "type": "message", "role": "assistant",
               "model": model, "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": 10, "output_tokens": 1}}
    yield _sse("message_start", {"type": "message_start", "message": message})
    for index, block in enumerate(blocks):
        if block["type"] == "text":
            yield _sse("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": {"type": "text", "text": ""}})
            text = block["text"]
            for part in (text[: len(text) // 2], text[len(text) // 2 :]):
                yield _sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                   "delta": {"type": "text_delta", "text": part}})
        else:
            start = {**block, "input": {}}
            yield _sse("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": start})
            yield _sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                               "delta": {"type": "input_json_delta",
                                                         "partial_json": json.dumps(block["input"])}})
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
    yield _sse("message_delta", {"type": "message_delta",
                                 "delta": {"stop_reason": stop, "stop_sequence": None},
                                 "usage": {"output_tokens": 5}})
    yield _sse("message_stop", {"type": "message_stop"})


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        mock = self.server.mock
        if not self.path.startswith("/v1/messages") or self.path.startswith(
                "/v1/messages/count_tokens"):
            label, reply = "unknown:" + self.path, Reply.error(404, "not mocked: " + self.path)
        else:
            label, reply = mock.choose(body)
        with mock.changed:
            mock.requests.append(Recorded(self.path, body, label))
            mock.changed.notify_all()
        if reply.kind == "error":
            self._send(reply.status, "application/json", json.dumps(
                {"type": "error", "error": {"type": "api_error" if reply.status >= 500
                                            else "invalid_request_error",
                                            "message": reply.text}}).encode())
            return
        model = body.get("model", MODEL)
        if body.get("stream"):
            self._send(200, "text/event-stream", b"".join(_stream(reply, model)))
            return
        blocks, stop = _content(reply)
        self._send(200, "application/json", json.dumps({
            "id": f"msg_mock{next(_ids):06d}", "type": "message", "role": "assistant",
            "model": model, "content": blocks, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5}}).encode())

    def do_GET(self) -> None:
        with self.server.mock.changed:
            self.server.mock.requests.append(Recorded(self.path, {}, "unknown:GET " + self.path))
            self.server.mock.changed.notify_all()
        self._send(404, "application/json", b'{"type":"error","error":{"type":"not_found_error",'
                   b'"message":"not mocked"}}')

    def _send(self, status: int, content_type: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        self.send_header("request-id", f"req_mock{next(_ids):06d}")
        self.end_headers()
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    mock: MockAnthropic

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client killed mid-connection (CANCEL does that) is no error of the mock


def serve_mock() -> tuple[MockAnthropic, Callable[[], None]]:
    """Start the mock on 127.0.0.1, port 0, in a thread; returns it and a function to stop it."""
    mock = MockAnthropic()
    server = _Server(("127.0.0.1", 0), _Handler)
    server.mock = mock
    mock.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="mock-anthropic", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(10)

    return mock, stop
