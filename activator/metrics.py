"""``--metrics-listen ADDR``: the status counters in the Prometheus text format at ``/metrics``.

The exposition format is written by prometheus_client (the optional extra ``metrics``),
from a collector that reads the same status snapshot as ``activator ctl status`` at each
scrape; nothing is kept up to date in between, so an unscraped activator does no work.
HTTP is a minimal responder in the engine's loop (:class:`activator.control.StreamServer`):
one request per connection, headers at most 8 KiB, 5 s to send them, only ``GET`` and
``HEAD`` of ``/metrics``.
"""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, Iterator

from .control import Client, ProcessSampler, StreamServer, status_snapshot

if TYPE_CHECKING:
    from .supervisor import Engine

HEADERS_MAX = 8192
HTTP_TIMEOUT = 5.0
STATES = ("listening", "running", "paused", "stopping", "waiting", "failed", "stopped", "idle")
COUNTERS = {
    "activations": "Connections and triggers seen on the unit's sockets",
    "starts": "Daemons (Accept=no) started",
    "start_failures": "Daemons or instances that could not be started",
    "accepted": "Connections accepted and handed to an instance (accept mode)",
    "refused": "Connections closed over max-connections or max-connections-per-source",
    "denied": "Connections closed by ip-address-allow/ip-address-deny",
    "restarts": "Automatic restarts (restart=)",
}


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8", head: bool = False,
              extra: str = "") -> bytes:
    header = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
              f"{extra}Connection: close\r\n\r\n")
    return header.encode() + (b"" if head else body)


