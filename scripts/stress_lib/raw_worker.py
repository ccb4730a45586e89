"""Misbehaving workers: raw DEALER peers on the broker's backend that speak the worker protocol
(protocol/worker_protocol.py, docs/worker-protocol.md) by hand, the way a rogue process on the
machine would. All are SIMULATED (they run no model) and their ids start with `stress-`, so the
broker's log and status name them as what they are.

- `StuckWorker`: registers like a healthy simulated worker (capabilities and telemetry copied
  from a real one, so routing likes it), heart-beats on time, accepts jobs, never finishes one
  (an ABORT is noted, not obeyed: a hung executor cannot obey), then vanishes.
- `PoisonWorker`: registers for a worker type no job asks for (so it holds no client's job),
  then sends garbage: telemetry `"x"`, `free_mb: "abc"`, bytes that are not msgpack, unknown
  types, out-of-range fields, ... ; after a DISCONNECT it registers again and goes on.
- `RogueWorker`: sends READY with a live real worker's id from its own connection, again and
  again; then registers under its own id and sends RESULT/ERROR/PROGRESS for jobs it never got,
  marked so the ledger can tell if a forged result ever reached a client.

Each peer is one thread that owns its socket (one thread per socket).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter
from typing import Callable

import msgpack
import zmq

from protocol import worker_protocol as W

from .bodies import FORGED_MARK

log = logging.getLogger("stress.raw_worker")

# a worker type no request asks for: the broker's routing gives such a worker no job
NO_JOBS_TYPE = "stress-no-such-worker-type"


def _raw(fields: dict) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def _beat(**fields) -> bytes:
    return _raw({"t": W.HEARTBEAT, "v": W.PROTOCOL_VERSION, **fields})


def _deeply_nested_beat(depth: int) -> bytes:
    """A HEARTBEAT whose telemetry is `depth` maps deep (written by hand: msgpack's own
    packer stops at 512 levels)."""
    head = b"\x83" + b"".join(msgpack.packb(x) for x in ("t", W.HEARTBEAT, "v",
                                                          W.PROTOCOL_VERSION, "telemetry"))
    return head + b"\x81\xa1a" * depth + msgpack.packb(1)


# name -> a frame list (most are one frame; the backend reads one msgpack map per message)
POISON_FRAMES: dict[str, Callable[[], list[bytes]]] = {
    "telemetry_x": lambda: [_beat(telemetry="x")],
    "free_mb_abc": lambda: [_beat(telemetry={"memory": {"total_mb": 8000, "used_mb": 10,
                                                        "free_mb": "abc"}})],
    "not_msgpack": lambda: [b"\xc1\xc1 this is not msgpack \xff"],
    "empty_frame": lambda: [b""],
    "msgpack_list": lambda: [_raw([W.HEARTBEAT, 1, {"telemetry": {}}])],
    "no_type": lambda: [_raw({"v": W.PROTOCOL_VERSION, "busy": True})],
    "unknown_type": lambda: [_raw({"t": "EXPLODE", "v": W.PROTOCOL_VERSION})],
    "negative_step": lambda: [_beat(busy=True, current_step=-5)],
    "busy_is_text": lambda: [_beat(busy="yes")],
    "nan_memory": lambda: [_beat(telemetry={"memory": {"total_mb": math.nan, "used_mb": 0}})],
    "negative_memory": lambda: [_beat(telemetry={"memory": {"total_mb": -1e12, "used_mb": 0}})],
    "models_loaded_text": lambda: [_beat(telemetry={"models_loaded": "tiny-sdxl"})],
    "step_times_text": lambda: [_beat(telemetry={"step_time_s": {"tiny-sdxl@256x256": "fast"}})],
    "huge_job_id": lambda: [_beat(busy=True, current_job="j" * 100_000)],
    "deep_nesting": lambda: [_deeply_nested_beat(100_000)],
    "result_without_ids": lambda: [_raw({"t": W.RESULT, "v": W.PROTOCOL_VERSION, "data": {}})],
    # two frames after the identity: the broker reads the last one, a valid heartbeat
    "two_frames": lambda: [_beat(), _beat()],
}


class RawWorker(threading.Thread):
    """The shared loop: connect, (re)register, read what the broker sends, act on a timer."""

    role = "raw"

    def __init__(self, ctx: zmq.Context, backend: str, worker_id: str, stop: threading.Event,
                 duration_s: float, heartbeat_interval_s: float):
        super().__init__(name=f"{self.role}-{worker_id}", daemon=True)
        self.ctx, self.backend, self.worker_id = ctx, backend, worker_id
        self.stop, self.duration_s = stop, duration_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.sock: zmq.Socket | None = None
        self.registered_at: float | None = None
        self.disconnects: list[str] = []      # reasons of DISCONNECTs from the broker
        self.jobs: dict[str, int] = {}        # request_id -> dispatch_id, jobs handed to us
        self.job_ids_seen: list[str] = []
        self.aborts: list[str] = []
        self.sent = Counter()
        self.left_at: float | None = None     # time.monotonic() when this peer went away
        self.error: BaseException | None = None
        self._next_beat = 0.0

    # --- plumbing --------------------------------------------------------------------------
    def _open(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.backend)

    def send(self, frames: list[bytes], what: str) -> None:
        self.sock.send_multipart(frames)
        self.sent[what] += 1

    def ready_message(self) -> W.Ready:
        return W.Ready(worker_id=self.worker_id, host="stress-raw-peer", pid=os.getpid(),
                       simulated=True, worker_types=[NO_JOBS_TYPE])

    def register(self) -> None:
        self.send([W.encode(self.ready_message())], "READY")

    def heartbeat(self) -> W.WorkerHeartbeat:
        return W.WorkerHeartbeat(telemetry=self.ready_message().telemetry)

    def run(self) -> None:
        started = time.monotonic()
        try:
            self._open()
            self.begin()
            while not self.stop.is_set() and time.monotonic() - started < self.duration_s:
                if self.sock.poll(50, zmq.POLLIN):
                    while self.sock.poll(0, zmq.POLLIN):
                        self._receive(self.sock.recv_multipart())
                now = time.monotonic()
                if now >= self._next_beat and self.registered_at is not None:
                    self._next_beat = now + self.heartbeat_interval_s
                    self.send([W.encode(self.heartbeat())], "HEARTBEAT")
                self.act(now)
        except BaseException as exc:
            self.error = exc
            log.exception("%s %s crashed", self.role, self.worker_id)
        finally:
            self.left_at = time.monotonic()
            if self.sock is not None:
                self.sock.close(linger=0)   # vanish: no DISCONNECT, like a process that hangs up

    def _receive(self, frames: list[bytes]) -> None:
        try:
            msg = W.decode_from_broker(frames[-1])
        except W.WorkerProtocolError as exc:
            log.warning("%s %s: undecodable frame from the broker: %s", self.role,
                        self.worker_id, exc)
            return
        if isinstance(msg, W.BrokerHeartbeat):
            if msg.registered and self.registered_at is None:
                self.registered_at = time.monotonic()
        elif isinstance(msg, W.RunJob):
            self.jobs[msg.request_id] = msg.dispatch_id
            self.job_ids_seen.append(msg.request_id)
        elif isinstance(msg, W.AbortJob):
            self.aborts.append(msg.request_id)
        elif isinstance(msg, W.Disconnect):
            self.disconnects.append(msg.reason)
            self.registered_at = None
            self.on_disconnect(msg)

    # --- hooks -------------------------------------------------------------------------------
    def begin(self) -> None:
        self.register()

    def act(self, now: float) -> None:
        pass

    def on_disconnect(self, msg: W.Disconnect) -> None:
        pass

    def summary(self) -> dict:
        return {"worker_id": self.worker_id, "role": self.role, "frames_sent": dict(self.sent),
                "registered": self.registered_at is not None or bool(self.job_ids_seen),
                "disconnects": len(self.disconnects),
                "disconnect_reasons": sorted(set(self.disconnects))[:3],
                "jobs_taken": len(self.job_ids_seen), "aborts_received": len(self.aborts)}


class StuckWorker(RawWorker):
    """Looks like a healthy simulated worker (template: a real worker's status row), takes
    jobs, heart-beats on time reporting step 1 of its first job, and never finishes any."""

    role = "stuck"

    def __init__(self, *args, template: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.template = template

    def ready_message(self) -> W.Ready:
        t = self.template
        memory = t.get("memory") or {}
        models = t.get("model_sizes_mb") or {}
        telemetry = W.Telemetry(
            memory=W.DeviceMemory(total_mb=float(memory.get("total_mb") or 0.0),
                                  used_mb=float(memory.get("used_mb") or 0.0)),
            models_loaded=[W.LoadedModel(name=n, size_mb=float(s)) for n, s in models.items()],
            step_time_s={k: float(v) for k, v in (t.get("step_time_s") or {}).items()},
            load_time_s={k: float(v) for k, v in (t.get("load_time_s") or {}).items()},
            simulated=True)
        return W.Ready(worker_id=self.worker_id, host="stress-stuck-peer", pid=os.getpid(),
                       device=str(t.get("device") or "cpu"),
                       device_type=str(t.get("device_type") or "cpu"),
                       memory_total_mb=float(memory.get("total_mb") or 0.0),
                       capabilities=list(t.get("capabilities") or []),
                       worker_types=list(t.get("worker_types") or []),
                       simulated=True, telemetry=telemetry)

    def heartbeat(self) -> W.WorkerHeartbeat:
        current = next(iter(self.jobs), None)
        return W.WorkerHeartbeat(telemetry=self.ready_message().telemetry,
                                 busy=current is not None, current_job=current,
                                 current_step=1 if current else 0)

    def on_disconnect(self, msg: W.Disconnect) -> None:
        self.jobs.clear()
        if not msg.fatal:
            self.register()   # as a real worker would: READY again at once


class PoisonWorker(RawWorker):
    """Garbage before registering, then garbage every `period_s` between valid heartbeats;
    registers again after each DISCONNECT."""

    role = "poison"

    def __init__(self, *args, period_s: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.period_s = period_s
        self._kinds = list(POISON_FRAMES)
        self._n = 0
        self._next_poison = 0.0

    def begin(self) -> None:
        for kind in ("telemetry_x", "not_msgpack", "free_mb_abc"):  # before any READY
            self.send(POISON_FRAMES[kind](), f"poison:{kind}")
        self.register()

    def act(self, now: float) -> None:
        if now < self._next_poison:
            return
        self._next_poison = now + self.period_s
        kind = self._kinds[self._n % len(self._kinds)]
        self._n += 1
        self.send(POISON_FRAMES[kind](), f"poison:{kind}")

    def on_disconnect(self, msg: W.Disconnect) -> None:
        if not msg.fatal:
            self.register()

    def poison_sent(self) -> int:
        return sum(n for k, n in self.sent.items() if k.startswith("poison:"))


class RogueWorker(RawWorker):
    """Phase 1: READY with `victim_id` (a live real worker's id) every `period_s` from this
    connection. Phase 2 (a new connection, its own id, no jobs): forged RESULT, ERROR and
    PROGRESS for `targets()` (request ids clients wait for), dispatch ids guessed."""

    role = "rogue"

    def __init__(self, *args, victim_id: str, targets: Callable[[], list[str]],
                 takeover_attempts: int = 25, period_s: float = 0.15, **kwargs):
        super().__init__(*args, **kwargs)
        self.victim_id = victim_id
        self.targets = targets
        self.takeover_attempts = takeover_attempts
        self.period_s = period_s
        self.forged_for: set[str] = set()
        self.takeover_registered = False
        self._attempts = 0
        self._next = 0.0
        self._phase = "takeover"

    def begin(self) -> None:
        pass   # nothing until act(): the first READY is the impersonation

    def act(self, now: float) -> None:
        if now < self._next:
            return
        self._next = now + self.period_s
        if self._phase == "takeover":
            # the broker answers a READY it accepts with HEARTBEAT{registered}: a takeover
            self.takeover_registered |= self.registered_at is not None
            if self._attempts < self.takeover_attempts:
                self._attempts += 1
                self.send([W.encode(W.Ready(
                    worker_id=self.victim_id, host="stress-rogue", pid=os.getpid(),
                    simulated=True, worker_types=[NO_JOBS_TYPE]))], "READY-as-victim")
                return
            self._phase = "forge"
            self.registered_at = None
            self._open()          # a new connection, its own id
            self.register()
            return
        targets = [t for t in self.targets() if t not in self.forged_for][:4]
        for rid in targets:
            self.forged_for.add(rid)
            base = time.time_ns()
            for dispatch_id in (0, 1, base, base - 1):
                self.send([W.encode(W.JobProgress(request_id=rid, dispatch_id=dispatch_id,
                                                  stage=FORGED_MARK, step=1, total_steps=2))],
                          "forged PROGRESS")
                self.send([W.encode(W.JobResult(request_id=rid, dispatch_id=dispatch_id, data={
                    "generated_images": [{"index": 0, "seed": 666, "sha256": FORGED_MARK}],
                    "processing_metrics": {"worker_id": self.victim_id}}))], "forged RESULT")
                self.send([W.encode(W.JobFailed(request_id=rid, dispatch_id=dispatch_id,
                                                code="out_of_memory", message=FORGED_MARK))],
                          "forged ERROR")

    def summary(self) -> dict:
        return {**super().summary(), "victim_id": self.victim_id,
                "takeover_registered": self.takeover_registered,
                "jobs_forged_for": len(self.forged_for)}
