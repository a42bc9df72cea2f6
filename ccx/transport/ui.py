"""The web console's files (package data `ccx/ui/`), served on the API's port.

Inputs: a parsed request head for `/` or `/ui/...`, and `Settings` (whether a token is set).
Outputs: `/` redirects to `/ui/`; `/ui/` is `index.html`; `/ui/<name>` a file of the
package (a fixed set of suffixes, no directory walks); `/ui/meta.json` says whether the page
must ask for a token (never the token). No token is needed for these: the page holds no
secret, and everything it does goes through the WebSocket, which needs the token.

Every answer carries a strict Content-Security-Policy: scripts only from this origin (no
inline script, no eval), WebSocket and fetch only to this origin, no frames, no plugins,
no forms posting elsewhere. Styles: files from this origin, plus `<style>` elements that
carry this response's nonce: xterm.js writes its cell metrics and theme into `<style>`
elements it creates, so the console's script sets the nonce (read from its own `<script>`
element) on the ones xterm creates; no inline `style` attribute is allowed (the console
sets styles through CSSOM, which CSP does not govern). The nonce is fresh per response.
Docs: https://www.w3.org/TR/CSP3/ and https://developer.mozilla.org/en-US/docs/Web/HTTP/CSP
      https://docs.python.org/3/library/importlib.resources.html
"""

from __future__ import annotations

import json
import secrets
from importlib import resources

import trio

from ccx import __version__
from ccx.config import Settings
from ccx.transport.http import Head, send_plain

UI_PREFIX = "/ui/"
NONCE_MARK = b"{{nonce}}"  # in index.html: replaced by the response's nonce
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


def csp(nonce: str) -> str:
    """The Content-Security-Policy of every console response."""
    return "; ".join([
        "default-src 'none'",
        "script-src 'self'",
        f"style-src 'self' 'nonce-{nonce}'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])


def security_headers(nonce: str) -> list[tuple[str, str]]:
    return [
        ("Content-Security-Policy", csp(nonce)),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("X-Frame-Options", "DENY"),
        ("Cache-Control", "no-cache"),
    ]


def _read(name: str) -> bytes | None:
    """A file of the console package, or None: only plain names with a known suffix, in the
    package or its `vendor/...` folders (no `..`, no absolute path, no hidden file)."""
    parts = name.split("/")
    if not name or any(not p or p.startswith(".") for p in parts):
        return None
    if not any(name.endswith(suffix) for suffix in CONTENT_TYPES):
        return None
    node = resources.files("ccx.ui")
    for part in parts:
        node = node.joinpath(part)
    try:
        return node.read_bytes() if node.is_file() else None
    except OSError:
        return None


def is_ui_path(path: str) -> bool:
    return path in ("/", "/ui") or path.startswith(UI_PREFIX)


async def serve_ui(stream: trio.abc.SendStream, head: Head, settings: Settings) -> None:
    """Answer one console request (GET or HEAD) on *stream*."""
    path = head.path
    nonce = secrets.token_urlsafe(16)
    headers = security_headers(nonce)
    if head.method not in ("GET", "HEAD"):
        await send_plain(stream, 405, "method not allowed\n", headers=[("Allow", "GET"),
                                                                       *headers])
        return
    if path in ("/", "/ui"):
        await send_plain(stream, 302, "", headers=[("Location", UI_PREFIX), *headers])
        return
    name = path[len(UI_PREFIX):] or "index.html"
    if name == "meta.json":
        body = json.dumps({"token_required": settings.token is not None,
                           "version": __version__})
        await send_plain(stream, 200, body, content_type="application/json",
                         headers=headers, head_only=head.method == "HEAD")
        return
    data = _read(name)
    if data is None:
        await send_plain(stream, 404, "not found\n", headers=headers)
        return
    if name == "index.html":
        data = data.replace(NONCE_MARK, nonce.encode())
    suffix = name[name.rfind("."):]
    await send_plain(stream, 200, data, content_type=CONTENT_TYPES[suffix], headers=headers,
                     head_only=head.method == "HEAD")


if __name__ == "__main__":
    assert _read("index.html") is not None and NONCE_MARK in (_read("index.html") or b"")
    assert _read("vendor/xterm/xterm.mjs") is not None
    for bad in ("../server.py", "vendor/../app.js", "/etc/passwd", ".hidden.js", "__init__.py",
                "", "vendor//xterm.mjs", "nope.js"):
        assert _read(bad) is None, bad
    policy = csp("abc")
    assert "'unsafe-inline'" not in policy and "'nonce-abc'" in policy
    assert is_ui_path("/") and is_ui_path("/ui/app.js") and not is_ui_path("/uix")
    print("ccx.transport.ui: PASS")
