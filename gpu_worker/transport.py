"""Worker side of the backend: a DEALER to the broker's backend ROUTER.

Two threads, one job each, and one owner per socket (the vLLM EngineCoreProc pattern):
- the IO thread owns the DEALER and nothing else touches it: READY, heartbeats both ways,
  receives JOB / ABORT / MANAGE, sends what the busy thread produced; it reconnects (new
  socket, READY again with what is loaded) when the broker stays silent for heartbeat_liveness
  intervals or says DISCONNECT. On reconnect every job the worker holds is aborted: the broker
  has re-routed them already.
- the busy thread runs executor.run / load_model / cleanup, so a long job never stops the
  heartbeat. It gets its tasks from a queue (the broker's RunJob / Manage messages themselves)
  and hands its PROGRESS / RESULT / ERROR / MANAGE_REPLY frames back through the outbox queue,
  then wakes the IO thread with an empty message on an inproc PUSH socket that only it uses;
  the IO thread owns the PULL end and polls it beside the DEALER (a real zmq_poll, level
  triggered: no edge-triggered ZMQ_FD rules to get right).
- what both threads read or change about the jobs (held, aborted, current, counters) lives in
  _JobBook, behind one lock.
"""

from __future__ import annotations

import logging
import os
import queue
import socket as pysocket
import threading
import time
import uuid
from collections import deque

import zmq

from gpu_worker.executor_api import BatchMember
from protocol import batching
from protocol import constants as C
from protocol import worker_protocol as W
from protocol.errors import JobError
from protocol.job import Job

log = logging.getLogger(__name__)

JobKey = tuple[str, int]   # (request_id, dispatch_id)
# how long the busy thread waits for the rest of a group of jobs the broker dispatched together
# (they are sent back to back, but may arrive in two reads of the socket)
GROUP_WAIT_S = 0.25


class _TaskQueue:
    """The busy thread's tasks (RunJob / Manage messages, None to stop), in arrival order; the
    busy thread may take compatible jobs out of the middle for a batched call."""

    def __init__(self):
        self._items: deque = deque()
        self._changed = threading.Condition()

    def put(self, item) -> None:
        self.put_many([item])

    def put_many(self, items: list) -> None:
        """Several tasks at once: the busy thread sees them all together (one socket read's
        jobs become one batch, not a batch of the first only)."""
        if not items:
            return
        with self._changed:
            self._items.extend(items)
            self._changed.notify_all()

    def get(self):
        with self._changed:
            while not self._items:
                self._changed.wait()
            return self._items.popleft()

    def take_compatible(self, images_of, room: int, window_s: float, group_wait_s: float,
                        group_rest: int) -> list:
        """Take queued tasks for which images_of(task) is not None while their images fit in
        `room`; wait up to window_s for more (and up to group_wait_s while fewer than
        group_rest were taken). A stop (None) ends the wait."""
        taken: list = []
        deadline = time.monotonic() + window_s
        group_deadline = time.monotonic() + group_wait_s
        with self._changed:
            while True:
                for item in list(self._items):
                    if item is None:
                        return taken
                    images = images_of(item)
                    if images is not None and images <= room:
                        self._items.remove(item)
                        taken.append(item)
                        room -= images
                now = time.monotonic()
                until = deadline if len(taken) >= group_rest else max(deadline, group_deadline)
                if room <= 0 or now >= until:
                    return taken
                self._changed.wait(until - now)


