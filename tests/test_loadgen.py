"""activator.loadgen counts served, refused and failed connections against real sockets."""
import socket
import threading

from activator.loadgen import ClientLoad


def _server(reply: bytes, close_without_reply: bool = False):
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(10)

    def loop():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.recv(100)
            if not close_without_reply:
                c.sendall(reply)
            c.close()

    threading.Thread(target=loop, daemon=True).start()
    return srv


def test_counts_served_and_replies():
    srv = _server(b"v1\n")
    try:
        with ClientLoad(srv.getsockname(), clients=3, max_seconds=10) as load:
            assert load.wait_served(50, timeout=10)
        r = load.report
        assert r.refused == 0 and r.failed == 0 and r.served >= 50
        assert set(r.replies) == {b"v1"} and r.last_reply == b"v1"
    finally:
        srv.close()


def test_counts_refused_and_failed():
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    srv.close()  # nothing listens there now: every connect is refused
    with ClientLoad(("127.0.0.1", port), clients=1, max_seconds=10) as load:
        assert load.wait(lambda r: r.refused >= 3, timeout=10)
    assert load.report.served == 0
    mute = _server(b"", close_without_reply=True)
    try:
        with ClientLoad(mute.getsockname(), clients=1, max_seconds=10) as load:
            assert load.wait(lambda r: r.failed >= 3, timeout=10)
        assert load.report.served == 0 and "no reply" in load.report.errors[0]
    finally:
        mute.close()
