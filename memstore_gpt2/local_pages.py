"""Which requests a server bound to a loopback address answers: the guards ``memstore serve`` and
``memstore mindset`` share.

Any page the user's browser opens can send requests to a local port. A DNS-rebinding page reaches
it under a name of its own (``Host: evil.example``), so a loopback server answers only requests
whose ``Host`` is a loopback name; Mindset, whose page calls its own API, also requires its port
and, when the browser sends one, an ``Origin`` of that page.
"""

from __future__ import annotations

from urllib.parse import urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def split_host(host: str) -> tuple[str, str | None]:
    """``(name, port or None)`` of a ``Host`` header, the name lower-cased and an IPv6
    address's brackets removed (``[::1]:8000`` -> ``("::1", "8000")``)."""
    host = host.strip()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name.lower(), rest[1:] if rest.startswith(":") and rest[1:] else None
    name, sep, port = host.rpartition(":")
    return (name.lower(), port or None) if sep else (host.lower(), None)


def is_loopback_host(host: str, port: str | None = None) -> bool:
    """Whether a ``Host`` header names a loopback address -- and, with ``port``, this port (a
    header without one means 80), so a page of another local server is refused too."""
    name, given = split_host(host)
    return name in LOOPBACK_NAMES and (port is None or (given or "80") == port)


def is_loopback_origin(origin: str, port: str) -> bool:
    """Whether an ``Origin`` header is the page of a loopback server on ``port`` over http."""
    try:
        parts = urlsplit(origin)
        given = parts.port or 80
    except ValueError:  # a port that is not a number
        return False
    return (
        parts.scheme == "http" and (parts.hostname or "") in LOOPBACK_NAMES and str(given) == port
    )
