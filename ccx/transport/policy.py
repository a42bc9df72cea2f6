"""Who may talk to the server: the token, the Origin and the Host rules, as pure checks.

Inputs: `Settings` and a parsed request head (`Head`) or one header value.
Outputs: booleans; the callers answer 401 (token), 403 (origin, host).
Browsers cannot set `Authorization` on a WebSocket, so the token may also come as an offered
subprotocol `ccx.bearer.<base64url of the token, no padding>` (as the Kubernetes API server
takes `base64url.bearer.authorization.k8s.io.<token>`); the server then selects only the
non-secret `ccx` (`BROWSER_SUBPROTOCOL`), never echoing the token. A page served by ccx
itself (the console, `ccx.transport.ui`) is same-origin: an Origin equal to
`http(s)://<Host header>` is accepted on any bind (on a loopback bind the Host rule has
already refused foreign names, so a rebound name never gets this far).
The Host rule (DNS-rebinding defence): on a loopback bind a browser page on a name re-pointed
at 127.0.0.1 still sends its own name as `Host`; only loopback names and literals (and
`CCX_ALLOWED_HOSTS`) are served. The Host value is never resolved: that is what rebinding
controls. On other binds the token is the defence and any Host is served.
Docs: https://www.rfc-editor.org/rfc/rfc9110#section-7.2 (Host)
      https://www.rfc-editor.org/rfc/rfc6454 (Origin)
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from urllib.parse import parse_qs, urlsplit

from ccx.config import Settings
from ccx.transport.http import Head

LOOPBACK_ORIGIN_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# Names that /etc/hosts conventionally maps to loopback; a browser sends them only when the
# user typed them, never for a page on another site.
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost",
                            "ip6-loopback"})


BROWSER_SUBPROTOCOL = "ccx"  # what the server selects for a browser (native protocol)
BEARER_SUBPROTOCOL_PREFIX = "ccx.bearer."  # + base64url(token) without "=" padding


def subprotocol_tokens(head: Head) -> list[bytes]:
    """The tokens offered as `ccx.bearer.<base64url>` subprotocols (undecodable ones are
    skipped)."""
    tokens = []
    for offered in (head.header("sec-websocket-protocol") or "").split(","):
        offered = offered.strip()
        if not offered.startswith(BEARER_SUBPROTOCOL_PREFIX):
            continue
        encoded = offered[len(BEARER_SUBPROTOCOL_PREFIX):]
        try:
            tokens.append(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
        except (binascii.Error, ValueError):
            continue
    return tokens


def token_ok(settings: Settings, head: Head) -> bool:
    """True when no token is set, or the request carries it (Bearer header, `ccx.bearer.`
    subprotocol, or ?token=)."""
    if settings.token is None:
        return True
    expected = settings.token.encode()
    auth = head.header("authorization") or ""
    if auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip().encode(), expected):
        return True
    if any(hmac.compare_digest(token, expected) for token in subprotocol_tokens(head)):
        return True
    query = parse_qs(urlsplit(head.target).query)
    return any(hmac.compare_digest(v.encode(), expected) for v in query.get("token", []))


def same_origin(origin: str, host: str | None) -> bool:
    """The Origin is this server as the browser addressed it: `http(s)://<Host>`."""
    if host is None or split_host(host) is None:
        return False
    return origin.lower() in (f"http://{host.strip().lower()}", f"https://{host.strip().lower()}")


def origin_ok(settings: Settings, origin: str | None, host: str | None = None) -> bool:
    """No Origin, a loopback origin, the server's own (same as the *host* header: its
    console), or one listed in CCX_ALLOWED_ORIGINS (or `*`)."""
    if origin is None:
        return True
    if "*" in settings.allowed_origins or origin in settings.allowed_origins:
        return True
    if same_origin(origin, host):
        return True
    try:
        parts = urlsplit(origin)
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError:
        return False
    netloc = parts.netloc
    host = netloc if netloc.startswith("[") else netloc.split(":", 1)[0]
    if netloc.startswith("["):  # "[::1]" or "[::1]:port", nothing else after the bracket
        end = netloc.find("]")
        host, rest = netloc[: end + 1], netloc[end + 1:]
        if end < 0 or (rest and not rest.startswith(":")):
            return False
    if "@" in netloc or parts.path not in ("", "/") or parts.query or parts.fragment:
        return False  # an Origin is scheme://host[:port], nothing more
    return parts.scheme in ("http", "https") and host.lower() in LOOPBACK_ORIGIN_HOSTS


def split_host(value: str) -> str | None:
    """The host part of a `Host` header value (`name[:port]`, `[v6][:port]`), lower case; None
    when the value is malformed (user info, path, a port that is not a number)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end], value[end + 1:]
        if end < 0:
            return None
    else:
        host, _, port = value.partition(":")
        rest = f":{port}" if _ else ""
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None
    if not host or any(c in host for c in "@/\\?# "):
        return None
    return host


def host_ok(settings: Settings, value: str | None, *, loopback_bind: bool) -> bool:
    """The `Host` header *value* may be served: any on a non-loopback bind; on a loopback bind
    a loopback name or literal, the bind host itself, or one in CCX_ALLOWED_HOSTS (`*` = any).
    No Host at all (HTTP/1.0) is allowed: browsers always send one."""
    if not loopback_bind or value is None or "*" in settings.allowed_hosts:
        return True
    host = split_host(value)
    if host is None:
        return False
    allowed = {h.lower() for h in settings.allowed_hosts}
    if host in LOOPBACK_NAMES or host in allowed or host == settings.host.strip("[]").lower():
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _self_check() -> None:
    import h11

    def head(target: str, *headers: tuple[str, str]) -> Head:
        request = h11.Request(method="GET", target=target, headers=[("Host", "x"), *headers])
        return Head(request, b"")

    secret = Settings(token="s3cret", state_dir="")
    assert token_ok(Settings(state_dir=""), head("/ws"))
    assert token_ok(secret, head("/ws", ("Authorization", "Bearer s3cret")))
    assert token_ok(secret, head("/ws?token=s3cret")) and not token_ok(secret, head("/ws"))
    plain = Settings(state_dir="")
    assert origin_ok(plain, None) and origin_ok(plain, "http://localhost:3000")
    assert not origin_ok(plain, "https://evil.example") and not origin_ok(plain, "http://a@localhost")
    assert host_ok(plain, "127.0.0.1:8003", loopback_bind=True)
    assert not host_ok(plain, "rebind.example", loopback_bind=True)
    assert host_ok(plain, "rebind.example", loopback_bind=False)
    assert split_host("[::1]:80") == "::1" and split_host("a/b") is None
    print("ccx.transport.policy: PASS")


if __name__ == "__main__":
    _self_check()
