"""Who may use the viewer: the per-session token gate in front of viser's websockets server (:func:`check_request`,
:func:`serve_gated`), loopback addresses (:func:`is_loopback`), the folders a path typed in the page may name
(:func:`path_inside`), and what the page may say about a file it could not use (:func:`page_error`).

viser accepts a websocket from any page and any local process: a web page the user visits could connect to
http://127.0.0.1:8080 and drive the viewer (open files, load a model.pt).  Every request must carry a per-session
token in its path (the URL the viewer prints: http://host:port/<token>/), and a websocket from a browser must come
from a page served by this server (its Origin is the Host it connected to, and that host is one this server is
served as).  viser 1.1.1 has no hook for this: its websockets server is created with a process_request function
of its own; :func:`serve_gated` wraps it (``_token_gate``) for the duration of the ViserServer constructor (which
returns only once the server is listening), so every handshake passes the gate first.
"""
from __future__ import annotations

import dataclasses as dc
import hmac
import ipaddress
import os
import threading
from pathlib import Path
from typing import Callable, Sequence, TypeVar
from urllib.parse import urlsplit

from utils.core.torch_files import UnsafeFileError

T = TypeVar("T")
_SERVE_PATCH = threading.Lock()


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _forbidden(text: str):
    # websockets (viser's server) imported here, as in _token_gate: only the running server needs it
    from websockets.datastructures import Headers
    from websockets.http11 import Response

    body = (text + "\n").encode()
    return Response(403, "Forbidden", Headers({"Content-Type": "text/plain; charset=utf-8",
                                                "Content-Length": str(len(body))}), body)


def _host_name(netloc: str) -> str:
    """'127.0.0.1:8080' -> '127.0.0.1', '[::1]:8080' -> '::1', 'localhost' -> 'localhost' (lower case)."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:].split("]")[0]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def check_request(path: str, headers, token: str, host: str) -> tuple[str | None, str]:
    """(refusal or None, the path with the token removed) for one HTTP or websocket request to the viewer.

    ``path``: the request target; ``headers``: its headers (Host, Origin, Upgrade); ``token``: the session token;
    ``host``: the address the server binds (--host).  Refused: a path that does not start with /<token>; a Host that
    is not a name of this server (DNS rebinding: a page of another site whose name resolves to 127.0.0.1), unless it
    binds every interface; a browser websocket (it always sends Origin) whose Origin is not http://<Host>."""
    target, _, query = path.partition("?")
    first, _, rest = target.lstrip("/").partition("/")
    if not hmac.compare_digest(first.encode(), token.encode()):
        return "this viewer needs the address it printed (http://host:port/<session token>/)", path
    hosts, origins = _all(headers, "Host"), _all(headers, "Origin")
    if len(hosts) != 1 or len(origins) > 1:
        return "malformed request (one Host header, at most one Origin)", path
    req_host, origin = hosts[0], (origins[0] if origins else None)
    if host not in ("0.0.0.0", "::", "") and _host_name(req_host) not in _served_names(host):
        return f"unknown host {req_host!r}", path
    if headers.get("Upgrade", "").lower() == "websocket" and origin is not None:
        o = urlsplit(origin)
        if o.scheme not in ("http", "https") or o.netloc.lower() != req_host.lower():
            return f"websocket from another origin ({origin!r}) refused", path
    return None, "/" + rest + (f"?{query}" if query else "")


def _all(headers, name: str) -> list[str]:
    return list(headers.get_all(name)) if hasattr(headers, "get_all") else \
        ([headers[name]] if headers.get(name) is not None else [])


def _served_names(host: str) -> set[str]:
    names = {host.lower().strip("[]")}
    if is_loopback(host):
        names |= {"127.0.0.1", "localhost", "::1"}
    return names


def _token_gate(token: str, host: str):
    """A replacement of websockets.asyncio.server.serve that puts :func:`check_request` in front of viser's own
    process_request (the static page), handing it the path without the token."""
    import websockets.asyncio.server as wss  # viser's server stack: imported only when a server starts

    real = wss.serve

    def serve(handler, *args, process_request=None, **kwargs):
        def gate(connection, request):
            refusal, path = check_request(request.path, request.headers, token, host)
            if refusal is not None:
                return _forbidden(f"identity-field viewer: {refusal}")
            if process_request is None:
                return None
            return process_request(connection, dc.replace(request, path=path))

        return real(handler, *args, process_request=gate, **kwargs)

    return real, serve


def serve_gated(start: Callable[[], T], token: str, host: str) -> T:
    """``start()`` (the ViserServer constructor, which returns once the server listens) with every websocket server
    it creates gated by :func:`check_request` for ``token`` and ``host`` (the address it binds)."""
    import websockets.asyncio.server as wss  # viser's server stack: imported only when a server starts

    with _SERVE_PATCH:  # viser creates its websockets server inside the constructor: gate it (_token_gate)
        real, wss.serve = _token_gate(token, host)
        try:
            return start()
        finally:
            wss.serve = real


def path_inside(path: Path, roots: Sequence[Path]) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside one of ``roots``."""
    try:
        real = Path(os.path.realpath(path))
    except (OSError, ValueError):
        return False
    return any(real == r or real.is_relative_to(r) for r in roots)


def page_error(exc: BaseException, kind: str) -> str:
    """What the page says about a file that could not be used: a fixed phrase per kind of failure, never the
    loader's own text (which can quote a file's bytes); the terminal gets the full message."""
    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, UnsafeFileError):
        return "refused: it holds Python objects, not only tensors (loading it could run code)"
    if isinstance(exc, (ValueError, KeyError, IndexError)):
        return f"not a {kind} that fits (details in the terminal)"
    return f"cannot be read as a {kind} (details in the terminal)"


