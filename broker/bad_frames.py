"""Invalid backend frames, per connection: when to log one, when to cut the sender off.

A worker-protocol frame that does not decode (broker/core.py drops it before anything is
stored) is counted per ROUTER identity in a fixed window: the first of a window is logged,
the rest only counted (a flood cannot flood the log), and `limit` of them within the window
means the sender is broken or hostile and is disconnected.
"""

from __future__ import annotations

from dataclasses import dataclass

WINDOW_S = 60.0
LIMIT = 20                # bad frames within WINDOW_S that disconnect the sender
MAX_TRACKED = 10_000      # identities remembered; a flood of new identities cannot grow this


@dataclass(slots=True)
class _Window:
    started: float
    count: int = 0


class BadFrames:
    def __init__(self, window_s: float = WINDOW_S, limit: int = LIMIT,
                 max_tracked: int = MAX_TRACKED):
        self.window_s, self.limit, self.max_tracked = window_s, limit, max_tracked
        self._windows: dict[bytes, _Window] = {}

    def strike(self, identity: bytes, now: float) -> tuple[bool, bool]:
        """One more bad frame from `identity`: (log it, disconnect it)."""
        window = self._windows.get(identity)
        if window is None or now - window.started >= self.window_s:
            if window is None and len(self._windows) >= self.max_tracked:
                self._prune(now)
            window = self._windows[identity] = _Window(started=now)
        window.count += 1
        cut = window.count >= self.limit
        if cut:
            del self._windows[identity]
        return window.count == 1, cut

    def _prune(self, now: float) -> None:
        self._windows = {i: w for i, w in self._windows.items() if now - w.started < self.window_s}
        while len(self._windows) >= self.max_tracked:   # all recent: drop the oldest
            del self._windows[next(iter(self._windows))]
