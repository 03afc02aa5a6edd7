"""The engine's Proxy is made lazily: a proxy unit that only a reload brings, a re-exec, a stop."""
from __future__ import annotations

import signal

from conftest import free_port
from test_proxy import backend, events, exchange, wait_event


def test_a_proxy_unit_added_by_a_reload_relays(activator, tmp_path):
    port, front, other = free_port(), free_port(), free_port()
    units = tmp_path / "units"
    units.mkdir()
    (units / "plain.toml").write_text(
        f'[plain]\nsocket.listen-stream = "127.0.0.1:{other}"\nservice.exec-start = ["/bin/true"]\n')
    a = activator("serve", "--log-format", "json", str(units))
    a.wait_listening()
    (units / "web.toml").write_text(
        f'[web]\nsocket.listen-stream = "127.0.0.1:{front}"\n'
        f'service.exec-start = {backend("echo", f"127.0.0.1:{port}")!r}\n'
        f'service.proxy-to = "127.0.0.1:{port}"\n'.replace("'", '"'))
    a.signal(signal.SIGHUP)
    wait_event(a, "reload")
    assert exchange(front, b"hello") == b"hello"
    assert len(events(a, "start")) == 1
    assert a.stop() == 0


def test_a_reexec_keeps_a_proxy_unit_that_had_no_connection_yet(activator, tmp_path):
    """The re-exec'd engine makes its Proxy lazily too: the first connection after it is relayed."""
    from test_reexec import ctl, serve_one

    port, front = free_port(), free_port()
    a, sock = serve_one(activator, tmp_path, (
        f'[web]\nsocket.listen-stream = "127.0.0.1:{front}"\n'
        f'service.exec-start = {backend("echo", f"127.0.0.1:{port}")!r}\n'
        f'service.proxy-to = "127.0.0.1:{port}"\n').replace("'", '"'))
    done = ctl(sock, "reexec")
    assert done.returncode == 0, done.stderr
    assert exchange(front, b"after") == b"after"
    assert exchange(front, b"again") == b"again"
    assert a.stop() == 0
