"""Where the listeners are, as a browser must name them.

From Twisted endpoint strings (``[upvoot] listen``, ``admin_listen``):
whether the admin listener is on loopback only (the console then needs no
explicit token file), the URL ``upvoot console-url`` prints, and the
public listener's ``ws[s]://host:port`` origin the page calls ``/voice/``
on, named with the host the browser used for the console (what reaches
the admin listener reaches a wildcard or loopback public listener on the
same machine, by the same name).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable, NamedTuple

from twisted.internet.endpoints import _parse

#: A Host header's name: a DNS name, an IPv4 address or a bracketed IPv6 address.
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\]")
_WILDCARDS = ("", "0.0.0.0", "::", "0:0:0:0:0:0:0:0")


class Listener(NamedTuple):
    kind: str  # "tcp" or "ssl" (TLS); "unix"; "" for anything else (systemd:, ...)
    interface: str  # "" = every address
    port: int | None
    proxied: bool  # haproxy: a load balancer in front speaks to it


def parse_listener(description: str) -> Listener:
    """What a Twisted server endpoint string listens on (best effort: a
    string Twisted would refuse gives ``kind ""``)."""
    try:
        args, kw = _parse(description)
    except Exception:
        return Listener("", "", None, False)
    proxied = bool(args) and args[0].lower() == "haproxy"
    if proxied:  # haproxy:tcp:8080:interface=... (the inner endpoint's colons were split as well)
        try:
            args, kw = _parse(description.split(":", 1)[1])
        except Exception:
            return Listener("", "", None, True)
    kind = args[0].lower() if args else ""
    if kind == "unix":
        return Listener("unix", "", None, proxied)
    if kind not in ("tcp", "tcp6", "ssl") or len(args) < 2:
        return Listener("", "", None, proxied)
    try:
        port = int(args[1])
    except ValueError:
        return Listener("", "", None, proxied)
    interface = kw.get("interface", args[2] if kind != "ssl" and len(args) > 2 else "")
    return Listener("ssl" if kind == "ssl" else "tcp", interface.strip("[]"), port, proxied)


def is_loopback(interface: str) -> bool:
    if interface.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def loopback_only(description: str) -> bool:
    """Whether only this machine can connect to the listener: a TCP/TLS port
    on a loopback interface, or a UNIX socket; never one behind a load
    balancer (``haproxy:``: its clients are elsewhere)."""
    listener = parse_listener(description)
    if listener.proxied:
        return False
    return listener.kind == "unix" or (listener.kind in ("tcp", "ssl") and is_loopback(listener.interface))


def _host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def admin_url(description: str) -> str | None:
    """``http[s]://host:port/console/`` of the admin listener, or None when a
    browser cannot be pointed at it (a UNIX socket, systemd's socket)."""
    listener = parse_listener(description)
    if listener.kind not in ("tcp", "ssl") or listener.port is None:
        return None
    host = "127.0.0.1" if listener.interface in _WILDCARDS else listener.interface
    scheme = "https" if listener.kind == "ssl" else "http"
    return f"{scheme}://{_host_port(host, listener.port)}/console/"


def browser_host(host_header: str | None) -> str | None:
    """The host name of a request's Host header (no port), if it is a plain
    host name or address; None for anything else."""
    if not host_header:
        return None
    host = host_header.strip()
    if host.startswith("["):
        host = host.split("]", 1)[0] + "]"
    else:
        host = host.split(":", 1)[0]
    return host if _HOSTNAME.fullmatch(host) else None


def voice_origin(endpoints: Iterable[str], host: str | None, secure: bool) -> str | None:
    """``ws[s]://host:port`` of the public listener a browser that reached
    the console at ``host`` (over TLS if ``secure``) can call. A listener of
    the page's own scheme is preferred (a TLS page may not open ``ws:``
    elsewhere than loopback). A listener on a wildcard or loopback
    interface is named by ``host``, one on a given address by that address.
    None when no listener is a TCP or TLS port."""
    candidates = [listener for listener in map(parse_listener, endpoints)
                  if listener.kind in ("tcp", "ssl") and listener.port]
    if not candidates:
        return None
    candidates.sort(key=lambda listener: (listener.kind == "ssl") != secure)  # stable: the ini's order otherwise
    listener = candidates[0]
    if listener.interface in _WILDCARDS or is_loopback(listener.interface):
        name = host or "127.0.0.1"
    else:
        name = listener.interface
    scheme = "wss" if listener.kind == "ssl" else "ws"
    return f"{scheme}://{_host_port(name, listener.port)}"
