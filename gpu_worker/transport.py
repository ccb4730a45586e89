"""Worker side of the backend: a DEALER to the broker's backend ROUTER.

Two threads, one job each:
- the IO thread owns the DEALER socket: READY, heartbeats both ways, receives JOB / ABORT /
  MANAGE, forwards what the busy thread produced; it reconnects (new socket, READY again with
  what is loaded) when the broker stays silent for heartbeat_liveness intervals or says
  DISCONNECT.
- the busy thread runs executor.run / load_model / cleanup, so a long job never stops the
  heartbeat. It hands its messages to the IO thread over an inproc PUSH/PULL pair (each end
  owned by one thread).
On reconnect every job the worker holds is aborted: the broker has re-routed them already.
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


class BrokerRefused(RuntimeError):
    """The broker sent a fatal DISCONNECT (e.g. protocol version mismatch)."""


class WorkerTransport:
    def __init__(self, executor, connect: str, *, worker_id: str | None = None,
                 heartbeat_interval_s: float = 1.0, heartbeat_liveness: int = 3,
                 context: zmq.Context | None = None,
                 curve_server_key: str | None = None, curve_client_key: str | None = None):
        self.executor = executor
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
        self._pipe_endpoint = f"inproc://worker-out-{uuid.uuid4().hex}"
        self._pull = self.context.socket(zmq.PULL)   # IO thread's end, bound before the busy thread
        self._pull.bind(self._pipe_endpoint)
        self._busy_thread = threading.Thread(target=self._busy_loop, name="worker-busy", daemon=True)
        self.fatal: str | None = None
        self.registered = threading.Event()

    # --- lifecycle -----------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        """The IO loop, in the calling thread, until stop() or a fatal refusal. Returns an exit code."""
        self._busy_thread.start()
        dealer = self._connect()
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        interval_s = self.heartbeat_interval_s
        next_heartbeat = time.monotonic() + interval_s
        broker_deadline = time.monotonic() + interval_s * self.heartbeat_liveness
        try:
            while not self._stop.is_set():
                timeout_ms = max(0.0, min(next_heartbeat - time.monotonic(), 0.1)) * 1000
                events = dict(poller.poll(timeout_ms))
                if self._pull in events:
                    # forward everything the busy thread produced
                    for frame in _readable(self._pull):
                        dealer.send(frame)
                reconnect = False
                if dealer in events:
                    for frame in _readable(dealer):
                        broker_deadline = time.monotonic() + interval_s * self.heartbeat_liveness
                        if self._handle(frame) == "reconnect":
                            reconnect = True
                if self.fatal:
                    return 1
                now = time.monotonic()
                if not reconnect and now > broker_deadline:
                    log.warning("worker %s: broker silent for %.1f s, reconnecting",
                                self.worker_id, interval_s * self.heartbeat_liveness)
                    reconnect = True
                if reconnect:
                    poller.unregister(dealer)
                    dealer.close(linger=0)
                    self._abort_all()
                    dealer = self._connect()
                    poller.register(dealer, zmq.POLLIN)
                    broker_deadline = time.monotonic() + interval_s * self.heartbeat_liveness
                if now >= next_heartbeat:
                    dealer.send(W.pack(W.HEARTBEAT, **self._heartbeat_fields()))
                    next_heartbeat = now + interval_s
            dealer.send(W.pack(W.DISCONNECT, reason="worker stopping"))
            return 0
        finally:
            self._tasks.put(None)
            dealer.close(linger=200)
            self._pull.close(linger=0)

    # --- IO thread ---------------------------------------------------------------------------
    def _connect(self) -> zmq.Socket:
        dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        if self.curve_files is not None:
            from broker.curve import make_curve_client
            make_curve_client(dealer, *self.curve_files)
        dealer.connect(self.connect)
        info = self.executor.describe()
        dealer.send(W.pack(
            W.READY, worker_id=self.worker_id, host=pysocket.gethostname(), pid=os.getpid(),
            device=info.get("device", "cpu"), device_type=info.get("device_type", "cpu"),
            device_name=info.get("device_name", ""),
            memory_total_mb=info.get("memory_total_mb", 0.0),
            capabilities=list(info.get("capabilities", ())),
            worker_types=list(info.get("worker_types", ())),
            simulated=bool(info.get("simulated", False)),
            telemetry=self._safe_telemetry()))
        log.info("worker %s: connecting to %s (%s)", self.worker_id, self.connect,
                 "SIMULATED" if info.get("simulated") else info.get("device_name", ""))
        return dealer

    def _handle(self, frame: bytes) -> str | None:
        try:
            msg = W.unpack(frame)
        except W.WorkerProtocolError as exc:
            log.warning("worker %s: ignoring bad frame from broker: %s", self.worker_id, exc)
            return None
        kind = msg["t"]
        if kind == W.HEARTBEAT:
            if not self.registered.is_set() and msg.get("registered"):
                self.registered.set()
                log.info("worker %s ready on %s", self.worker_id, self.executor.describe().get("device"))
        elif kind == W.JOB:
            key = (str(msg.get("request_id")), int(msg.get("dispatch_id") or 0))
            self._held.add(key)
            self._tasks.put(("job", key, msg.get("job")))
        elif kind == W.ABORT:
            key = (str(msg.get("request_id")), int(msg.get("dispatch_id") or 0))
            log.info("worker %s: abort %s (%s)", self.worker_id, key[0], msg.get("reason"))
            self._aborted.add(key)
        elif kind == W.MANAGE:
            self._tasks.put(("manage", msg.get("op_id"), msg))
        elif kind == W.DISCONNECT:
            if msg.get("fatal"):
                self.fatal = str(msg.get("reason"))
                log.error("worker %s: broker refused this worker: %s", self.worker_id, self.fatal)
                return None
            log.info("worker %s: broker asked to reconnect: %s", self.worker_id, msg.get("reason"))
            return "reconnect"
        else:
            log.warning("worker %s: unexpected %s from broker", self.worker_id, kind)
        return None

    def _abort_all(self) -> None:
        self._aborted.update(self._held)
        self.registered.clear()

    def _safe_telemetry(self) -> dict:
        try:
            return self.executor.telemetry()
        except Exception:  # a telemetry bug must not stop heartbeats
            log.exception("telemetry failed")
            return {}

    def _heartbeat_fields(self) -> dict:
        current = self._current
        return {
            "telemetry": self._safe_telemetry(),
            "busy": current is not None,
            "current_job": current[0] if current else None,
            "current_step": self._current_step,
            "jobs_done": self._jobs_done,
            "jobs_failed": self._jobs_failed,
        }

    # --- busy thread -------------------------------------------------------------------------
    def _busy_loop(self) -> None:
        push = self.context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(self._pipe_endpoint)
        try:
            while True:
                task = self._tasks.get()
                if task is None:
                    return
                if task[0] == "job":
                    self._run_job(push, task[1], task[2])
                else:
                    self._run_manage(push, task[1], task[2])
        finally:
            push.close()

    def _run_job(self, push: zmq.Socket, key: tuple[str, int], job_wire: dict) -> None:
        request_id, dispatch_id = key
        started = time.perf_counter()
        self._current, self._current_step = key, 0
        try:
            if key in self._aborted:
                raise JobError(C.CANCELLED, "aborted before it started")
            job = Job.from_wire(job_wire)

            def progress(stage: str, step: int, total_steps: int) -> None:
                self._current_step = step
                if job.stream:
                    push.send(W.pack(W.PROGRESS, request_id=request_id, dispatch_id=dispatch_id,
                                     stage=stage, step=step, total_steps=total_steps))

            data = self.executor.run(job, progress, lambda: key in self._aborted)
            if key in self._aborted:  # finished anyway (e.g. a pipeline that decodes after interrupt)
                raise JobError(C.CANCELLED, "aborted")
            warnings = list(data.pop("warnings", []) or [])
            push.send(W.pack(W.RESULT, request_id=request_id, dispatch_id=dispatch_id, data=data,
                             warnings=warnings, execution_time=time.perf_counter() - started))
            self._jobs_done += 1
        except JobError as exc:
            self._jobs_failed += 1
            push.send(W.pack(W.ERROR, request_id=request_id, dispatch_id=dispatch_id, code=exc.code,
                             message=exc.message, details=exc.details))
        except Exception as exc:  # an executor bug fails this job, never the worker
            self._jobs_failed += 1
            log.exception("worker %s: job %s failed", self.worker_id, request_id)
            push.send(W.pack(W.ERROR, request_id=request_id, dispatch_id=dispatch_id,
                             code=C.INTERNAL_ERROR, message=f"{type(exc).__name__}: {exc}", details={}))
        finally:
            self._current, self._current_step = None, 0
            self._held.discard(key)
            self._aborted.discard(key)

    def _run_manage(self, push: zmq.Socket, op_id, msg: dict) -> None:
        op, args = msg.get("op"), msg.get("args") or {}
        try:
            if op == W.MANAGE_LOAD_MODEL:
                data = self.executor.load_model(str(args.get("model_name")))
            elif op == W.MANAGE_CLEANUP:
                data = self.executor.cleanup(args.get("models"))
            else:
                raise JobError(C.UNKNOWN_MESSAGE_TYPE, f"unknown management op {op!r}")
            push.send(W.pack(W.MANAGE_REPLY, op_id=op_id, success=True, data=data))
        except JobError as exc:
            push.send(W.pack(W.MANAGE_REPLY, op_id=op_id, success=False, code=exc.code,
                             error=exc.message, data=None))
        except Exception as exc:
            log.exception("worker %s: %s failed", self.worker_id, op)
            push.send(W.pack(W.MANAGE_REPLY, op_id=op_id, success=False, code=C.INTERNAL_ERROR,
                             error=f"{type(exc).__name__}: {exc}", data=None))


_NOBLOCK, _EVENTS, _POLLIN = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)


def _readable(sock: zmq.Socket):
    """Every frame waiting on a socket the poller reported readable (asks EVENTS rather than
    reading until zmq.Again: the exception costs more than the message)."""
    first = True
    while first or sock.getsockopt(_EVENTS) & _POLLIN:
        first = False
        try:
            yield sock.recv(_NOBLOCK)
        except zmq.Again:
            return
