"""Where the service may open outbound connections on a tenant's behalf (notify_url webhooks).

A tenant-chosen URL must not reach the service's own network: loopback, private, link-local (cloud
metadata), shared, multicast, reserved and unspecified addresses are refused, in every spelling (the
resolver turns `2130706433`, `0x7f.1`, `0177.0.0.1` into 127.0.0.1; IPv4-mapped IPv6 is unwrapped).
Operators who need internal hooks list CIDRs or host names in ADAPTD_WEBHOOK_ALLOWED_HOSTS.

`resolve_checked` resolves a host once and returns the checked addresses; the sender connects to one of
those (not to the name again), so a DNS answer that changes between check and connect (rebinding)
cannot redirect the request."""
from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class NotAllowed(ValueError):
    """The URL's host is, or resolves to, an address the service must not call."""


def _allow_list(allowed: str) -> tuple[list[ipaddress.IPv4Network | ipaddress.IPv6Network], set[str]]:
    nets, names = [], set()
    for item in filter(None, (p.strip() for p in allowed.split(","))):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            names.add(item.lower().rstrip("."))
    return nets, names


def is_public(addr: Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


def resolve_checked(host: str, port: int, allowed: str = "") -> list[Address]:
    """Every address `host` resolves to, once; NotAllowed when any of them is not public and not on the
    operator's allow-list (a name with one bad address is refused as a whole)."""
    host = host.strip("[]").lower().rstrip(".")
    if not host:
        raise NotAllowed("the URL has no host")
    nets, names = _allow_list(allowed)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise NotAllowed(f"host {host!r} does not resolve: {exc}") from None
    addrs = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))
    for addr in addrs:
        if not (is_public(addr) or host in names or any(addr in net for net in nets)):
            raise NotAllowed(f"host {host!r} is or resolves to {addr}, which is not a public address; "
                             "operators allow internal hooks with ADAPTD_WEBHOOK_ALLOWED_HOSTS")
    return addrs


def check_url(url: str, allowed: str = "") -> list[Address]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise NotAllowed("only http and https URLs are allowed")
    return resolve_checked(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), allowed)
