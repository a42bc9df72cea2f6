"""A fake peer that only blasts pre-built frames, to measure the reader alone.

Run as `python -m bench.fakeserver MODE PORT_FILE TOTAL_BYTES [SAMPLE_FILE]`. It listens on
127.0.0.1 (port 0; the port is written to PORT_FILE), serves one WebSocket connection and
exits. MODE `ccx`: answers the first request like `execute`, then sends `process.output`
frames shaped exactly like ccx's (64 KiB of SAMPLE_FILE each, JSON-escaped once, `seq`
spliced in) up to TOTAL_BYTES of raw output, then `process.completed`. MODE `lines`: sends
8-byte text frames (one per line, as websocketd does) up to TOTAL_BYTES, then a close frame.
Its per-frame cost is a few byte joins, so the rate the reader reaches is the reader's own.
Docs: https://www.rfc-editor.org/rfc/rfc6455#section-5.2
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import sys

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CHUNK_BYTES = 64 * 1024
LINE = b"1234567"  # 7 characters + the newline websocketd strips


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, length))
    elif length < 1 << 16:
        head = bytes((0x80 | opcode, 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + length.to_bytes(8, "big")
    return head + payload


def handshake(conn: socket.socket) -> None:
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(4096)
    key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")


def blast_ccx(conn: socket.socket, total: int, sample: bytes) -> None:
    conn.recv(65536)  # the execute request
    conn.sendall(frame(json.dumps({"jsonrpc": "2.0", "id": 1, "result": {
        "session_id": "s1", "status": "started", "pid": 1, "pgid": 1}}).encode()))
    chunk = sample[:CHUNK_BYTES]
    text = chunk.decode("utf-8", errors="ignore")
    raw = len(text.encode())
    escaped = json.dumps(text, ensure_ascii=False).encode()
    prefix = (b'{"jsonrpc":"2.0","method":"process.output","params":{"session_id":"s1",'
              b'"stream":"stdout","data":' + escaped + b',"seq":')
    sent, seq = 0, 0
    while sent < total:
        conn.sendall(frame(prefix + str(seq).encode() + b"}}"))
        sent += raw
        seq += 1
    conn.sendall(frame(json.dumps({"jsonrpc": "2.0", "method": "process.completed", "params": {
        "session_id": "s1", "status": "exited", "exit_code": 0, "signal": None,
        "duration_s": 0, "stdout_bytes": sent, "stderr_bytes": 0}}).encode()))


def blast_lines(conn: socket.socket, total: int) -> None:
    block = frame(LINE) * 8192
    per_block = (len(LINE) + 1) * 8192
    sent = 0
    while sent < total:
        conn.sendall(block)
        sent += per_block
    conn.sendall(frame((1000).to_bytes(2, "big"), opcode=0x8))


def main() -> None:
    mode, port_file, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
    listener = socket.create_server(("127.0.0.1", 0))
    with open(port_file, "w") as out:
        out.write(str(listener.getsockname()[1]))
    conn, _ = listener.accept()
    handshake(conn)
    if mode == "ccx":
        with open(sys.argv[4], "rb") as sample:
            blast_ccx(conn, total, sample.read(CHUNK_BYTES))
    else:
        blast_lines(conn, total)
    try:
        while conn.recv(65536):  # until the reader closes
            pass
    except OSError:
        pass
    conn.close()


if __name__ == "__main__":
    main()
