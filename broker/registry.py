"""Worker registry: who is connected, what each can run, and whether it is still alive.

Paranoid-Pirate liveness: every message from a worker refreshes its expiry to
`now + heartbeat_interval_s * heartbeat_liveness`; a worker past its expiry is declared lost.
The clock is injected so the liveness logic is tested without sleeping.

Health, beside liveness: a worker alive but making no progress on the jobs it holds (the
stuck-job watchdog, broker/watchdog.py, reads `progress_at`) is marked unhealthy until it
finishes a job; routing gives unhealthy workers only probe jobs (broker/routing.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from protocol.worker_protocol import Ready, Telemetry, WorkerHeartbeat

if TYPE_CHECKING:
    from broker.routing import DispatchEstimate

log = logging.getLogger(__name__)

# Lost workers stay visible in status (state "lost") this long, then are forgotten.
LOST_VISIBLE_S = 60.0


@dataclass
class WorkerRecord:
    worker_id: str
    identity: bytes                  # ROUTER identity of its DEALER socket
    device: str = "cpu"
    device_type: str = "cpu"
    device_name: str = ""
    host: str = ""
    pid: int = 0
    memory_total_mb: float = 0.0
    capabilities: frozenset[str] = frozenset()
    worker_types: frozenset[str] = frozenset()
    simulated: bool = False
    max_batch: int = 1               # images it runs in one batched call (READY; 1: no batching)
    telemetry: Telemetry = field(default_factory=Telemetry)
    expiry: float = 0.0              # clock time after which it is lost
    last_heartbeat: float = 0.0      # clock time of the last message from it
    registered_at: float = 0.0
    lost: bool = False
    lost_at: float = 0.0
    jobs: dict[str, int] = field(default_factory=dict)  # request_id -> dispatch_id it runs
    # request_id -> routing's estimate recorded at dispatch, so routing can count a worker's
    # backlog; entries for request_ids no longer in `jobs` are ignored
    estimates: dict[str, DispatchEstimate] = field(default_factory=dict)
    # request_ids sent as batch companions of another job (dynamic batching): they ride in that
    # job's pipeline call, so they take no slot of their own (see `calls`)
    companions: set[str] = field(default_factory=set)
    current_job: str | None = None   # request_id the worker said (last heartbeat) it runs
    current_step: int = 0            # ... and the step it had reached
    jobs_done: int = 0
    jobs_failed: int = 0
    loading: bool = False            # a model_load_request is running on it
    # --- progress and health (the stuck-job watchdog) ---
    progress_at: float = 0.0         # clock time it last showed progress on the jobs it holds
    work_report: tuple = ()          # what its last heartbeat said about its work (compared)
    unhealthy_since: float | None = None   # the watchdog fired on it and it has not finished a job since
    unhealthy_reason: str = ""
    stalls: int = 0                  # times the watchdog fired on it
    last_success_at: float | None = None   # clock time of its last successful result
    _memory: dict | None = field(default=None, repr=False)
    _models_loaded: dict | None = field(default=None, repr=False)
    _loaded_total_mb: float = field(default=0.0, repr=False)
    _warm: frozenset = field(default=frozenset(), repr=False)

    # --- views the routing policy reads -------------------------------------------------
    @property
    def calls(self) -> int:
        """Pipeline calls it holds: its jobs less the batch companions riding in another's call
        (the broker's max_jobs_per_worker counts these: one running, one prefetched)."""
        return len(self.jobs) - len(self.companions)

    @property
    def healthy(self) -> bool:
        return self.unhealthy_since is None

    @property
    def probe_ready(self) -> bool:
        """Unhealthy, but it may take one probe job: it holds none, and its heartbeat says it
        runs nothing (it let go of the job it was stuck on)."""
        return not self.healthy and not self.jobs and self.current_job is None

    @property
    def state(self) -> str:
        if self.lost:
            return "lost"
        if self.loading or self.telemetry.models_loading:
            return "loading"
        return "busy" if self.jobs else "idle"

    def set_telemetry(self, telemetry: Telemetry) -> bool:
        """Store a worker's telemetry; the views routing reads are rebuilt on first use
        (with 1,000 heart-beating workers most telemetry is never routed on). The model views
        survive a heartbeat whose model lists did not change, which is nearly every one.
        Returns whether they changed."""
        previous = self.telemetry
        self.telemetry = telemetry
        self._memory = None
        if (telemetry.models_loaded != previous.models_loaded
                or telemetry.models_loading != previous.models_loading
                or telemetry.model_sizes_mb != previous.model_sizes_mb):
            self._models_loaded = None
            return True
        return False

    def _build_memory_view(self) -> None:
        mem = self.telemetry.memory
        total = mem.total_mb or self.memory_total_mb
        used = mem.used_mb
        free = mem.free_mb
        self._memory = {"total_mb": total, "used_mb": used,
                        "free_mb": free if free is not None else max(total - used, 0.0)}

    def _build_model_views(self) -> None:
        telemetry = self.telemetry
        models = {m.name: m.size_mb for m in telemetry.models_loaded}
        self._models_loaded = models
        self._loaded_total_mb = sum(models.values())
        self._warm = frozenset(models) | frozenset(telemetry.models_loading)

    @property
    def memory(self) -> dict:
        if self._memory is None:
            self._build_memory_view()
        return self._memory

    def reported_model_sizes(self) -> dict[str, float]:
        """What this worker says about model sizes: its catalogue (model_sizes_mb), then the
        sizes it measured when loading, which win."""
        sizes = dict(self.telemetry.model_sizes_mb)
        sizes.update((name, mb) for name, mb in self.models_loaded.items() if mb > 0)
        return sizes

    @property
    def loaded_total_mb(self) -> float:
        """Sum of the sizes in models_loaded (what the worker could evict)."""
        if self._models_loaded is None:
            self._build_model_views()
        return self._loaded_total_mb

    @property
    def warm(self) -> frozenset[str]:
        """Models loaded or being loaded: a job needing only these loads nothing."""
        if self._models_loaded is None:
            self._build_model_views()
        return self._warm

    @property
    def models_loaded(self) -> dict[str, float]:
        """name -> size_mb of every model the worker holds warm."""
        if self._models_loaded is None:
            self._build_model_views()
        return self._models_loaded

    def step_time_s(self, model: str, width: int, height: int) -> float | None:
        table = self.telemetry.step_time_s
        exact = table.get(f"{model}@{width}x{height}")
        if exact is not None:
            return float(exact)
        # scale a measurement at another resolution by pixel count (denoising cost ~ pixels)
        for key, seconds in table.items():
            name, _, res = key.rpartition("@")
            if name == model and "x" in res:
                try:
                    w, h = (int(v) for v in res.split("x"))
                    return seconds * (width * height) / max(w * h, 1)
                except ValueError:
                    continue
        return None

    def load_time_s(self, model: str) -> float | None:
        return self.telemetry.load_time_s.get(model)

    def status_row(self, now: float) -> dict:
        t = self.telemetry
        return {
            "worker_id": self.worker_id,
            "host": self.host,
            "pid": self.pid,
            "device": self.device,
            "device_type": self.device_type,
            "device_name": self.device_name,
            "state": self.state,
            "memory": self.memory,
            "models_loaded": sorted(self.models_loaded),
            "models_loading": list(t.models_loading),
            "model_sizes_mb": self.models_loaded,
            "jobs_done": self.jobs_done,
            "jobs_failed": self.jobs_failed,
            # false after the stuck-job watchdog fired on it, until it finishes a job
            "healthy": self.healthy,
            "unhealthy_reason": self.unhealthy_reason or None,
            "stalls": self.stalls,
            "last_success_s": (None if self.last_success_at is None
                               else round(max(now - self.last_success_at, 0.0), 3)),
            "last_heartbeat_s": round(max(now - self.last_heartbeat, 0.0), 3),
            "current_jobs": sorted(self.jobs),
            "current_step": self.current_step,
            "rss_mb": t.rss_mb,
            "cache_budget_mb": t.cache_budget_mb,
            "cpu_threads": t.cpu_threads,      # the worker's torch/OpenMP threads
            "cpu_affinity": t.cpu_affinity,    # cores it may run on (None: not known)
            "loras_cached": list(t.loras_cached),
            "controlnets_cached": list(t.controlnets_cached),
            # cumulative since the worker process started (a restart resets them)
            "cache_hits": t.cache_hits,
            "cache_misses": t.cache_misses,
            "cache_evictions": t.cache_evictions,
            "step_time_s": dict(t.step_time_s),
            "load_time_s": dict(t.load_time_s),
            "capabilities": sorted(self.capabilities),
            "worker_types": sorted(self.worker_types),
            "simulated": self.simulated,
        }


class WorkerRegistry:
    def __init__(self, heartbeat_interval_s: float = 1.0, heartbeat_liveness: int = 3,
                 clock: Callable[[], float] = time.monotonic):
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_liveness = heartbeat_liveness
        self.clock = clock
        self._by_id: dict[str, WorkerRecord] = {}
        self._by_identity: dict[bytes, str] = {}
        # every model size a worker reported, kept up to date as heartbeats change it: routing
        # reads it per dispatch instead of walking every worker (1,000 workers: ~10 ms a pass)
        self.model_sizes: dict[str, float] = {}
        self.model_sizes_version = 0   # bumped when model_sizes changes: cached estimates go stale

    @property
    def expiry_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_liveness

    def register(self, identity: bytes, ready: Ready) -> tuple[WorkerRecord, WorkerRecord | None]:
        """Add a worker from its READY. Returns (record, previous record of the same worker_id
        if it was still registered: its jobs must be treated as lost)."""
        now = self.clock()
        worker_id = ready.worker_id or identity.hex()
        previous = self._by_id.get(worker_id)
        # the same process reconnecting, whether its old record is live or lost
        same_process = previous if (previous is not None and previous.pid == ready.pid
                                    and previous.host == ready.host) else None
        if previous is not None:
            self._by_identity.pop(previous.identity, None)
            if previous.lost:
                previous = None  # its jobs were already handled when it was declared lost
        rec = WorkerRecord(
            worker_id=worker_id,
            identity=identity,
            device=ready.device or "cpu",
            device_type=ready.device_type or "cpu",
            device_name=ready.device_name,
            host=ready.host,
            pid=ready.pid,
            memory_total_mb=ready.memory_total_mb,
            capabilities=frozenset(ready.capabilities),
            worker_types=frozenset(ready.worker_types),
            simulated=ready.simulated,
            max_batch=ready.max_batch,
            telemetry=ready.telemetry,
            expiry=now + self.expiry_s,
            last_heartbeat=now,
            registered_at=now,
            progress_at=now,
        )
        if same_process is not None:
            # the same process reconnecting (its transport timed out) is no healthier than
            # before: it may still be stuck on the job the watchdog took from it
            rec.unhealthy_since = same_process.unhealthy_since
            rec.unhealthy_reason = same_process.unhealthy_reason
            rec.stalls, rec.last_success_at = same_process.stalls, same_process.last_success_at
        self._by_id[worker_id] = rec
        self._by_identity[identity] = worker_id
        self._learn_sizes(rec)
        return rec, previous

    def by_identity(self, identity: bytes) -> WorkerRecord | None:
        worker_id = self._by_identity.get(identity)
        rec = self._by_id.get(worker_id) if worker_id is not None else None
        return rec if rec is not None and not rec.lost else None

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self._by_id.get(worker_id)

    def touch(self, rec: WorkerRecord, telemetry: Telemetry | None = None) -> None:
        """Any message from a live worker refreshes its liveness."""
        now = self.clock()
        rec.last_heartbeat = now
        rec.expiry = now + self.expiry_s
        if telemetry is not None and rec.set_telemetry(telemetry):
            self._learn_sizes(rec)

    def heartbeat(self, rec: WorkerRecord, beat: WorkerHeartbeat) -> None:
        """A worker's HEARTBEAT: alive, its telemetry, and the job and step it is at. A report
        of its work different from the previous one is progress: another job, another step,
        another model loading, another job answered."""
        self.touch(rec, beat.telemetry)
        rec.current_job = beat.current_job
        rec.current_step = beat.current_step
        report = (beat.busy, beat.current_job, beat.current_step,
                  tuple(beat.telemetry.models_loading), beat.jobs_done, beat.jobs_failed)
        if report != rec.work_report:
            rec.work_report = report
            rec.progress_at = rec.last_heartbeat

    def note_progress(self, rec: WorkerRecord) -> None:
        """A PROGRESS, RESULT or ERROR from the worker: it is moving."""
        rec.progress_at = self.clock()

    def mark_unhealthy(self, rec: WorkerRecord, reason: str) -> None:
        """The watchdog fired on it: routing gives it only probe jobs until it finishes one."""
        rec.unhealthy_since = self.clock()
        rec.unhealthy_reason = reason
        rec.stalls += 1

    # --- the jobs a worker holds (changed by the broker core as it dispatches and hears back) ---
    def assign(self, rec: WorkerRecord, request_id: str, dispatch_id: int,
               estimate: DispatchEstimate, companion: bool = False) -> None:
        """The broker sent `rec` a job: it holds it, and routing counts `estimate` as its
        backlog until it answers (estimates of jobs it no longer holds are dropped here).
        `companion`: it rides in another job's batched call and takes no slot."""
        if not rec.jobs:
            rec.progress_at = self.clock()   # the watchdog's clock starts with its first job
        rec.estimates = {r: e for r, e in rec.estimates.items() if r in rec.jobs}
        rec.estimates[request_id] = estimate
        rec.jobs[request_id] = dispatch_id
        if companion:
            rec.companions.add(request_id)

    def release(self, rec: WorkerRecord, request_id: str, dispatch_id: int | None = None) -> bool:
        """The worker no longer holds the job (answered, aborted); with `dispatch_id`, only if
        it holds that dispatch of it. Returns whether it held it."""
        held = rec.jobs.get(request_id)
        if held is None or (dispatch_id is not None and held != dispatch_id):
            return False
        del rec.jobs[request_id]
        rec.companions.discard(request_id)
        return True

    def take_jobs(self, rec: WorkerRecord) -> dict[str, int]:
        """Everything the worker held (request_id -> dispatch_id), which it now holds no more."""
        jobs, rec.jobs = rec.jobs, {}
        rec.companions = set()
        return jobs

    def count_answer(self, rec: WorkerRecord, success: bool) -> bool:
        """A job's answer from the worker. A success makes an unhealthy worker healthy again;
        returns whether it did."""
        if not success:
            rec.jobs_failed += 1
            return False
        rec.jobs_done += 1
        rec.last_success_at = self.clock()
        recovered = not rec.healthy
        rec.unhealthy_since, rec.unhealthy_reason = None, ""
        return recovered

    def set_loading(self, rec: WorkerRecord, loading: bool) -> None:
        """A model_load_request is (no longer) running on it (status shows it as loading)."""
        rec.loading = loading

    def _learn_sizes(self, rec: WorkerRecord) -> None:
        sizes = self.model_sizes
        for name, mb in rec.reported_model_sizes().items():
            if sizes.get(name) != mb:
                sizes[name] = mb
                self.model_sizes_version += 1

    def remove(self, rec: WorkerRecord) -> None:
        self._by_id.pop(rec.worker_id, None)
        self._by_identity.pop(rec.identity, None)

    def mark_lost(self, rec: WorkerRecord) -> None:
        rec.lost = True
        rec.lost_at = self.clock()
        self._by_identity.pop(rec.identity, None)

    def expire(self) -> list[WorkerRecord]:
        """Declare every worker past its expiry lost; forget long-lost ones. Returns the newly lost."""
        now = self.clock()
        newly_lost = []
        for rec in list(self._by_id.values()):
            if rec.lost:
                if now - rec.lost_at > LOST_VISIBLE_S:
                    self._by_id.pop(rec.worker_id, None)
            elif now > rec.expiry:
                self.mark_lost(rec)
                newly_lost.append(rec)
        return newly_lost

    def live(self) -> list[WorkerRecord]:
        return [r for r in self._by_id.values() if not r.lost]

    def all(self) -> list[WorkerRecord]:
        return list(self._by_id.values())
