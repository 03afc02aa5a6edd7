"""The engine's Watcher is made lazily: watch-paths that only a reload brings (the engine started with none)."""
from __future__ import annotations

import signal

from conftest import events, free_port, wait_event


def test_watch_paths_added_by_a_reload_are_watched(activator, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    port = free_port()
    unit = tmp_path / "u.toml"
    base = f'[u]\nsocket.listen-stream = "127.0.0.1:{port}"\nservice.exec-start = ["true"]\n'
    unit.write_text(base)
    a = activator("serve", "--log-format", "json", "--no-control-socket", unit)
    a.wait_listening()
    unit.write_text(base + 'service.watch-paths = ["one"]\n')
    a.signal(signal.SIGHUP)
    a.wait_log('"event":"reload"')
    (one / "f").write_text("watched now")
    assert wait_event(a, "watch-change", timeout=30)["path"] == str(one / "f")
    unit.write_text(base)  # and removed again: the watch goes
    a.signal(signal.SIGHUP)
    assert a.stop() == 0
    assert [e["path"] for e in events(a, "watch-change")] == [str(one / "f")]
