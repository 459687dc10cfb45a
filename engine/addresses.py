"""Which network addresses the image fetcher may connect to (the SSRF guard).

A URL in a document is attacker-controlled input: without this guard, inserting
`{"image": "http://169.254.169.254/latest/meta-data/..."}` would make modelgate read the
cloud credentials of the machine it runs on. The fetcher resolves every host itself,
checks every address here, and then connects only to addresses that passed (see
`engine.fetch`), so a DNS answer that changes between check and connect cannot slip
through.

Pure functions over `ipaddress` objects plus one async resolver; no httpx here.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from engine.errors import PredictionError

__all__ = [
    "METADATA_ADDRESSES",
    "AddressPolicy",
    "BlockedAddress",
    "IPAddress",
    "resolve_checked",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Instance metadata services. Never fetched, whatever allow_private/allow_hosts say:
# AWS/GCP/Azure/OpenStack (169.254.169.254), AWS over IPv6 (fd00:ec2::254),
# Alibaba Cloud (100.100.100.200).
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("fd00:ec2::254"),
        ipaddress.ip_address("100.100.100.200"),
    }
)
# All of IPv4 link-local is refused too: metadata services and other host-local
# agents live there, and nothing a document should point at does.
_LINK_LOCAL_V4 = ipaddress.ip_network("169.254.0.0/16")


class BlockedAddress(PredictionError):
    """A URL's host resolves to an address that the policy refuses."""


def _embedded_ipv4(ip: IPAddress) -> list[IPAddress]:
    """The address itself plus any IPv4 address it carries (IPv4-mapped `::ffff:a.b.c.d`,
    6to4, Teredo), so that `::ffff:169.254.169.254` is judged as 169.254.169.254."""
    found: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            found.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            found.append(ip.sixtofour)
        if ip.teredo is not None:
            found.append(ip.teredo[1])
    return found


def _parse_entries(entries: Iterable[str]) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
    """Split allow/deny entries into lower-cased host names and networks."""
    names: set[str] = set()
    networks: list[IPNetwork] = []
    for entry in entries:
        text = entry.strip().lower()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            names.add(text.rstrip("."))
    return frozenset(names), tuple(networks)


def _name_matches(host: str, names: frozenset[str]) -> bool:
    """Exact name match, or a subdomain of an entry written with a leading dot."""
    host = host.lower().rstrip(".")
    if host in names:
        return True
    return any(name.startswith(".") and host.endswith(name) for name in names)


def _in_any(ip: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    return any(ip.version == net.version and ip in net for net in networks)


@dataclass(frozen=True)
class AddressPolicy:
    """The guard's configuration, parsed once. Build it with `AddressPolicy.create`."""

    allow_private: bool
    allow_names: frozenset[str]
    allow_networks: tuple[IPNetwork, ...]
    deny_names: frozenset[str]
    deny_networks: tuple[IPNetwork, ...]

    @classmethod
    def create(
        cls,
        *,
        allow_private: bool = False,
        allow_hosts: Iterable[str] = (),
        deny_hosts: Iterable[str] = (),
    ) -> AddressPolicy:
        allow_names, allow_networks = _parse_entries(allow_hosts)
        deny_names, deny_networks = _parse_entries(deny_hosts)
        return cls(allow_private, allow_names, allow_networks, deny_names, deny_networks)

    def host_refusal(self, host: str) -> str | None:
        """Why a host name is refused before resolving it, or None."""
        if _name_matches(host, self.deny_names):
            return f"blocked host {host} (denied by configuration)"
        return None

    def address_refusal(self, ip: IPAddress, host: str = "") -> str | None:
        """Why connecting to `ip` (resolved from `host`) is refused, or None if allowed."""
        candidates = _embedded_ipv4(ip)
        for candidate in candidates:
            if candidate in METADATA_ADDRESSES:
                return f"blocked address {ip} (cloud metadata address)"
            if isinstance(candidate, ipaddress.IPv4Address) and candidate in _LINK_LOCAL_V4:
                return f"blocked address {ip} (link-local address, never fetched)"
        for candidate in candidates:
            if _in_any(candidate, self.deny_networks):
                return f"blocked address {ip} (denied by configuration)"
        if host and _name_matches(host, self.allow_names):
            return None
        if any(_in_any(candidate, self.allow_networks) for candidate in candidates):
            return None
        for candidate in candidates:
            # is_global is False for private, loopback, link-local, reserved, shared
            # (100.64/10), unspecified and documentation ranges.
            if (not candidate.is_global or candidate.is_multicast) and not self.allow_private:
                return f"blocked address {ip} (private addresses are not allowed)"
        return None

    def check_address(self, ip: IPAddress | str, host: str = "") -> None:
        """Raise BlockedAddress if `ip` may not be fetched."""
        address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        reason = self.address_refusal(address, host)
        if reason is not None:
            raise BlockedAddress(reason)


async def resolve_checked(host: str, port: int, policy: AddressPolicy) -> list[str]:
    """Resolve `host` and return its addresses (as strings) after checking EVERY one.

    One refused address refuses the host: a name that answers both a public and a private
    address is exactly what a rebinding attack looks like. Raises BlockedAddress, or
    PredictionError when the name does not resolve."""
    reason = policy.host_refusal(host)
    if reason is not None:
        raise BlockedAddress(reason)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        infos_addresses = [literal]
    else:
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise PredictionError(f"cannot resolve host {host} ({exc})") from None
        infos_addresses = []
        for info in infos:
            raw = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 scope id
            infos_addresses.append(ipaddress.ip_address(raw))
    if not infos_addresses:
        raise PredictionError(f"cannot resolve host {host} (no addresses)")
    addresses: list[str] = []
    for ip in infos_addresses:
        policy.check_address(ip, host)
        if str(ip) not in addresses:
            addresses.append(str(ip))
    return addresses
