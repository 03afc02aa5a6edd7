"""The ListenStream= address parser: every accepted form, and the errors naming the bad address."""
import socket
import subprocess
import sys

import pytest

from activator.addresses import VMADDR_CID_ANY, AddressError, format_peer, parse_address


@pytest.mark.parametrize(
    "text, family, sockaddr, kind",
    [
        ("10809", socket.AF_INET6, ("::", 10809, 0, 0), "ipv6"),
        ("1", socket.AF_INET6, ("::", 1, 0, 0), "ipv6"),
        ("65535", socket.AF_INET6, ("::", 65535, 0, 0), "ipv6"),
        ("127.0.0.1:10809", socket.AF_INET, ("127.0.0.1", 10809), "ipv4"),
        ("0.0.0.0:80", socket.AF_INET, ("0.0.0.0", 80), "ipv4"),
        ("[::1]:10809", socket.AF_INET6, ("::1", 10809, 0, 0), "ipv6"),
        ("[::]:22", socket.AF_INET6, ("::", 22, 0, 0), "ipv6"),
        ("[fe80::1%1]:80", socket.AF_INET6, ("fe80::1", 80, 0, 1), "ipv6"),
        ("[fe80::1%lo]:80", socket.AF_INET6, ("fe80::1", 80, 0, socket.if_nametoindex("lo")), "ipv6"),
        ("[2001:db8:0:0::1]:443", socket.AF_INET6, ("2001:db8::1", 443, 0, 0), "ipv6"),
        ("/run/x.sock", socket.AF_UNIX, "/run/x.sock", "unix"),
        ("@abstract-name", socket.AF_UNIX, "\0abstract-name", "unix"),
        ("vsock:2:1024", socket.AF_VSOCK, (2, 1024), "vsock"),
        ("vsock::1024", socket.AF_VSOCK, (VMADDR_CID_ANY, 1024), "vsock"),
        ("vsock:4294967295:5", socket.AF_VSOCK, (VMADDR_CID_ANY, 5), "vsock"),
        ("vsock:3:4294967295", socket.AF_VSOCK, (3, 4294967295), "vsock"),  # vsock ports are 32-bit
    ],
)
def test_valid_forms(text, family, sockaddr, kind):
    a = parse_address(text)
    assert a.family == family
    assert a.sockaddr == sockaddr
    assert a.kind == kind


def test_port_alone_is_dual_stack_any():
    a = parse_address("8080")
    assert a.any_port and a.is_ip and str(a) == "[::]:8080" and a.path is None


def test_path_and_abstract_properties():
    assert parse_address("/tmp/a.sock").path == "/tmp/a.sock"
    assert parse_address("@name").path is None
    assert str(parse_address("@name")) == "@name"
    assert not parse_address("@name").is_ip
    assert parse_address("vsock::5").path is None


def test_longest_unix_path_accepted():
    path = "/" + "a" * 106  # 107 bytes + NUL = sun_path's 108
    assert parse_address(path).path == path


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0",  # port 0
        "65536",
        "99999999999",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:",
        "127.0.0.1:http",
        "127.0.0.1:-1",
        "127.0.0.1",
        "256.0.0.1:80",
        "1.2.3:80",
        "localhost:80",
        "example.com:80",
        "[::1]",
        "[::1]:",
        "[::1]:0",
        "[::1]:65536",
        "[::g]:80",
        "[:::1]:80",
        "[1:2:3:4:5:6:7:8:9]:80",
        "::1:80",
        "[::1]80",
        "[fe80::1%]:80",
        "[fe80::1%no-such-iface0]:80",
        "/" + "a" * 107,  # 108 bytes: no room for the NUL
        "@",
        "@" + "a" * 108,
        "vsock:",
        "vsock:1",
        "vsock:x:5",
        "vsock:1:",
        "vsock:1:0",
        "vsock::4294967296",
        "vsock:4294967296:5",
        "vsock:-1:5",
        "relative/path",
        "./x.sock",
        " 80",
        "80 ",
        "/tmp/a\0b",
        "٣٣",  # non-ASCII digits
        "127.0.0.1:٨٠",
    ],
)
def test_invalid_forms_raise_address_error(text):
    with pytest.raises(AddressError) as info:
        parse_address(text)
    message = str(info.value)
    if text:
        assert repr(text) in message or text in message, message


def test_error_messages_say_what_is_wrong():
    with pytest.raises(AddressError, match="out of range"):
        parse_address("65536")
    with pytest.raises(AddressError, match="out of range"):
        parse_address("0")
    with pytest.raises(AddressError, match="too long"):
        parse_address("/" + "x" * 200)
    with pytest.raises(AddressError, match="IPv6"):
        parse_address("[::zz]:80")
    with pytest.raises(AddressError, match="vsock"):
        parse_address("vsock:abc")


def test_format_peer():
    assert format_peer(socket.AF_INET, ("127.0.0.1", 5000)) == ("127.0.0.1", "5000")
    assert format_peer(socket.AF_INET6, ("::1", 5000, 0, 0)) == ("::1", "5000")
    # an IPv4 client of a dual-stack socket is reported in its IPv4 form, as systemd does
    assert format_peer(socket.AF_INET6, ("::ffff:127.0.0.1", 5000, 0, 0)) == ("127.0.0.1", "5000")
    assert format_peer(socket.AF_UNIX, "") == (None, None)


@pytest.mark.parametrize("bad", ["0", "65536", "[::1]:99999", "[::x]:80", "vsock:1", "nonsense", "/" + "p" * 120])
def test_cli_bad_address_exit_2_naming_it(bad, tmp_path):
    """Usage error (exit 2), one line naming the address, no traceback, nothing bound."""
    good = tmp_path / "good.sock"
    r = subprocess.run(
        [sys.executable, "-m", "activator", "run", "-l", str(good), "-l", bad, "--", "true"],
        capture_output=True, text=True, timeout=20,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert bad in r.stderr or repr(bad) in r.stderr
    assert not good.exists()  # validated before anything is bound


def test_ipv4_check_is_what_ipaddress_accepts():
    """parse_address checks IPv4 without the ipaddress module: the same answers, on the edge cases and on
    random strings of digits and dots."""
    import ipaddress
    import random

    from activator.addresses import _is_ipv4

    cases = ["1.2.3.4", "0.0.0.0", "255.255.255.255", "256.1.1.1", "01.2.3.4", "1.2.3", "1.2.3.4.5", "a.b.c.d",
             "1.2.3.-4", "1..3.4", " 1.2.3.4", "1.2.3.4 ", "\u0661.2.3.4", "+1.2.3.4", "1_0.2.3.4", "000.0.0.0",
             "0.0.0.00", "1.2.3.04", "1.2.3.4\n"]
    rnd = random.Random(7)
    cases += ["".join(rnd.choice("0123456789.") for _ in range(rnd.randint(1, 15))) for _ in range(20000)]
    for text in cases:
        try:
            expected = str(ipaddress.IPv4Address(text)) == text
        except ValueError:
            expected = False
        assert _is_ipv4(text) == expected, text
