"""gc.freeze() in engine_main: what the start-up froze is collected once a reload has replaced it (the
reload unfreezes), not kept for the life of the engine."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import free_port

PROBE = r"""
import gc, json, sys, weakref
from activator import supervisor
path = sys.argv[1]
def spy_run(self):
    olds = [weakref.ref(s) for s in self.states()]
    for i in range(2):
        text = open(path).read()
        open(path, "w").write(text.replace(f"X{i}", f"X{i + 1}"))
        assert self.reload().changed == ["u"]
    gc.collect()
    current = {id(s) for s in self.states()}
    print(json.dumps(sum(1 for w in olds if w() is not None and id(w()) not in current)))
    return 0
supervisor.Engine.run = spy_run
sys.argv = ["activator", "serve", path]
from activator.__main__ import main
main()
"""


def test_states_a_reload_replaced_are_collected(tmp_path):
    unit = tmp_path / "units.toml"
    unit.write_text(f"""[u]
[[u.socket]]
listen-stream = "127.0.0.1:{free_port()}"
[u.service]
exec-start = ["/bin/sleep", "30"]
workers = 3
environment = {{ V = "X0" }}
""")
    proc = subprocess.run([sys.executable, "-c", PROBE, str(unit)], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == 0  # the start-up's 3 worker states (a cycle) stay
