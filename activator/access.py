"""IP access lists with systemd's IPAddressAllow=/IPAddressDeny= rules.

An address is let in when it matches an allow entry; otherwise it is kept out
when it matches a deny entry; otherwise it is let in. Entries are addresses or
CIDR prefixes, or the keywords ``any``, ``localhost``, ``link-local`` and
``multicast``.
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ipaddress

    Network = ipaddress.IPv4Network | ipaddress.IPv6Network

KEYWORDS = {
    "any": ("0.0.0.0/0", "::/0"),
    "localhost": ("127.0.0.0/8", "::1/128"),
    "link-local": ("169.254.0.0/16", "fe80::/64"),
    "multicast": ("224.0.0.0/4", "ff00::/8"),
}


def parse_networks(entries: list[str]) -> list[Network]:
    """ValueError naming the entry when one is neither a keyword nor an address or prefix."""
    import ipaddress  # here: only units with access lists need it (its import costs start-up and memory)

    nets: list[Network] = []
    for entry in entries:
        for word in str(entry).split():
            if word in KEYWORDS:
                nets.extend(ipaddress.ip_network(n) for n in KEYWORDS[word])
                continue
            try:
                nets.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                raise ValueError(f"invalid IP address or prefix {word!r}") from None
    return nets


def _matches(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: list[Network]) -> bool:
    return any(addr.version == n.version and addr in n for n in nets)


class AccessList:
    def __init__(self, allow: list[str], deny: list[str]):
        import ipaddress  # loaded by parse_networks already; kept here, not looked up per connection

        self.allow = parse_networks(allow)
        self.deny = parse_networks(deny)
        self._ip_address, self._ipv6 = ipaddress.ip_address, ipaddress.IPv6Address

    def allowed(self, address: str) -> bool:
        addr = self._ip_address(address)
        if isinstance(addr, self._ipv6) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if _matches(addr, self.allow):
            return True
        return not _matches(addr, self.deny)
