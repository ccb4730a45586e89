"""The gateway's jobs: one broker exchange per request id, watched by any number of listeners.

A job submitted over HTTP or the WebSocket runs as an asyncio task that streams it through
`AsyncBrokerClient` (its own DEALER socket, Lazy-Pirate resends with the same request id).
Listeners (a waiting HTTP call, WebSocket connections, the dashboard) get every progress event
and exactly one final reply through their own queue. A listener going away (a browser tab
closed mid-job) never cancels the job; attaching again with the same id gets the rest, or the
stored final reply once it is done. A resubmission of a running id attaches to it, so an
`Idempotency-Key` retried over HTTP is one job. A job is cancelled on the exchange that
submitted it (`cancel`): without CURVE the broker lets only that connection cancel it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

from clients.client import AsyncBrokerClient, AsyncSubmission, BrokerUnavailable, cancel_body
from protocol import constants as C
from protocol.parse import body_fingerprint

log = logging.getLogger(__name__)

# finished jobs remembered (with their inline images) for re-attaching listeners and the
# dashboard; older ones are still answered by the broker's stored replies
FINISHED_KEPT = 64


@dataclass
class TrackedJob:
    request_id: str
    body: dict
    source: str                      # "a1111", "v1", "ws": who submitted it, for the dashboard
    created_s: float = field(default_factory=time.time)
    progress: Optional[dict] = None  # the latest progress event
    preview: Optional[bytes] = None  # the latest preview JPEG
    final: Optional[dict] = None     # the final reply, once there
    listeners: set = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: Optional[asyncio.Task] = None
    submission: Optional[AsyncSubmission] = None   # the broker exchange: its socket cancels it

    def summary(self) -> dict:
        """What the dashboard shows of a job (no prompt text, no images)."""
        p = self.progress or {}
        out = {"request_id": self.request_id, "source": self.source, "created_s": self.created_s,
               "stage": p.get("stage", "queued"), "step": p.get("step", 0),
               "total_steps": p.get("total_steps", 0), "queue_position": p.get("queue_position"),
               "worker_id": p.get("worker_id"), "eta_s": p.get("eta_s"),
               "has_preview": self.preview is not None, "done": self.final is not None}
        if self.final is not None:
            out["success"] = bool(self.final.get("success"))
            out["error_code"] = self.final.get("error_code")
            out["images"] = len((self.final.get("data") or {}).get("generated_images") or [])
        return out


class JobHub:
    def __init__(self, client: AsyncBrokerClient, *, finished_kept: int = FINISHED_KEPT):
        self.client = client
        self.jobs: "OrderedDict[str, TrackedJob]" = OrderedDict()
        self.finished_kept = finished_kept
        self.watchers: set[asyncio.Queue] = set()  # every event of every job (the dashboard)

    # --- submitting and attaching -------------------------------------------------------------
    def submit(self, request_id: str, body: dict, source: str) -> TrackedJob:
        """Start the job, or return the running / remembered one with this id (an idempotent
        resubmission of the same body). The same id with a different body goes to the broker
        on its own, untracked, and gets the broker's duplicate_request_id."""
        tracked = self.jobs.get(request_id)
        if tracked is not None and body_fingerprint(tracked.body) != body_fingerprint(body):
            stray = TrackedJob(request_id=request_id, body=body, source=source)
            stray.submission = self.client.submit(body)
            stray.task = asyncio.create_task(self._run(stray, notify=False), name=f"duplicate {request_id}")
            return stray
        if tracked is not None and (tracked.final is None or tracked.final.get("success")):
            return tracked
        tracked = TrackedJob(request_id=request_id, body=body, source=source)
        tracked.submission = self.client.submit(body)
        self.jobs[request_id] = tracked
        tracked.task = asyncio.create_task(self._run(tracked), name=f"job {request_id}")
        self._notify_watchers({"type": "job", "job": tracked.summary()})
        return tracked

    def get(self, request_id: str) -> Optional[TrackedJob]:
        return self.jobs.get(request_id)

    def listen(self, tracked: TrackedJob) -> asyncio.Queue:
        """A queue of this job's events from now on: its last progress first (so a late
        listener sees where it is), then each event; the final reply is always the last."""
        queue: asyncio.Queue = asyncio.Queue()
        if tracked.final is not None:
            queue.put_nowait(tracked.final)
            return queue
        if tracked.progress is not None:
            queue.put_nowait(tracked.progress)
        tracked.listeners.add(queue)
        return queue

    def unlisten(self, tracked: TrackedJob, queue: asyncio.Queue) -> None:
        tracked.listeners.discard(queue)

    async def wait(self, tracked: TrackedJob) -> dict:
        await tracked.done.wait()
        return tracked.final

    def running(self) -> list[TrackedJob]:
        return [t for t in self.jobs.values() if t.final is None]

    def finished(self) -> list[TrackedJob]:
        return [t for t in self.jobs.values() if t.final is not None]

    async def cancel(self, request_id: str, timeout_s: float = 10.0) -> dict:
        """Cancel a job; the broker's cancel_response. A job this gateway runs is cancelled on
        its own exchange (the connection that submitted it, which the broker always lets
        cancel); any other id by a cancel_request from a new connection, which the broker
        refuses (`forbidden`) unless this gateway is trusted (the local frontend, an admin key,
        serve --allow-local-cancel). BrokerUnavailable when no answer comes."""
        tracked = self.jobs.get(request_id)
        submission = tracked.submission if tracked is not None else None
        if submission is not None and submission.open and submission.final is None:
            return await submission.cancel(timeout_s)
        return await self.client.request(cancel_body(request_id), timeout_s=timeout_s, retries=0)

    # --- the exchange -------------------------------------------------------------------------
    async def _run(self, tracked: TrackedJob, notify: bool = True) -> None:
        final = None
        try:
            async for message in tracked.submission:
                if message.get("message_type") == C.PROGRESS:
                    if notify:
                        self._on_progress(tracked, message)
                else:
                    final = message
        except Exception as exc:  # broker unreachable after every resend, or a client bug
            log.warning("job %s: no final reply from the broker: %s", tracked.request_id, exc)
            unavailable = isinstance(exc, BrokerUnavailable)
            final = {"message_type": "error_response", "request_id": tracked.request_id,
                     "final": True, "success": False,
                     "error": f"broker unavailable: {exc}" if unavailable else f"{type(exc).__name__}: {exc}",
                     "error_code": C.TIMEOUT if unavailable else C.INTERNAL_ERROR,
                     "errors": [], "warnings": [], "execution_time": 0.0,
                     "timestamp": time.time(), "data": None}
        finally:
            tracked.submission.close()   # deferred while a cancel waits for its reply
        if notify:
            self._on_final(tracked, final)
        else:
            tracked.final = final
            tracked.done.set()

    def _on_progress(self, tracked: TrackedJob, message: dict) -> None:
        preview = message.get("preview")
        if isinstance(preview, (bytes, bytearray)):
            tracked.preview = bytes(preview)
        tracked.progress = message
        for queue in tuple(tracked.listeners):
            queue.put_nowait(message)
        self._notify_watchers({"type": "job", "job": tracked.summary(),
                               "preview": message.get("preview")})

    def _on_final(self, tracked: TrackedJob, final: dict) -> None:
        tracked.final = final
        tracked.done.set()
        for queue in tuple(tracked.listeners):
            queue.put_nowait(final)
        tracked.listeners.clear()
        self._notify_watchers({"type": "job", "job": tracked.summary()})
        self._forget_old()

    def _forget_old(self) -> None:
        finished = [rid for rid, t in self.jobs.items() if t.final is not None]
        for rid in finished[:max(0, len(finished) - self.finished_kept)]:
            del self.jobs[rid]

    def _notify_watchers(self, event: dict) -> None:
        for queue in tuple(self.watchers):
            if queue.qsize() < 100:  # a stalled dashboard drops events rather than grow
                queue.put_nowait(event)

    async def close(self) -> None:
        for tracked in self.running():
            if tracked.task is not None:
                tracked.task.cancel()
