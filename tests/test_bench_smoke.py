"""The benchmark suite keeps working: `python -m bench --smoke` completes and writes every metric.

Nothing here asserts a speed: benchmarks are not timed tests.
"""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, require

METRICS = [
    "accept_inetd_seq", "accept_inetd_conc4", "accept_fd3_seq", "accept_fd3_conc4", "first_activation",
    "startup_listen", "startup_help", "startup_version", "idle_wakeups", "idle_rss", "scale_startup",
    "scale_dispatch", "scale_hold_rss", "nbd_throughput",
    "proxy_throughput", "proxy_rr_1", "proxy_rr_16", "proxy_conn_1", "proxy_conn_16",
]


def test_bench_smoke_writes_every_metric(tmp_path):
    require("gcc", "tcpserver", "systemd-socket-activate", "xinetd", "nbdkit", "nbdcopy", "nbdinfo")
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--output", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["mode"] == "smoke"
    for key in ("cores", "kernel", "python"):
        assert results["machine"][key]
    assert sorted(results["metrics"]) == sorted(METRICS)
    for key in METRICS:
        m = results["metrics"][key]
        subject = m["rows"][m["subject"]]
        assert subject["n"] >= 1 and subject["median"] is not None, (key, m["errors"])
        assert m["targets"], key
        for t in m["targets"]:
            assert t["met"] in (True, False), (key, t)
    markdown = out.with_suffix(".md").read_text()
    assert "## Targets" in markdown and "accept_inetd_seq" in markdown


def test_footprint_profile_runs_and_says_what_the_engine_imports():
    """`python -m bench.footprint` (docs/benchmarks.md) prints its five sections; the run path it
    profiles does without the dataclasses module."""
    proc = subprocess.run([sys.executable, "-m", "bench.footprint", "--runs", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert section in proc.stdout
    assert "dataclasses imported: no" in proc.stdout
