"""Worker side of the backend: a DEALER to the broker's backend ROUTER.

Two threads, one job each:
- the IO thread owns the DEALER socket: READY, heartbeats both ways, receives JOB / ABORT /
  MANAGE, forwards what the busy thread produced; it reconnects (new socket, READY again with
  what is loaded) when the broker stays silent for heartbeat_liveness intervals or says
  DISCONNECT.
- the busy thread runs executor.run / load_model / cleanup, so a long job never stops the
  heartbeat. It sends its own PROGRESS / RESULT / ERROR on the DEALER, under a lock.
Sharing the socket: ZeroMQ allows a socket to pass between threads behind a full memory barrier
(the lock), but not a blocking zmq_poll in one thread while another sends. So the IO thread
waits on the socket's ZMQ_FD (an OS file descriptor: waiting on it does not touch the socket)
and reads under the lock. ZMQ_FD is edge-triggered and any socket call may consume its signal,
so after each send the busy thread checks ZMQ_EVENTS and wakes the IO thread (a pipe) when a
message is waiting, and the IO thread waits only after a ZMQ_EVENTS check found nothing. This replaced an inproc PUSH/PULL hop through the IO thread per message:
one thread wake-up less per job (bench/broker_overhead.py).
On reconnect every job the worker holds is aborted: the broker has re-routed them already.
"""

from __future__ import annotations