class _JobBook:
    """The jobs this worker holds, shared by the IO thread (receives, aborts, reports) and the
    busy thread (runs, finishes): every read and change under one lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held: set[JobKey] = set()      # received and not yet answered
        self._aborted: set[JobKey] = set()   # held, and the broker (or a reconnect) aborted it
        self._current: JobKey | None = None
        self._step = 0
        self._done = 0
        self._failed = 0

    def hold(self, key: JobKey) -> None:
        with self._lock:
            self._held.add(key)

    def abort(self, key: JobKey) -> bool:
        """Mark a held job aborted; False when it is not held (finished already)."""
        with self._lock:
            if key not in self._held:
                return False
            self._aborted.add(key)
            return True

    def abort_all(self) -> None:
        with self._lock:
            self._aborted |= self._held

    def is_aborted(self, key: JobKey) -> bool:
        with self._lock:
            return key in self._aborted

    def start(self, key: JobKey) -> None:
        with self._lock:
            self._current, self._step = key, 0

    def step(self, step: int) -> None:
        with self._lock:
            self._step = step

    def finish(self, key: JobKey, ok: bool) -> None:
        with self._lock:
            if ok:
                self._done += 1
            else:
                self._failed += 1
            self._current, self._step = None, 0
            self._held.discard(key)
            self._aborted.discard(key)

    def snapshot(self) -> tuple[JobKey | None, int, int, int]:
        """(current job, its step, jobs done, jobs failed), consistent with each other."""
        with self._lock:
            return self._current, self._step, self._done, self._failed


class BrokerRefused(RuntimeError):
    """The broker sent a fatal DISCONNECT (e.g. protocol version mismatch)."""


class WorkerTransport:
    def __init__(self, executor, connect: str, *, worker_id: str | None = None,
                 heartbeat_interval_s: float = 1.0, heartbeat_liveness: int = 3,
                 context: zmq.Context | None = None,
                 curve_server_key: str | None = None, curve_client_key: str | None = None,
                 process_info: dict | None = None, max_batch: int = 1,
                 batch_window_ms: float = 0.0):
        self.executor = executor
        # dynamic batching: images per call (1: off), and how long a job waits for companions
        self.max_batch = max(int(max_batch), 1)
        self.batch_window_s = max(float(batch_window_ms), 0.0) / 1000
        # facts about this process sent with every telemetry (e.g. cpu_threads, cpu_affinity)
        self.process_info = dict(process_info or {})
        self.connect = connect
        # CURVE: the broker's public .key file and this worker's .key_secret file (both or none)
        if (curve_server_key is None) != (curve_client_key is None):
            raise ValueError("CURVE needs both curve_server_key and curve_client_key")
        self.curve_files = (curve_server_key, curve_client_key) if curve_server_key else None
        self.worker_id = worker_id or f"{pysocket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_liveness = heartbeat_liveness
        self.context = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._tasks = _TaskQueue()                               # IO thread -> busy thread
        self._arrived: list[W.RunJob] = []   # jobs of the socket read being handled (IO thread)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()    # busy thread -> IO thread (frames)
        self._jobs = _JobBook()
        # the inproc wake-up: PULL owned by the IO thread, PUSH by the busy thread
        self._wake_endpoint = f"inproc://worker-wake-{uuid.uuid4().hex}"
        self._wake_push: zmq.Socket | None = None   # busy thread only
        self._dealer: zmq.Socket | None = None      # IO thread only
        self._busy_thread = threading.Thread(target=self._busy_loop, name="worker-busy", daemon=True)
        self.fatal: str | None = None
        self.registered = threading.Event()
        # message type -> IO-thread handler; a handler may return "reconnect"
        self._handlers = {W.BrokerHeartbeat: self._on_heartbeat, W.RunJob: self._on_job,
                          W.AbortJob: self._on_abort, W.Manage: self._on_manage,
                          W.Disconnect: self._on_disconnect}
        # busy-thread task type -> runner (the tasks are the broker's messages themselves)
        self._runners = {W.RunJob: self._run_job, W.Manage: self._run_manage}

    # --- lifecycle -----------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        """The IO loop, in the calling thread, until stop() or a fatal refusal. Returns an exit code."""
        wake_pull = self.context.socket(zmq.PULL)
        wake_pull.setsockopt(zmq.LINGER, 0)
        wake_pull.bind(self._wake_endpoint)     # before the busy thread connects its PUSH
        self._busy_thread.start()
        poller = zmq.Poller()
        poller.register(wake_pull, zmq.POLLIN)
        self._dealer = self._connect()
        poller.register(self._dealer, zmq.POLLIN)
        interval_s = self.heartbeat_interval_s
        next_heartbeat = time.monotonic() + interval_s
        broker_deadline = time.monotonic() + interval_s * self.heartbeat_liveness
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_heartbeat:
                    self._send_now(W.encode(self._heartbeat()))
                    next_heartbeat = now + interval_s
                timeout_ms = max(0.0, min(next_heartbeat - time.monotonic(), 0.1)) * 1000
                events = dict(poller.poll(timeout_ms))
                if wake_pull in events:
                    _drain(wake_pull)
                self._flush_outbox()   # after draining: a frame queued later brings a new wake-up
                reconnect = False
                if self._dealer in events:
                    frames = _read_all(self._dealer)
                    if frames:
                        broker_deadline = time.monotonic() + interval_s * self.heartbeat_liveness
                    for frame in frames:
                        if self._handle(frame) == "reconnect":
                            reconnect = True
                    self._release_arrived()
                if self.fatal:
                    return 1
                if not reconnect and time.monotonic() > broker_deadline:
                    log.warning("worker %s: broker silent for %.1f s, reconnecting",
                                self.worker_id, interval_s * self.heartbeat_liveness)
                    reconnect = True
                if reconnect:
                    self._abort_all()
                    poller.unregister(self._dealer)
                    self._dealer.close(linger=0)
                    self._dealer = self._connect()
                    poller.register(self._dealer, zmq.POLLIN)
                    broker_deadline = time.monotonic() + interval_s * self.heartbeat_liveness
            self._flush_outbox()
            self._send_now(W.encode(W.Disconnect(reason="worker stopping")))
            return 0
        finally:
            self._tasks.put(None)
            if self._dealer is not None:
                self._dealer.close(linger=200)
                self._dealer = None
            wake_pull.close(linger=0)

    def _send_now(self, frame: bytes) -> None:
        """IO thread: send on the DEALER without blocking (a broker that has not read for a long
        time loses the frame; it re-runs the job when the worker is declared lost)."""
        try:
            self._dealer.send(frame, _NOBLOCK)
        except zmq.Again:
            log.warning("worker %s: broker not reading; message dropped", self.worker_id)

    def _flush_outbox(self) -> None:
        while True:
            try:
                frame = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._send_now(frame)

    def _send(self, frame: bytes) -> None:
        """Busy thread: queue a frame for the IO thread, then wake it."""
        self._outbox.put(frame)
        try:
            self._wake_push.send(b"", _NOBLOCK)
        except zmq.Again:   # wake-ups are queued already: the IO thread is coming
            pass

    # --- IO thread ---------------------------------------------------------------------------
    def _connect(self) -> zmq.Socket:
        dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        if self.curve_files is not None:
            from runtime.curve import make_curve_client
            make_curve_client(dealer, *self.curve_files)
        dealer.connect(self.connect)
        info = self.executor.describe()
        dealer.send(W.encode(W.Ready(
            worker_id=self.worker_id, host=pysocket.gethostname(), pid=os.getpid(),
            device=info.get("device", "cpu"), device_type=info.get("device_type", "cpu"),
            device_name=info.get("device_name", ""),
            memory_total_mb=info.get("memory_total_mb", 0.0),
            capabilities=list(info.get("capabilities", ())),
            worker_types=list(info.get("worker_types", ())),
            simulated=bool(info.get("simulated", False)),
            telemetry=self._safe_telemetry(),
            max_batch=self.max_batch if hasattr(self.executor, "run_batch") else 1)))
        log.info("worker %s: connecting to %s (%s)", self.worker_id, self.connect,
                 "SIMULATED" if info.get("simulated") else info.get("device_name", ""))
        return dealer

    def _handle(self, frame: bytes) -> str | None:
        try:
            msg = W.decode_from_broker(frame)
        except W.WorkerProtocolError as exc:
            log.warning("worker %s: ignoring bad frame from broker: %s", self.worker_id, exc)
            return None
        return self._handlers[type(msg)](msg)

    def _on_heartbeat(self, msg: W.BrokerHeartbeat) -> None:
        if not self.registered.is_set() and msg.registered:
            self.registered.set()
            log.info("worker %s ready on %s", self.worker_id, self.executor.describe().get("device"))

    def _on_job(self, msg: W.RunJob) -> None:
        self._jobs.hold((msg.request_id, msg.dispatch_id))
        self._arrived.append(msg)

    def _release_arrived(self) -> None:
        """Hand the jobs of this read to the busy thread together (see _TaskQueue.put_many)."""
        arrived, self._arrived = self._arrived, []
        self._tasks.put_many(arrived)

    def _on_abort(self, msg: W.AbortJob) -> None:
        if self._jobs.abort((msg.request_id, msg.dispatch_id)):
            log.info("worker %s: abort %s (%s)", self.worker_id, msg.request_id, msg.reason)

    def _on_manage(self, msg: W.Manage) -> None:
        if msg.op == W.MANAGE_LIST_MODELS:   # a directory listing: never wait behind a job
            self._run_manage(msg)
            return
        self._release_arrived()   # in order: the jobs that came before it first
        self._tasks.put(msg)

    def _on_disconnect(self, msg: W.Disconnect) -> str | None:
        if msg.fatal:
            self.fatal = msg.reason
            log.error("worker %s: broker refused this worker: %s", self.worker_id, self.fatal)
            return None
        log.info("worker %s: broker asked to reconnect: %s", self.worker_id, msg.reason)
        return "reconnect"

    def _abort_all(self) -> None:
        self._jobs.abort_all()
        self.registered.clear()

    def _safe_telemetry(self) -> W.Telemetry:
        try:
            return W.Telemetry.from_dict({**self.process_info, **self.executor.telemetry()})
        except Exception:  # a telemetry bug must not stop heartbeats
            log.exception("telemetry failed")
            return W.Telemetry.from_dict(self.process_info)

    def _heartbeat(self) -> W.WorkerHeartbeat:
        current, step, done, failed = self._jobs.snapshot()
        return W.WorkerHeartbeat(
            telemetry=self._safe_telemetry(), busy=current is not None,
            current_job=current[0] if current else None, current_step=step,
            jobs_done=done, jobs_failed=failed)

    # --- busy thread -------------------------------------------------------------------------
    def _busy_loop(self) -> None:
        self._wake_push = self.context.socket(zmq.PUSH)
        self._wake_push.setsockopt(zmq.LINGER, 0)
        self._wake_push.connect(self._wake_endpoint)
        try:
            while True:
                task = self._tasks.get()
                if task is None:
                    return
                self._runners[type(task)](task)
        finally:
            self._wake_push.close(linger=0)

    def _run_job(self, task: W.RunJob) -> None:
        """Run `task`, with the compatible jobs waiting behind it as one batched call when the
        executor can batch (--max-batch > 1)."""
        companions = self._batch_companions(task)
        if companions:
            self._run_batch([task, *companions])
            return
        request_id, dispatch_id = task.request_id, task.dispatch_id
        key = (request_id, dispatch_id)
        started = time.perf_counter()
        jobs = self._jobs
        jobs.start(key)
        outcome: dict | Exception
        try:
            if jobs.is_aborted(key):
                raise JobError(C.CANCELLED, "aborted before it started")
            job = Job.from_wire(task.job)
            outcome = self.executor.run(job, self._progress_fn(task, job), lambda: jobs.is_aborted(key))
        except Exception as exc:  # JobError: the job's own failure; others: an executor bug
            outcome = exc
        self._answer(task, outcome, started)

    def _progress_fn(self, task: W.RunJob, job: Job):
        jobs, request_id, dispatch_id = self._jobs, task.request_id, task.dispatch_id

        def progress(stage: str, step: int, total_steps: int, eta_s: float | None = None,
                     preview: bytes | None = None) -> None:
            jobs.step(step)
            if job.stream:
                self._send(W.encode(W.JobProgress(
                    request_id=request_id, dispatch_id=dispatch_id, stage=stage,
                    step=step, total_steps=total_steps, eta_s=eta_s, preview=preview)))
        return progress

    def _answer(self, task: W.RunJob, outcome, started: float) -> None:
        """RESULT or ERROR for one job, from its reply data or the exception it ended with."""
        request_id, dispatch_id = task.request_id, task.dispatch_id
        key = (request_id, dispatch_id)
        ok = False
        try:
            if isinstance(outcome, dict) and self._jobs.is_aborted(key):
                # finished anyway (e.g. a pipeline that decodes after interrupt)
                outcome = JobError(C.CANCELLED, "aborted")
            if isinstance(outcome, dict):
                warnings = list(outcome.pop("warnings", []) or [])
                self._send(W.encode(W.JobResult(
                    request_id=request_id, dispatch_id=dispatch_id, data=outcome,
                    warnings=[str(w) for w in warnings], execution_time=time.perf_counter() - started)))
                ok = True
            elif isinstance(outcome, JobError):
                self._send(W.encode(W.JobFailed(request_id=request_id, dispatch_id=dispatch_id,
                                                code=outcome.code, message=outcome.message,
                                                details=dict(outcome.details or {}))))
            else:  # an executor bug fails this job, never the worker
                log.error("worker %s: job %s failed", self.worker_id, request_id,
                          exc_info=(type(outcome), outcome, outcome.__traceback__))
                self._send(W.encode(W.JobFailed(request_id=request_id, dispatch_id=dispatch_id,
                                                code=C.INTERNAL_ERROR,
                                                message=f"{type(outcome).__name__}: {outcome}")))
        finally:
            self._jobs.finish(key, ok)

    # --- dynamic batching --------------------------------------------------------------------
    def _batch_companions(self, task: W.RunJob) -> list[W.RunJob]:
        """The jobs waiting in the local queue that can share `task`'s pipeline call
        (protocol.batching.batch_key), up to max_batch images in all. Waits up to
        batch_window_s for more to arrive, and for the rest of a group the broker dispatched
        together (RunJob.batch_of) a little longer, so a group split over two reads of the
        socket is still one call."""
        if self.max_batch <= 1 or not hasattr(self.executor, "run_batch"):
            return []
        try:
            job = Job.from_wire(task.job)
        except Exception:   # _run_job answers it
            return []
        key = batching.batch_key(job)
        if key is None or job.batch_size >= self.max_batch:
            return []

        def compatible(other) -> int | None:
            if not isinstance(other, W.RunJob) or self._jobs.is_aborted((other.request_id, other.dispatch_id)):
                return None
            try:
                other_job = Job.from_wire(other.job)
            except Exception:
                return None
            return other_job.batch_size if batching.batch_key(other_job) == key else None

        room = self.max_batch - job.batch_size
        group_wait_s = GROUP_WAIT_S if task.batch_of > 1 else 0.0
        return self._tasks.take_compatible(compatible, room, self.batch_window_s,
                                           group_wait_s, max(task.batch_of - 1, 0))

    def _run_batch(self, tasks: list[W.RunJob]) -> None:
        started = time.perf_counter()
        jobs = self._jobs
        jobs.start((tasks[0].request_id, tasks[0].dispatch_id))   # the heartbeat names the first
        members, runnable = [], []
        for task in tasks:
            key = (task.request_id, task.dispatch_id)
            try:
                job = Job.from_wire(task.job)
            except Exception as exc:
                self._answer(task, exc, started)
                continue
            members.append(BatchMember(job, self._progress_fn(task, job),
                                       lambda key=key: jobs.is_aborted(key)))
            runnable.append(task)
        log.info("worker %s: batched call of %d jobs (%d images): %s", self.worker_id, len(members),
                 sum(m.job.batch_size for m in members), ", ".join(t.request_id for t in runnable))
        try:
            outcomes = self.executor.run_batch(members)
        except Exception as exc:  # an executor bug fails these jobs, never the worker
            outcomes = [exc] * len(runnable)
        for task, outcome in zip(runnable, outcomes):
            self._answer(task, outcome, started)

    def _run_manage(self, task: W.Manage) -> None:
        op_id, op, args = task.op_id, task.op, task.args
        try:
            if op == W.MANAGE_LOAD_MODEL:
                data = self.executor.load_model(str(args.model_name))
            elif op == W.MANAGE_CLEANUP:
                data = self.executor.cleanup(args.models)
            elif op == W.MANAGE_LIST_MODELS:
                data = {"models": self.executor.list_models()}
            else:
                raise JobError(C.UNKNOWN_MESSAGE_TYPE, f"unknown management op {op!r}")
            self._send(W.encode(W.ManageReply(op_id=op_id, success=True, data=data)))
        except JobError as exc:
            self._send(W.encode(W.ManageReply(op_id=op_id, success=False, code=exc.code,
                                              error=exc.message)))
        except Exception as exc:
            log.exception("worker %s: %s failed", self.worker_id, op)
            self._send(W.encode(W.ManageReply(op_id=op_id, success=False, code=C.INTERNAL_ERROR,
                                              error=f"{type(exc).__name__}: {exc}")))


_NOBLOCK, _EVENTS, _POLLIN = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)


def _read_all(sock: zmq.Socket) -> list[bytes]:
    """Every frame waiting on the socket; ends with a ZMQ_EVENTS check that says none waits
    (asks EVENTS rather than reading until zmq.Again: the exception costs more than a message)."""
    frames = []
    while sock.getsockopt(_EVENTS) & _POLLIN:
        try:
            frames.append(sock.recv(_NOBLOCK))
        except zmq.Again:
            break
    return frames


def _drain(sock: zmq.Socket) -> None:
    """Read every waiting wake-up (they carry nothing)."""
    try:
        while True:
            sock.recv(_NOBLOCK)
    except zmq.Again:
        pass
