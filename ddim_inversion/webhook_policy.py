"""Where a webhook may be delivered: one policy for the gateway and the worker (stdlib only).

A `webhook_url` is delivered to only if

1. it is an http or https URL of at most `MAX_URL_CHARS` characters, with no user info,
   no space and no control character (urlsplit drops CR, LF and tab silently: the URL
   stored would not be the URL delivered to);
2. its port is among the allowed ports (`DEFAULT_PORTS` unless a setting lists others);
3. its host is in the gateway's allow-list (exactly, or `*.suffix` for any subdomain);
4. every address its host resolves to is a public unicast address, unless private targets
   are explicitly allowed: loopback, link-local (169.254.169.254 among them), private,
   shared, multicast, unspecified and reserved addresses are refused, and so is an IPv6
   address that carries an IPv4 one (IPv4-mapped or -compatible, Teredo) or embeds a
   refused one (6to4, NAT64).

The gateway checks 1-3 at submit, and 4 when the host is an IP literal; the worker checks
1, 2 and 4 at every attempt and then connects to the addresses it checked, never looking
the name up a second time, so a name rebound to an inside address after the check is
never reached.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORTS: tuple[int, ...] = (80, 443)
"""Ports a webhook may use unless a setting lists others."""

MAX_URL_CHARS = 2048
"""Longest `webhook_url` accepted."""

SCHEMES: dict[str, int] = {"http": 80, "https": 443}
"""The schemes a webhook may use, with their default ports."""

NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
"""RFC 6052's well-known NAT64 prefix: the last 32 bits are the IPv4 address reached."""

NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
"""RFC 8215's local-use NAT64 prefix: translated inside one network only."""

NOT_GLOBAL: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (ipaddress.IPv4Network("100.64.0.0/10"), "a shared (carrier-grade NAT) address"),
    (ipaddress.IPv4Network("192.0.0.0/24"), "an IETF protocol assignment address"),
)
"""Ranges no webhook receiver lives in that `ipaddress` flags differently across Pythons."""


class WebhookRefused(Exception):
    """A webhook URL or address the policy refuses; the message says why."""


@dataclass(frozen=True)
class Target:
    """A checked webhook URL, split into what a connection needs."""

    url: str
    scheme: str
    host: str
    """Lower-case host name, or an IP literal without brackets."""
    port: int
    path: str
    """Path and query sent on the request line (at least `/`)."""


def parse_ports(value: Any) -> Any:
    """Ports from a setting: a comma-separated string or a JSON list (as variables give them)."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text.startswith("[") else [p for p in text.split(",") if p]
    if isinstance(value, (list, tuple)):
        ports = tuple(int(str(p).strip()) for p in value)
        bad = [p for p in ports if not 1 <= p <= 65535]
        if bad:
            raise ValueError(f"ports must lie in 1..65535, not {bad}")
        return ports
    return value


def parse(url: str, ports: Iterable[int] = DEFAULT_PORTS) -> Target:
    """The URL split into a Target if its form and port are allowed (steps 1 and 2)."""
    if len(url) > MAX_URL_CHARS:
        raise WebhookRefused(f"longer than {MAX_URL_CHARS} characters")
    bad = next((c for c in url if c <= " " or "\x7f" <= c <= "\x9f"), None)
    if bad is not None:
        raise WebhookRefused(
            f"must not contain spaces or control characters ({bad!r}); percent-encode them"
        )
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError as exc:
        raise WebhookRefused(f"not a valid URL: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise WebhookRefused(f"must be an {' or '.join(SCHEMES)} URL")
    if not host:
        raise WebhookRefused("has no host")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("must not carry a user name or password")
    port = SCHEMES[parts.scheme] if port is None else port
    allowed = tuple(sorted(set(ports)))
    if port not in allowed:
        raise WebhookRefused(
            f"port {port} is not allowed; allowed: {', '.join(map(str, allowed)) or 'none'}"
        )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url, parts.scheme, host, port, path)


def host_allowed(host: str, allowed_hosts: Iterable[str]) -> bool:
    """Whether an entry names `host` exactly, or as `*.suffix` one of its subdomains."""
    for entry in allowed_hosts:
        entry = entry.lower()
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif host == entry:
            return True
    return False


def literal(host: str) -> IPAddress | None:
    """The address a host names literally (`127.1` and `0x7f.1` forms too), else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    # inet_aton reads the legacy shorthand that resolvers also accept: 2130706433 is 127.0.0.1.
    if host and all(c in "0123456789abcdefx." for c in host) and host[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def refusal(address: IPAddress) -> str | None:
    """Why `address` is not a public unicast target (None when it is one)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        if address.teredo is not None:
            return "a Teredo tunnel address"
        if address in NAT64_LOCAL:
            return "a local-use NAT64 address"
        embedded = address.sixtofour
        if embedded is None and address in NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            # A translator or relay reaches the embedded IPv4 address: judge that one.
            inner = refusal(embedded)
            return None if inner is None else f"an IPv6 address embedding {embedded}, {inner}"
        if address.is_site_local:
            return "a site-local address"
    for name, matches in (
        ("a loopback address", address.is_loopback),
        ("a link-local address", address.is_link_local),
        ("a multicast address", address.is_multicast),
        ("the unspecified address", address.is_unspecified),
        ("a private address", address.is_private),
        ("a reserved address", address.is_reserved),
    ):
        if matches:
            return name
    for network, name in NOT_GLOBAL:
        if address in network:
            return name
    if not address.is_global:
        return "not a globally routable address"
    return None


def check_address(address: IPAddress, allow_private: bool) -> None:
    """Raise WebhookRefused unless `address` may be reached (step 4, one address)."""
    if allow_private:
        return
    reason = refusal(address)
    if reason is not None:
        raise WebhookRefused(f"{address} is {reason}")


def check_submission(
    url: str,
    allowed_hosts: Iterable[str],
    ports: Iterable[int] = DEFAULT_PORTS,
    allow_private: bool = False,
) -> Target:
    """The gateway's check at submit: steps 1-3, and step 4 for an IP literal host."""
    allowed_hosts = tuple(allowed_hosts)
    if not allowed_hosts:
        raise WebhookRefused("webhooks are not enabled on this service")
    target = parse(url, ports)
    if not host_allowed(target.host, allowed_hosts):
        raise WebhookRefused(f"the host {target.host!r} is not among the allowed webhook hosts")
    address = literal(target.host)
    if address is not None:
        check_address(address, allow_private)
    return target


def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


resolver: Callable[[str, int], list[str]] = _getaddrinfo
"""How names become addresses (socket.getaddrinfo); tests point it at chosen addresses."""


def resolve(target: Target, allow_private: bool) -> list[IPAddress]:
    """The worker's step 4: the host's addresses, each checked; refused if any is refused.

    Refusing when any address is refused, rather than skipping it, keeps a name that mixes
    a public and an inside address from being reached through whichever answers first.
    OSError (socket.gaierror) when the name does not resolve.
    """
    found: list[IPAddress] = []
    for text in resolver(target.host, target.port):
        address = ipaddress.ip_address(text)
        check_address(address, allow_private)
        if address not in found:
            found.append(address)
    if not found:
        raise OSError(f"{target.host} resolved to no address")
    return found
