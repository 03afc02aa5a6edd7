"""One log line per event on stderr, as text or as JSON (one object per line)."""
from __future__ import annotations

import contextlib
import os
import sys
import time

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Log:
    def __init__(self, verbose: bool = False, fmt: str = "text", stream=None, prog: str = "activator"):
        self.threshold = LEVELS["debug"] if verbose else LEVELS["info"]
        self.json = fmt == "json"
        self.stream = stream if stream is not None else sys.stderr
        self.prog = prog
        self.pid = os.getpid()
        self._held: list[str] | None = None

    @contextlib.contextmanager
    def hold(self):
        """Collect the lines logged inside and write them at once (1,000 sockets: one write, not 1,000)."""
        self._held = []
        try:
            yield
        finally:
            lines, self._held = self._held, None
            if lines:
                self._write("".join(lines))

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self.threshold

    def emit(self, level: str, event: str, message: str, unit: str | None = None, pid: int | None = None) -> None:
        if LEVELS[level] < self.threshold:
            return
        if self.json:
            import json  # only for --log-format json: text logs do without it

            now = time.time()  # read once: seconds and milliseconds must come from the same instant
            record = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
                "level": level, "unit": unit, "pid": pid, "event": event, "message": message,
            }
            line = json.dumps(record, separators=(",", ":"))
        else:
            prefix = f"{self.prog}[{self.pid}]: "
            if unit:
                prefix += f"{unit}: "
            if level in ("warning", "error"):
                prefix += f"{level}: "
            line = prefix + message
        if self._held is not None:
            self._held.append(line + "\n")
        else:
            self._write(line + "\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must never stop the supervisor

    def debug(self, event, message, **kw):
        self.emit("debug", event, message, **kw)

    def info(self, event, message, **kw):
        self.emit("info", event, message, **kw)

    def warning(self, event, message, **kw):
        self.emit("warning", event, message, **kw)

    def error(self, event, message, **kw):
        self.emit("error", event, message, **kw)
