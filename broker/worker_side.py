"""The broker's worker side: backend messages (READY, HEARTBEAT, PROGRESS, RESULT, ERROR,
MANAGE_REPLY, DISCONNECT), liveness, and re-queueing the jobs of a lost worker.

A mixin of broker.server.Broker (same loop thread, same state); kept apart so each module
holds one side of the ROUTER/ROUTER broker. Protocol: docs/worker-protocol.md.
"""

from __future__ import annotations

import logging

import zmq

from protocol import constants as C
from protocol import worker_protocol as W
from protocol.errors import ProtocolError
from protocol.replies import error_reply, final_reply

from broker import management
from broker.jobs import RUNNING, JobState
from broker.registry import WorkerRecord

log = logging.getLogger("broker.server")

# plain ints: pyzmq's enum flag arithmetic shows up in profiles with 1,000 workers
_SNDMORE = int(zmq.SNDMORE)
_BEAT = W.encode(W.BrokerHeartbeat())


class WorkerSide:
    # --- backend -------------------------------------------------------------------------------
    def _backend_handlers(self) -> dict:
        """Message type -> handler(worker record, message), for registered workers (READY is
        handled before the sender is looked up)."""
        return {W.WorkerHeartbeat: self._on_heartbeat, W.JobProgress: self._on_progress,
                W.JobResult: self._on_job_done, W.JobFailed: self._on_job_done,
                W.ManageReply: self._on_manage_reply, W.Disconnect: self._on_disconnect}

    def _on_backend(self, frames: list[bytes]) -> None:
        identity = frames[0]
        try:
            msg = W.decode_from_worker(frames[-1])
        except W.WorkerVersionError as exc:
            if exc.kind == W.READY:
                self._refuse_version(identity, exc.worker_id, exc.version)
            else:
                log.warning("ignoring bad frame from worker %s: %s", identity.hex(), exc)
            return
        except W.WorkerProtocolError as exc:
            log.warning("ignoring bad frame from worker %s: %s", identity.hex(), exc)
            return
        if type(msg) is W.Ready:
            self._on_ready(identity, msg)
            return
        worker = self.registry.by_identity(identity)
        if worker is None:
            if isinstance(msg, (W.JobResult, W.JobFailed)):
                log.warning("discarding late %s for %s from a lost or unknown worker",
                            type(msg).__name__, msg.request_id)
            if type(msg) is not W.Disconnect:
                self.backend.send_multipart([identity, W.encode(
                    W.Disconnect(reason="not registered; send READY again"))])
            return
        self.registry.touch(worker, msg.telemetry if type(msg) is W.WorkerHeartbeat else None)
        self._handlers[type(msg)](worker, msg)

    def _on_heartbeat(self, worker: WorkerRecord, msg: W.WorkerHeartbeat) -> None:
        worker.current_job = msg.current_job
        worker.current_step = msg.current_step
        if self.queue:
            self._dirty = True   # fresh telemetry can change what fits

    def _on_progress(self, worker: WorkerRecord, msg: W.JobProgress) -> None:
        state = self._current_job(worker, msg)
        if state is not None and state.wants_progress:
            self._progress(state, msg.stage, step=msg.step, total_steps=msg.total_steps,
                           worker_id=worker.worker_id)

    def _on_manage_reply(self, worker: WorkerRecord, msg: W.ManageReply) -> None:
        management.on_reply(self, worker, msg)

    def _on_disconnect(self, worker: WorkerRecord, msg: W.Disconnect) -> None:
        log.info("worker %s disconnected: %s", worker.worker_id, msg.reason)
        self._worker_lost(worker, "disconnected")
        self.registry.remove(worker)

    def _refuse_version(self, identity: bytes, worker_id, version) -> None:
        log.error("refusing worker %s: it speaks worker protocol version %s, this broker "
                  "speaks %d", worker_id, version, W.PROTOCOL_VERSION)
        self.backend.send_multipart([identity, W.encode(W.Disconnect(
            fatal=True,
            reason=f"protocol version {version} not supported; broker speaks {W.PROTOCOL_VERSION}"))])

    def _on_ready(self, identity: bytes, msg: W.Ready) -> None:
        if msg.v != W.PROTOCOL_VERSION:
            self._refuse_version(identity, msg.worker_id, msg.v)
            return
        worker, previous = self.registry.register(identity, msg)
        if previous is not None:
            # a fresh READY for a registered id: the old process (or the old transport) holds
            # nothing any more; its jobs and pending management ops are handled as lost
            self._requeue_jobs_of(previous, "re-registered")
            management.on_worker_lost(self, previous)
        self.backend.send_multipart([identity, W.encode(W.BrokerHeartbeat(registered=True))])
        log.info("worker %s registered: %s %s, %.0f MB, pid %d on %s%s", worker.worker_id,
                 worker.device, worker.device_name, worker.memory_total_mb, worker.pid, worker.host,
                 " (SIMULATED)" if worker.simulated else "")
        self._dirty = True

    def _current_job(self, worker: WorkerRecord,
                     msg: W.JobProgress | W.JobResult | W.JobFailed) -> JobState | None:
        state = self.jobs.get(msg.request_id)
        if (state is None or state.state != RUNNING or state.worker_id != worker.worker_id
                or state.dispatch_id != msg.dispatch_id):
            return None
        return state

    def _on_job_done(self, worker: WorkerRecord, msg: W.JobResult | W.JobFailed) -> None:
        rid = msg.request_id
        if worker.jobs.get(rid) == msg.dispatch_id:
            del worker.jobs[rid]
        self._dirty = True
        state = self._current_job(worker, msg)
        if state is None:
            log.info("discarding %s for %s (dispatch %s) from %s: job no longer runs there",
                     type(msg).__name__, rid, msg.dispatch_id, worker.worker_id)
            return
        if type(msg) is W.JobResult:
            worker.jobs_done += 1
            data = msg.data
            metrics = data.get("processing_metrics")
            if isinstance(metrics, dict):
                # from acceptance until the worker started it: the broker's queue, plus the wait
                # of a job prefetched behind another on the worker (so queue + total = elapsed)
                worker_total_s = metrics.get("total_time")
                if isinstance(worker_total_s, (int, float)):
                    queue_s = self.clock() - state.accepted_at - worker_total_s
                else:
                    queue_s = state.dispatched_at - state.accepted_at
                metrics["queue_time"] = round(max(queue_s, 0.0), 6)
                metrics.setdefault("worker_id", worker.worker_id)
            self._finish(state, final_reply(
                state.reply_type, rid, success=True, data=data,
                warnings=state.warnings + msg.warnings,
                execution_time=self.clock() - state.accepted_at))
        else:
            worker.jobs_failed += 1
            code = msg.code if msg.code in C.ERROR_CODES else C.INTERNAL_ERROR
            self._finish(state, error_reply(
                state.reply_type, rid, ProtocolError(code, msg.message or code),
                warnings=state.warnings, execution_time=self.clock() - state.accepted_at))

    # --- worker liveness --------------------------------------------------------------------------
    def _check_liveness(self) -> None:
        """Heartbeat every live worker (one pass, int flags: cheapest per worker measured
        with 1,000 workers) and declare the silent ones lost."""
        send = self.backend.send
        for worker in self.registry.live():
            send(worker.identity, _SNDMORE)
            send(_BEAT)
        for worker in self.registry.expire():
            log.warning("worker %s lost: no heartbeat for %.1f s", worker.worker_id,
                        self.registry.expiry_s)
            try:   # a failure for one lost worker must not skip the others' jobs
                self.metrics.heartbeat_missed(worker.worker_id)
                self._worker_lost(worker, "stopped heart-beating")
            except Exception:
                log.exception("error while handling lost worker %s; the orphan sweep re-queues "
                              "its jobs", worker.worker_id)
        self._requeue_orphans()

    def _requeue_orphans(self) -> None:
        """Safety net for "never lost silently": a running job whose dispatch no live worker
        record holds any more (its worker is lost, forgotten or re-registered and a path above
        failed to move it) is re-queued or failed here, once per liveness pass at most."""
        for state in list(self.jobs.values()):
            if state.state != RUNNING:
                continue
            worker = self.registry.get(state.worker_id or "")
            if (worker is not None and not worker.lost
                    and worker.jobs.get(state.request_id) == state.dispatch_id):
                continue
            log.error("job %s was running on worker %s (dispatch %s) which no longer holds it; "
                      "treating it as lost", state.request_id, state.worker_id, state.dispatch_id)
            self._job_lost(state, state.worker_id or "?", "no longer holds it")

    def _worker_lost(self, worker: WorkerRecord, why: str) -> None:
        if not worker.lost:
            self.registry.mark_lost(worker)
        self._requeue_jobs_of(worker, why)
        management.on_worker_lost(self, worker)

    def _requeue_jobs_of(self, worker: WorkerRecord, why: str) -> None:
        for rid, dispatch_id in list(worker.jobs.items()):
            del worker.jobs[rid]
            state = self.jobs.get(rid)
            if (state is None or state.state != RUNNING or state.worker_id != worker.worker_id
                    or state.dispatch_id != dispatch_id):
                continue
            self._job_lost(state, worker.worker_id, why)

    def _job_lost(self, state: JobState, worker_id: str, why: str) -> None:
        """The worker running `state` is gone: re-queue it, or fail it with worker_lost once
        max_attempts dispatches were used."""
        rid = state.request_id
        state.lost_workers.append(worker_id)
        if state.attempt >= self.config.max_attempts:
            log.warning("job %s: worker %s %s; %d attempt(s) used, giving up", rid,
                        worker_id, why, state.attempt)
            self._finish(state, error_reply(state.reply_type, rid, ProtocolError(
                C.WORKER_LOST, f"worker(s) {', '.join(state.lost_workers)} lost while running "
                               f"the job ({state.attempt} of {self.config.max_attempts} attempts)"),
                warnings=state.warnings, execution_time=self.clock() - state.accepted_at))
        else:
            log.warning("job %s: worker %s %s; re-queued (attempt %d of %d used)", rid,
                        worker_id, why, state.attempt, self.config.max_attempts)
            self._enqueue(state, front=True)
