"""Rate limits with systemd's semantics (``ratelimit_below()``).

A window opens at the first event; within it at most ``burst`` events pass.
Once the window has elapsed the next event opens a new one. ``burst == 0`` or
``interval == 0`` disables the limit, as in systemd.
"""
from __future__ import annotations

from .records import dataclass


@dataclass
class RateLimit:
    interval: float
    burst: int
    begin: float = 0.0
    count: int = 0

    @property
    def enabled(self) -> bool:
        return self.interval > 0 and self.burst > 0

    def allow(self, now: float) -> bool:
        """Count one event at ``now``; False when it is over the limit."""
        if not self.enabled:
            return True
        if self.count == 0 or now >= self.begin + self.interval:
            self.begin, self.count = now, 0
        if self.count < self.burst:
            self.count += 1
            return True
        return False

    def reset_time(self) -> float:
        """When the current window ends and events pass again."""
        return self.begin + self.interval

    def describe(self) -> str:
        return f"{self.burst} in {self.interval:g}s"
