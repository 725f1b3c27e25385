"""Where a download may go: public http(s) addresses only, unless the LAN is allowed.

A link file is input from anyone who can drop a file into an inbox, so a download must
not reach the machine itself, the local network or a cloud metadata service (server-side
request forgery). The check is made on the addresses a name resolves to, at the moment a
connection is made: the first request, every redirect and every page or media URL a page
points to alike, whatever form the link wrote the address in (decimal, hex, IPv6-mapped).
It is installed only in the download process (traxd.pipeline.ytdlp_worker).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

WEB_SCHEMES = ("http", "https")
ALLOW_HINT = "set allow_private = true in [download] to fetch from your own network"

Resolver = Callable[..., list[Any]]


class AddressRefused(Exception):
    """A download would connect to an address that is not public, or leave http(s)."""


def refusal(address: str) -> str | None:
    """Why a resolved address is not fetched by default; None when it is public."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
        address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ip.ipv4_mapped or ip.sixtofour or ip
    kinds = (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
             ("unspecified", ip.is_unspecified), ("multicast", ip.is_multicast),
             ("private", ip.is_private), ("reserved", ip.is_reserved),
             ("non-public", not ip.is_global))
    for kind, matches in kinds:
        if matches:
            return f"a {kind} address"
    return None


def guarded(resolve: Resolver) -> Resolver:
    """socket.getaddrinfo that keeps only public addresses and refuses a name that has none."""

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        results = resolve(host, port, *args, **kwargs)
        public = [r for r in results if refusal(str(r[4][0])) is None]
        if results and not public:
            address = str(results[0][4][0])
            name = host.decode() if isinstance(host, bytes) else str(host)
            where = address if name == address else f"{name} ({address})"
            raise AddressRefused(f"not fetched: {where} is {refusal(address)}; downloads "
                                 f"reach only public addresses ({ALLOW_HINT})")
        return public

    return getaddrinfo


def install(allow_private: bool) -> None:
    """Guard every name resolution of this process (the download process only)."""
    if not allow_private:
        socket.getaddrinfo = guarded(socket.getaddrinfo)


def check_redirect(url: str) -> None:
    """A redirect may lead only to another http(s) link (not ftp:, file:, data:)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme and scheme not in WEB_SCHEMES:
        raise AddressRefused(f"not fetched: the server redirected to {url[:200]!r}; only "
                             "http and https links are downloaded")
