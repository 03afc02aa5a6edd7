"""Parsing of listen addresses in systemd's ``ListenStream=`` syntax.

Accepted forms (see systemd.socket(5)):

* ``PORT``                 dual-stack ``[::]:PORT`` (IPv4 ``0.0.0.0`` where IPv6 is missing)
* ``IPv4:PORT``            e.g. ``127.0.0.1:10809``
* ``[IPv6]:PORT``          e.g. ``[::1]:10809``, with an optional ``%IFACE`` scope
* ``/absolute/path``       a unix socket in the file system
* ``@name``                an abstract unix socket
* ``vsock:CID:PORT``       AF_VSOCK; ``vsock::PORT`` binds any CID
"""
from __future__ import annotations

from . import socketapi as socket

from .records import dataclass

TYPE_CHECKING = False  # typing is not imported at run time (start-up, memory); type checkers see it
if TYPE_CHECKING:
    from typing import Any, Union

# sun_path is 108 bytes on Linux; a path needs its trailing NUL, an abstract name does not.
UNIX_PATH_MAX = 108
VMADDR_CID_ANY = 0xFFFFFFFF

if TYPE_CHECKING:
    SockAddr = Union[tuple, str, bytes]


class AddressError(ValueError):
    """An address that does not follow the ListenStream= syntax."""


@dataclass(frozen=True)
class Address:
    family: int
    sockaddr: Any
    text: str
    # "PORT" alone: bind [::] dual-stack, or 0.0.0.0 where IPv6 is unavailable.
    any_port: bool = False

    @property
    def kind(self) -> str:
        names: dict[int, str] = {
            socket.AF_INET: "ipv4",
            socket.AF_INET6: "ipv6",
            socket.AF_UNIX: "unix",
            socket.AF_VSOCK: "vsock",
        }
        return names[self.family]

    @property
    def path(self) -> str | None:
        """The file-system path of a unix socket, None for every other kind."""
        if self.family == socket.AF_UNIX and not self.text.startswith("@"):
            return self.text
        return None

    @property
    def is_ip(self) -> bool:
        return self.family in (socket.AF_INET, socket.AF_INET6)

    def __str__(self) -> str:
        return self.text


def _port(text: str, original: str, bits: int = 16) -> int:
    if not text.isdigit() or not text.isascii():
        raise AddressError(f"invalid port in address {original!r}")
    port = int(text)
    if not 1 <= port < (1 << bits):
        raise AddressError(f"port out of range in address {original!r} (1-{(1 << bits) - 1})")
    return port


def _is_ipv4(host: str) -> bool:
    """What ipaddress.IPv4Address accepts, which is then its own text: four decimal octets, no leading
    zeros (ambiguous: octal to some parsers). Not ipaddress itself: it costs a millisecond of start-up
    and 1,000 units' addresses another 6 ms; it is imported for IPv6 only."""
    parts = host.split(".")
    return len(parts) == 4 and all(
        p.isdigit() and p.isascii() and len(p) <= 3 and (p[0] != "0" or p == "0") and int(p) <= 255 for p in parts)


def parse_address(text: str) -> Address:
    """Parse one ListenStream=-style address; raise AddressError naming it when invalid."""
    if not isinstance(text, str) or not text:
        raise AddressError("empty address")
    if "\0" in text:
        raise AddressError(f"invalid address {text!r}: contains a NUL character")
    if text != text.strip():
        raise AddressError(f"invalid address {text!r}: surrounding white space")

    if text.startswith("/"):
        if len(text.encode(errors="surrogateescape")) >= UNIX_PATH_MAX:
            size = len(text.encode(errors="surrogateescape"))
            raise AddressError(f"unix socket path too long ({size} bytes, at most {UNIX_PATH_MAX - 1}): {text!r}")
        return Address(socket.AF_UNIX, text, text)

    if text.startswith("@"):
        name = text[1:]
        if not name:
            raise AddressError(f"invalid address {text!r}: empty abstract socket name")
        if len(name.encode(errors="surrogateescape")) > UNIX_PATH_MAX - 1:
            raise AddressError(f"abstract socket name too long: {text!r}")
        return Address(socket.AF_UNIX, "\0" + name, text)

    if text.startswith("vsock:"):
        rest = text[len("vsock:"):]
        cid_text, sep, port_text = rest.rpartition(":")
        if not sep:
            raise AddressError(f"invalid vsock address {text!r} (expected vsock:CID:PORT or vsock::PORT)")
        if cid_text == "":
            cid = VMADDR_CID_ANY
        elif cid_text.isdigit() and cid_text.isascii():
            cid = int(cid_text)
            if cid > 0xFFFFFFFF:
                raise AddressError(f"vsock CID out of range in {text!r}")
        else:
            raise AddressError(f"invalid vsock CID in {text!r}")
        return Address(socket.AF_VSOCK, (cid, _port(port_text, text, bits=32)), text)

    if text.isdigit():
        port = _port(text, text)
        return Address(socket.AF_INET6, ("::", port, 0, 0), f"[::]:{port}", any_port=True)

    if text.startswith("["):
        host_part, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise AddressError(f"invalid IPv6 address {text!r} (expected [ADDRESS]:PORT)")
        host, _, scope = host_part.partition("%")
        import ipaddress  # here: see _is_ipv4

        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"invalid IPv6 address in {text!r}") from None
        scope_id = 0
        if "%" in host_part:
            if not scope:
                raise AddressError(f"empty interface name in {text!r}")
            if scope.isdigit() and scope.isascii():
                scope_id = int(scope)
            else:
                try:
                    scope_id = socket.if_nametoindex(scope)
                except OSError:
                    raise AddressError(f"unknown network interface {scope!r} in {text!r}") from None
        port = _port(port_text, text)
        return Address(socket.AF_INET6, (str(ip), port, 0, scope_id), text)

    host, sep, port_text = text.rpartition(":")
    if sep and host.count(".") == 3:
        if not _is_ipv4(host):
            raise AddressError(f"invalid IPv4 address in {text!r}")
        return Address(socket.AF_INET, (host, _port(port_text, text)), text)

    raise AddressError(
        f"invalid address {text!r} (expected PORT, IPv4:PORT, [IPv6]:PORT, /path, @abstract or vsock:CID:PORT)"
    )


def format_peer(family: int, peer: Any) -> tuple[str | None, str | None]:
    """REMOTE_ADDR and REMOTE_PORT for an accepted peer (None for non-IP peers)."""
    if family == socket.AF_INET:
        return peer[0], str(peer[1])
    if family == socket.AF_INET6:
        host = peer[0]
        # An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d; systemd reports the IPv4 form.
        if host.startswith("::ffff:") and "." in host:
            host = host[len("::ffff:"):]
        return host, str(peer[1])
    return None, None
