"""Healthy workers lost: a worker the stress run did not fault that the broker nevertheless
declared lost, disconnected, or whose id another connection took over.

The broker's own log says when it gives up on a worker (broker/core.py): `worker <id> lost:
no heartbeat ...`, `disconnecting worker <id> (connection ...)`, and `worker <id> registered:
... on <host>` (a registration from the rogue's host for a real worker's id is a takeover). The
fault scheduler records which worker ids it faulted and when (`FaultLog`); every event outside
those windows, for an id not run by the stress tool itself (`stress-*`), is a healthy worker
lost. Only events before `until` (the end of the phase's measurement, before shutdown) count.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

STRESS_PREFIX = "stress-"   # ids of the raw peers this tool runs (raw_worker.py)
ROGUE_HOST = "stress-rogue"

_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ broker[\w.]*: "
_PATTERNS = (
    ("lost", re.compile(_STAMP + r"worker (\S+) lost: (.*)$")),
    ("disconnected", re.compile(_STAMP + r"disconnecting worker (\S+) \((.*)$")),
    ("taken_over", re.compile(_STAMP + r"worker (\S+) registered: (.* on " + ROGUE_HOST + r".*)$")),
)


@dataclass
class WorkerEvent:
    kind: str          # lost | disconnected | taken_over
    worker_id: str
    at: float          # wall clock (time.time())
    line: str


@dataclass
class FaultLog:
    """Which worker ids were faulted, from when until when (wall clock)."""
    windows: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def faulted(self, worker_id: str, start: float, end: float) -> None:
        with self._lock:
            self.windows.setdefault(worker_id, []).append((start, end))

    def covers(self, worker_id: str, at: float) -> bool:
        if worker_id.startswith(STRESS_PREFIX):
            return True
        with self._lock:
            return any(a <= at <= b for a, b in self.windows.get(worker_id, ()))


def read_events(paths: list[Path]) -> list[WorkerEvent]:
    events = []
    for path in paths:
        try:
            text = Path(path).read_text(errors="replace")
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            if "broker" not in line or "worker" not in line:
                continue
            for kind, pattern in _PATTERNS:
                m = pattern.match(line)
                if m is None:
                    continue
                if m.group(2).startswith("("):
                    break   # "(unregistered)": a connection that never held a worker id
                at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                events.append(WorkerEvent(kind, m.group(2), at, line[:300]))
                break
    return sorted(events, key=lambda e: e.at)


def healthy_workers_lost(paths: list[Path], faults: FaultLog, until: float | None = None) -> dict:
    """Counts over the broker logs: every give-up event, the ones that hit a faulted worker,
    and the ones that hit a healthy worker (with examples)."""
    until = time.time() if until is None else until
    events = [e for e in read_events(paths) if e.at <= until]
    healthy = [e for e in events if not faults.covers(e.worker_id, e.at)]
    return {
        "worker_give_ups": len(events),
        "faulted_workers_lost": len(events) - len(healthy),
        "healthy_workers_lost": len(healthy),
        "healthy_lost_by_kind": {k: sum(1 for e in healthy if e.kind == k)
                                 for k in sorted({e.kind for e in healthy})},
        "healthy_lost_examples": [e.line for e in healthy[:5]],
    }