class MetricsServer:
    kind = "metrics"  # its entry in the state of a re-exec

    def __init__(self, engine: Engine, bound: Any) -> None:
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
        from prometheus_client.registry import CollectorRegistry

        self.engine = engine
        self.bound = bound
        self.started = time.time()
        self.sampler = ProcessSampler()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # type: ignore[arg-type]  # a collector is anything with collect()
        self._generate = generate_latest
        self.content_type = CONTENT_TYPE_LATEST
        self.server = StreamServer(
            engine.loop, engine.log, f"metrics on {bound.spec.label}", bound.sock, b"\r\n\r\n", self._handle,
            request_max=HEADERS_MAX, timeout=HTTP_TIMEOUT,
            too_large=_response("431 Request Header Fields Too Large", b"request too large\n"),
            busy=_response("503 Service Unavailable", b"too many scrapes at once\n"),
        )

    def start(self) -> None:
        self.server.start()

    def reexec_state(self) -> tuple[dict[str, Any], list[int]]:
        """What a re-exec carries: the listening socket, its file (a unix path) and the start time."""
        from .reexec import carry_socket

        return {**carry_socket(self.bound), "started": self.started}, [self.bound.fileno()]

    def close(self) -> None:
        self.server.close()
        self.bound.close(remove_file=True)

    def _handle(self, client: Client, request: bytes) -> tuple[bytes, bool]:
        parts = request.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _response("400 Bad Request", b"bad request\n"), True
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != b"/metrics":
            return _response("404 Not Found", b"only /metrics is here\n"), True
        if method not in (b"GET", b"HEAD"):
            return _response("405 Method Not Allowed", b"GET or HEAD\n", extra="Allow: GET, HEAD\r\n"), True
        body = self._generate(self.registry)
        return _response("200 OK", body, self.content_type, head=method == b"HEAD"), True

    # -------------------------------------------------------- the collector
    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = status_snapshot(self.engine, self.sampler, self.started)
        units = snap["units"]
        info = GaugeMetricFamily("activator_info", "activator's version and pid", labels=["version", "pid"])
        info.add_metric([snap["activator"]["version"], str(snap["activator"]["pid"])], 1)
        yield info
        start = GaugeMetricFamily("activator_start_time_seconds", "When activator started (Unix time)")
        start.add_metric([], snap["activator"]["started"])
        yield start
        for key, text in COUNTERS.items():
            family = CounterMetricFamily(f"activator_unit_{key}", text, labels=["unit"])
            for u in units:
                family.add_metric([u["name"]], u["counters"][key])
            yield family
        state = GaugeMetricFamily("activator_unit_state", "1 for the unit's current state", labels=["unit", "state"])
        for u in units:
            for name in STATES:
                state.add_metric([u["name"], name], 1.0 if u["state"] == name else 0.0)
        yield state
        yield from self._gauges(units, GaugeMetricFamily)
        cpu = CounterMetricFamily("activator_unit_cpu_seconds", "CPU time of the unit's live processes "
                                                                "(and the children they reaped)", labels=["unit"])
        for u in units:
            if u["processes"] is not None:
                cpu.add_metric([u["name"]], u["processes"]["cpu_seconds"])
        yield cpu

    @staticmethod
    def _gauges(units: list[dict[str, Any]], gauge: Any) -> Iterator[Any]:
        simple = {
            "activator_unit_instances": ("Accept-mode instances running", lambda u: u["instances"]),
            "activator_unit_main_start_time_seconds": ("When the current daemon started (Unix time)",
                                                       lambda u: u["started"]),
            "activator_unit_paused_until_seconds": ("End of a rate-limit pause (Unix time)",
                                                    lambda u: u["paused_until"]),
            "activator_unit_last_exit_code": ("Exit status of the last daemon (128+N: signal N)",
                                              lambda u: u["last_exit"] and u["last_exit"]["code"]),
            "activator_unit_last_exit_time_seconds": ("When the last daemon exited (Unix time)",
                                                      lambda u: u["last_exit"] and u["last_exit"]["time"]),
        }
        per_process = {
            "activator_unit_processes": "Processes in the unit's tree",
            "activator_unit_resident_memory_bytes": "Sum of the resident memory of the unit's processes",
            "activator_unit_open_fds": "Open descriptors of the unit's processes",
            "activator_unit_threads": "Threads of the unit's processes",
        }
        fields = dict(zip(per_process, ("count", "rss_bytes", "open_fds", "threads")))
        for name, (text, value) in simple.items():
            family = gauge(name, text, labels=["unit"])
            for u in units:
                v = value(u)
                if v is not None:
                    family.add_metric([u["name"]], v)
            yield family
        for name, text in per_process.items():
            family = gauge(name, text, labels=["unit"])
            for u in units:
                if u["processes"] is not None:
                    family.add_metric([u["name"]], u["processes"][fields[name]])
            yield family


def open_metrics(engine: Engine, address: str, carried: dict[str, Any] | None = None) -> MetricsServer:
    """Bind ``address`` for the metrics endpoint (or take ``carried``, its socket before a re-exec); a
    one-line error and exit 1 when it cannot be."""
    from .addresses import AddressError, parse_address
    from .sockets import describe_error, open_socket
    from .units import BindSpec

    try:
        import prometheus_client  # noqa: F401 - the optional extra: say so before binding anything
    except ImportError:
        engine.log.error("metrics", "--metrics-listen needs prometheus_client: pip install 'activator[metrics]'")
        sys.exit(1)
    try:
        parsed = parse_address(address)
    except AddressError as exc:
        engine.log.error("metrics", f"--metrics-listen: {exc}")
        sys.exit(2)
    spec = BindSpec(parsed, remove_on_stop=True)
    if carried is not None:
        from .sockets import adopt

        server = MetricsServer(engine, adopt(spec, carried))
        server.started = float(carried["started"])
        return server
    try:
        bound = open_socket(spec)
    except OSError as exc:
        engine.log.error("metrics", describe_error(spec, exc))
        sys.exit(1)
    engine.log.info("metrics", f"metrics at http://{spec.label}/metrics" if parsed.is_ip
                    else f"metrics on {spec.label} (/metrics)")
    return MetricsServer(engine, bound)