import logging
import os
import queue
import select
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
        self._tasks: queue.Queue = queue.Queue()
        self._aborted: set[tuple[str, int]] = set()   # (request_id, dispatch_id)
        self._held: set[tuple[str, int]] = set()   # jobs received and not yet answered
        self._current: tuple[str, int] | None = None
        self._current_step = 0
        self._jobs_done = 0
        self._jobs_failed = 0
        self._dealer: zmq.Socket | None = None      # used by both threads, only under the lock
        self._dealer_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()      # busy thread -> IO thread: "a message waits"
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
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
        self._busy_thread.start()
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        dealer_fd = self._reconnect(poller, None)
        interval_s = self.heartbeat_interval_s
        next_heartbeat = time.monotonic() + interval_s
        broker_deadline = time.monotonic() + interval_s * self.heartbeat_liveness
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                beat = None
                if now >= next_heartbeat:   # telemetry is gathered outside the lock
                    beat = W.encode(self._heartbeat())
                    next_heartbeat = now + interval_s
                with self._dealer_lock:
                    if beat is not None:
                        self._dealer.send(beat)
                    # last call on the socket before waiting: ZMQ_FD signals anything after it
                    frames = _read_all(self._dealer)
                reconnect = False
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
                    dealer_fd = self._reconnect(poller, dealer_fd)
                    broker_deadline = time.monotonic() + interval_s * self.heartbeat_liveness
                    continue   # read (ZMQ_EVENTS) before the first wait on the new socket
                # wait only after a ZMQ_EVENTS check found nothing: a new socket's ZMQ_FD does
                # not signal its first message until one has (a 100 ms stall on the first job)
                timeout_ms = max(0.0, min(next_heartbeat - time.monotonic(), 0.1)) * 1000
                if any(fd == self._wake_r for fd, _ in poller.poll(timeout_ms)):
                    _drain_pipe(self._wake_r)
            with self._dealer_lock:
                self._dealer.send(W.encode(W.Disconnect(reason="worker stopping")))
            return 0
        finally:
            self._tasks.put(None)
            with self._dealer_lock:
                if self._dealer is not None:
                    self._dealer.close(linger=200)
                    self._dealer = None
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _reconnect(self, poller, old_fd: int | None) -> int:
        """A new DEALER (READY sent) in place of the old one; returns its ZMQ_FD, registered."""
        with self._dealer_lock:
            if self._dealer is not None:
                self._dealer.close(linger=0)
            self._dealer = self._connect()
            fd = self._dealer.getsockopt(zmq.FD)
        if old_fd is not None:
            poller.unregister(old_fd)
        poller.register(fd, select.POLLIN)
        return fd

    def _send(self, frame: bytes) -> None:
        """Send from the busy thread; wake the IO thread if the call consumed a ZMQ_FD signal
        for a message that is now waiting."""
        with self._dealer_lock:
            dealer = self._dealer
            if dealer is None:   # stopping
                return
            try:
                dealer.send(frame, _NOBLOCK)
            except zmq.Again:   # the broker has not read for a long time; it re-runs the job
                log.warning("worker %s: broker not reading; message dropped", self.worker_id)
            if dealer.getsockopt(_EVENTS) & _POLLIN:
                try:
                    os.write(self._wake_w, b"!")
                except BlockingIOError:   # the pipe is full of wake-ups already
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
        self._held.add((msg.request_id, msg.dispatch_id))
        self._tasks.put(msg)

    def _on_abort(self, msg: W.AbortJob) -> None:
        log.info("worker %s: abort %s (%s)", self.worker_id, msg.request_id, msg.reason)
        self._aborted.add((msg.request_id, msg.dispatch_id))

    def _on_manage(self, msg: W.Manage) -> None:
        self._tasks.put(msg)

    def _on_disconnect(self, msg: W.Disconnect) -> str | None:
        if msg.fatal:
            self.fatal = msg.reason
            log.error("worker %s: broker refused this worker: %s", self.worker_id, self.fatal)
            return None
        log.info("worker %s: broker asked to reconnect: %s", self.worker_id, msg.reason)
        return "reconnect"

    def _abort_all(self) -> None:
        self._aborted.update(self._held)
        self.registered.clear()

    def _safe_telemetry(self) -> W.Telemetry:
        try:
            return W.Telemetry.from_dict({**self.process_info, **self.executor.telemetry()})
        except Exception:  # a telemetry bug must not stop heartbeats
            log.exception("telemetry failed")
            return W.Telemetry.from_dict(self.process_info)

    def _heartbeat(self) -> W.WorkerHeartbeat:
        current = self._current
        return W.WorkerHeartbeat(
            telemetry=self._safe_telemetry(), busy=current is not None,
            current_job=current[0] if current else None, current_step=self._current_step,
            jobs_done=self._jobs_done, jobs_failed=self._jobs_failed)

    # --- busy thread -------------------------------------------------------------------------
    def _busy_loop(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            self._runners[type(task)](task)

    def _run_job(self, task: W.RunJob) -> None:
        request_id, dispatch_id = task.request_id, task.dispatch_id
        key = (request_id, dispatch_id)
        started = time.perf_counter()
        self._current, self._current_step = key, 0
        try:
            if key in self._aborted:
                raise JobError(C.CANCELLED, "aborted before it started")
            job = Job.from_wire(task.job)

            def progress(stage: str, step: int, total_steps: int, eta_s: float | None = None,
                         preview: bytes | None = None) -> None:
                self._current_step = step
                if job.stream:
                    self._send(W.encode(W.JobProgress(
                        request_id=request_id, dispatch_id=dispatch_id, stage=stage,
                        step=step, total_steps=total_steps, eta_s=eta_s, preview=preview)))

            data = self.executor.run(job, progress, lambda: key in self._aborted)
            if key in self._aborted:  # finished anyway (e.g. a pipeline that decodes after interrupt)
                raise JobError(C.CANCELLED, "aborted")
            warnings = list(data.pop("warnings", []) or [])
            self._send(W.encode(W.JobResult(
                request_id=request_id, dispatch_id=dispatch_id, data=data,
                warnings=[str(w) for w in warnings], execution_time=time.perf_counter() - started)))
            self._jobs_done += 1
        except JobError as exc:
            self._jobs_failed += 1
            self._send(W.encode(W.JobFailed(request_id=request_id, dispatch_id=dispatch_id,
                                            code=exc.code, message=exc.message,
                                            details=dict(exc.details or {}))))
        except Exception as exc:  # an executor bug fails this job, never the worker
            self._jobs_failed += 1
            log.exception("worker %s: job %s failed", self.worker_id, request_id)
            self._send(W.encode(W.JobFailed(request_id=request_id, dispatch_id=dispatch_id,
                                            code=C.INTERNAL_ERROR,
                                            message=f"{type(exc).__name__}: {exc}")))
        finally:
            self._current, self._current_step = None, 0
            self._held.discard(key)
            self._aborted.discard(key)

    def _run_manage(self, task: W.Manage) -> None:
        op_id, op, args = task.op_id, task.op, task.args
        try:
            if op == W.MANAGE_LOAD_MODEL:
                data = self.executor.load_model(str(args.model_name))
            elif op == W.MANAGE_CLEANUP:
                data = self.executor.cleanup(args.models)
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


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
