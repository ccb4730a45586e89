"""The broker's waiting room: priorities high > normal > low, FIFO within one.

Jobs wait here (not on workers) so each can go to whichever worker frees up first. The
dispatcher walks the queue in order and may skip a job no worker can take right now (its model
does not fit anywhere free) so it does not block the jobs behind it. The size limits
(--max-queue jobs, --max-queue-mb of request bytes) are the broker core's: it refuses new jobs
past them, but never a job it re-queues. The queue counts the bytes its jobs hold for the second.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import islice
from typing import Iterator

from protocol import constants as C


class JobQueue:
    def __init__(self) -> None:
        # one insertion-ordered dict per priority: O(1) append, remove and membership
        self._lanes: dict[str, OrderedDict[str, object]] = {p: OrderedDict() for p in C.PRIORITIES}
        self._sizes: dict[str, int] = {}   # request_id -> bytes its request holds
        self.bytes_held = 0                 # sum of _sizes: what --max-queue-mb bounds

    def __len__(self) -> int:
        high, normal, low = self._lanes.values()   # hot: read once per dispatch pass
        return len(high) + len(normal) + len(low)

    def __bool__(self) -> bool:
        return any(self._lanes.values())

    def depth_by_priority(self) -> dict[str, int]:
        """Jobs waiting in each priority lane, every priority present (for status and metrics)."""
        return {priority: len(lane) for priority, lane in self._lanes.items()}

    def __contains__(self, request_id: str) -> bool:
        return any(request_id in lane for lane in self._lanes.values())

    def push(self, request_id: str, priority: str, item: object, size_bytes: int = 0) -> None:
        """Append at the end of its priority; `size_bytes`: what the job's request holds."""
        lane = self._lanes.get(priority, self._lanes[C.PRIORITY_NORMAL])
        self._count(request_id, size_bytes)
        lane[request_id] = item

    def push_front(self, request_id: str, priority: str, item: object, size_bytes: int = 0) -> None:
        """Re-queue ahead of its priority's other jobs (a job whose worker was lost)."""
        lane = self._lanes.get(priority, self._lanes[C.PRIORITY_NORMAL])
        self._count(request_id, size_bytes)
        lane[request_id] = item
        lane.move_to_end(request_id, last=False)

    def remove(self, request_id: str) -> object | None:
        for lane in self._lanes.values():
            if request_id in lane:
                self.bytes_held -= self._sizes.pop(request_id, 0)
                return lane.pop(request_id)
        return None

    def _count(self, request_id: str, size_bytes: int) -> None:
        self.bytes_held += size_bytes - self._sizes.get(request_id, 0)
        self._sizes[request_id] = size_bytes

    def __iter__(self) -> Iterator[tuple[str, object]]:
        """(request_id, item) in serving order. Copy-safe: removal while iterating is fine."""
        for priority in C.PRIORITIES:
            yield from list(self._lanes[priority].items())

    def head(self, count: int) -> list[tuple[str, object]]:
        """The first `count` (request_id, item) in serving order, as a list (removal while
        walking it is fine); copies only what the dispatcher will look at, not a long queue."""
        out: list[tuple[str, object]] = []
        for priority in C.PRIORITIES:
            if len(out) >= count:
                break
            out.extend(islice(self._lanes[priority].items(), count - len(out)))
        return out

    def position(self, request_id: str) -> int | None:
        """0-based place in serving order, or None when not queued."""
        ahead = 0
        for priority in C.PRIORITIES:
            lane = self._lanes[priority]
            if request_id in lane:
                for index, key in enumerate(lane):
                    if key == request_id:
                        return ahead + index
            ahead += len(lane)
        return None
