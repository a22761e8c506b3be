"""Who may publish, and which ``Host`` names the daemon answers to.

Two checks, both on ``POST /publish`` and ``GET /ws``:

``HostPolicy`` (DNS rebinding)
    A page on ``http://evil.example`` whose name is re-pointed at the Pi's address makes the
    browser talk to the daemon with ``Host: evil.example`` and ``Origin: http://evil.example``,
    so comparing Origin with Host proves nothing. The daemon therefore answers only to names it
    knows: ``localhost``, the machine's host names, the bind address and every ``--allowed-host``.
    An IP literal is always accepted: a browser sends one only for a URL that names the address
    itself, which a rebinding page cannot do for its own origin.
``publish_allowed`` (who may publish)
    A matching bearer token always may; a loopback peer may without one unless
    ``trust_loopback`` is off. Behind a reverse proxy on the same host every request arrives
    from loopback, so there ``--no-trust-loopback`` makes the token the only way in.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def publish_allowed(
    peer: str | None, authorization: str | None, token: str | None, *, trust_loopback: bool = True
) -> bool:
    """May this request publish? A matching bearer token always may; loopback may without one."""
    if token and authorization:
        scheme, _, credential = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode(), token.encode()):
            return True
    return trust_loopback and peer is not None and is_loopback(peer)


def host_name(header: str) -> str | None:
    """The name in a ``Host`` header (lower case, no port, no brackets, no trailing dot)."""
    try:
        name = urllib.parse.urlsplit("//" + header.strip()).hostname
    except ValueError:
        return None
    return name.rstrip(".") if name else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


def machine_names() -> set[str]:
    names = {"localhost"}
    for get in (socket.gethostname, socket.getfqdn):
        try:
            names.add(get())
        except OSError:
            pass
    return {n.lower().rstrip(".") for n in names if n}


@dataclass(frozen=True)
class HostPolicy:
    names: frozenset[str]

    @classmethod
    def for_daemon(cls, bind: str | None = None, allowed: Iterable[str] = ()) -> HostPolicy:
        """localhost, this machine's names, the bind address and ``allowed`` (``--allowed-host``)."""
        names = machine_names() | {a.lower().rstrip(".") for a in allowed if a}
        if bind:
            names.add(bind.lower().rstrip("."))
        return cls(frozenset(names))

    def allows(self, header: str | None) -> bool:
        """A request without Host (HTTP/1.0, never a browser) passes; h11 demands one for 1.1."""
        if header is None:
            return True
        name = host_name(header)
        return name is not None and (_is_ip(name) or name in self.names)
