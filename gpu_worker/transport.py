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

import zmq

from protocol import constants as C
from protocol import worker_protocol as W
from protocol.errors import JobError
from protocol.job import Job

log = logging.getLogger(__name__)

JobKey = tuple[str, int]   # (request_id, dispatch_id)


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
                 process_info: dict | None = None):
        self.executor = executor
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
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()     # IO thread -> busy thread
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
            telemetry=self._safe_telemetry())))
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
        self._tasks.put(msg)

    def _on_abort(self, msg: W.AbortJob) -> None:
        if self._jobs.abort((msg.request_id, msg.dispatch_id)):
            log.info("worker %s: abort %s (%s)", self.worker_id, msg.request_id, msg.reason)

    def _on_manage(self, msg: W.Manage) -> None:
        if msg.op == W.MANAGE_LIST_MODELS:   # a directory listing: never wait behind a job
            self._run_manage(msg)
            return
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
        request_id, dispatch_id = task.request_id, task.dispatch_id
        key = (request_id, dispatch_id)
        started = time.perf_counter()
        jobs = self._jobs
        jobs.start(key)
        ok = False
        try:
            if jobs.is_aborted(key):
                raise JobError(C.CANCELLED, "aborted before it started")
            job = Job.from_wire(task.job)

            def progress(stage: str, step: int, total_steps: int, eta_s: float | None = None,
                         preview: bytes | None = None) -> None:
                jobs.step(step)
                if job.stream:
                    self._send(W.encode(W.JobProgress(
                        request_id=request_id, dispatch_id=dispatch_id, stage=stage,
                        step=step, total_steps=total_steps, eta_s=eta_s, preview=preview)))

            data = self.executor.run(job, progress, lambda: jobs.is_aborted(key))
            if jobs.is_aborted(key):  # finished anyway (e.g. a pipeline that decodes after interrupt)
                raise JobError(C.CANCELLED, "aborted")
            warnings = list(data.pop("warnings", []) or [])
            self._send(W.encode(W.JobResult(
                request_id=request_id, dispatch_id=dispatch_id, data=data,
                warnings=[str(w) for w in warnings], execution_time=time.perf_counter() - started)))
            ok = True
        except JobError as exc:
            self._send(W.encode(W.JobFailed(request_id=request_id, dispatch_id=dispatch_id,
                                            code=exc.code, message=exc.message,
                                            details=dict(exc.details or {}))))
        except Exception as exc:  # an executor bug fails this job, never the worker
            log.exception("worker %s: job %s failed", self.worker_id, request_id)
            self._send(W.encode(W.JobFailed(request_id=request_id, dispatch_id=dispatch_id,
                                            code=C.INTERNAL_ERROR,
                                            message=f"{type(exc).__name__}: {exc}")))
        finally:
            jobs.finish(key, ok)

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
