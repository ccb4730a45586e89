"""SimulatedExecutor: a SIMULATION of a worker's executor for routing tests and benchmarks.

No diffusers, no torch, no image: it sleeps for a configurable model load time and per-step
time, keeps an LRU cache of "loaded" models against a memory budget like the real executor,
and reports the same telemetry. Every describe(), reply and log line says it is simulated.

Cost model: a model's load time is `load_s` scaled by its size over `model_mb` (sizes from
`model_sizes_mb`). With `cost_model="scaled"` (the routing benchmark's) the step time is
`step_s` at 1024x1024 scaled by pixels, and the job's activations (ACTIVATION_MB_PER_MEGAPIXEL)
count against the memory budget: they are kept free while loading, and a job whose models plus
activations exceed the whole budget fails with out_of_memory, as it would on a device.
Telemetry counts oom_events, models_loaded_total (loads), evictions_total, jobs_total, busy_s.

Fault (for the stuck-job watchdog's tests and scripts/stress.py): `stall_after_jobs=N` makes
the job after the first N stall forever: no progress, abort ignored, never answered, while the
worker's transport keeps heart-beating, as a hung driver or deadlocked pipeline would.

Dynamic batching (run_batch): a call of k compatible jobs costs (1 + batch_cost * (k - 1)) times
a lone job's steps (batch_cost 0.5 unless --sim-batch-cost says otherwise).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections import OrderedDict

from gpu_worker.previews import PreviewCadence, simulated_preview
from protocol import constants as C
from protocol.errors import JobError
from protocol.job import Job

log = logging.getLogger(__name__)

ALL_FEATURES = ("txt2img", "img2img", "inpaint", "lora", "controlnet", "textual_inversion",
                "refiner", "custom_vae", "upscale")
_SLEEP_SLICE_S = 0.01  # abort is noticed within this long
_EWMA_ALPHA = 0.3      # weight of the newest measurement in the step-time moving average
COST_MODELS = ("flat", "scaled")
REFERENCE_PIXELS = 1024 * 1024       # "scaled": step_s is the step time at this size
ACTIVATION_MB_PER_MEGAPIXEL = 2048.0  # the same estimate routing uses for a job's activations


class SimulatedExecutor:
    def __init__(self, device: str = "cpu", *, load_s: float = 0.5, step_s: float = 0.02,
                 memory_mb: float = 8000.0, model_mb: float = 2000.0,
                 model_sizes_mb: dict[str, float] | None = None,
                 capabilities: tuple[str, ...] = ALL_FEATURES,
                 worker_types: tuple[str, ...] = (C.WORKER_BASIC, C.WORKER_ENHANCED),
                 worker_id: str = "", cost_model: str = "flat",
                 preview_cadence: PreviewCadence | None = None,
                 stall_after_jobs: int | None = None, batch_cost: float = 0.5):
        if cost_model not in COST_MODELS:
            raise ValueError(f"cost_model must be one of {COST_MODELS}, not {cost_model!r}")
        self.device = device
        self.cost_model = cost_model
        # dynamic batching: each job after the first of a batched call adds this share of a
        # lone job's step time (routing's BATCH_COMPANION_COST assumes the same)
        self.batch_cost = batch_cost
        self.load_s = load_s
        self.step_s = step_s
        self.memory_mb = memory_mb
        self.model_mb = model_mb
        self.model_sizes_mb = dict(model_sizes_mb or {})
        self.capabilities = tuple(capabilities)
        self.worker_types = tuple(worker_types)
        self.worker_id = worker_id
        self.preview_cadence = preview_cadence or PreviewCadence()
        self.stall_after_jobs = stall_after_jobs
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, float] = OrderedDict()  # name -> size_mb, LRU first
        self._loading: list[str] = []
        self._step_time_s: dict[str, float] = {}
        self._load_time_s: dict[str, float] = {}
        self._activation_mb = 0.0
        self._reserved_mb = 0.0  # "scaled": activations of the job about to run, kept free
        self._cache_hits = 0     # telemetry cache_hits / cache_misses, as the real cache counts
        self._cache_misses = 0
        self._counters = {"oom_events": 0, "models_loaded_total": 0, "evictions_total": 0,
                          "jobs_total": 0, "busy_s": 0.0}
        log.info("SIMULATED executor on %s (%s costs): load %.3f s, step %.4f s, budget %.0f MB, "
                 "model %.0f MB", device, cost_model, load_s, step_s, memory_mb, model_mb)

    # --- Executor protocol ----------------------------------------------------------------
    def describe(self) -> dict:
        return {
            "device": self.device,
            "device_type": self.device.split(":")[0],
            "device_name": f"simulated {self.device}",
            "memory_total_mb": self.memory_mb,
            "capabilities": list(self.capabilities),
            "worker_types": list(self.worker_types),
            "simulated": True,
        }

    def telemetry(self) -> dict:
        with self._lock:
            used = sum(self._cache.values()) + self._activation_mb
            return {
                "memory": {"total_mb": self.memory_mb, "used_mb": used,
                           "free_mb": max(self.memory_mb - used, 0.0)},
                "rss_mb": _rss_mb(),
                "cache_budget_mb": self.memory_mb,
                "models_loaded": [{"name": n, "kind": "simulated", "size_mb": mb}
                                  for n, mb in self._cache.items()],
                "models_loading": list(self._loading),
                "step_time_s": dict(self._step_time_s),
                "load_time_s": dict(self._load_time_s),
                "model_sizes_mb": dict(self.model_sizes_mb),
                **self._counters,
                "cache_hits": self._cache_hits, "cache_misses": self._cache_misses,
                "cache_evictions": self._counters["evictions_total"],
                "simulated": True,
            }

    def counters(self) -> dict:
        """oom_events, models_loaded_total, evictions_total, jobs_total, busy_s (a copy)."""
        with self._lock:
            return dict(self._counters)

    def _count(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self._counters[name] += amount

    def run(self, job: Job, progress, should_abort) -> dict:
        self._maybe_stall(job)
        started = time.perf_counter()
        try:
            return self._run(job, progress, should_abort, started)
        finally:
            self._count("jobs_total")
            self._count("busy_s", time.perf_counter() - started)

    def _maybe_stall(self, job: Job) -> None:
        if self.stall_after_jobs is not None and self.counters()["jobs_total"] >= self.stall_after_jobs:
            log.warning("SIMULATED stall: job %s will never finish (stall after %d job(s)); "
                        "heartbeats go on", job.request_id, self.stall_after_jobs)
            threading.Event().wait()   # forever: a hung device does not look at should_abort

    def run_batch(self, members: list) -> list:
        """SIMULATED dynamic batching: compatible jobs (protocol.batching.batch_key) in one
        simulated call. Each step costs step_s * (1 + batch_cost * (jobs - 1)); the activations
        of every image count against the budget. Each job gets its own outcome: unsupported or
        aborted before the call alone, dropped (cancelled) when aborted during it."""
        started = time.perf_counter()
        outcomes: list = [None] * len(members)
        live = []
        for index, member in enumerate(members):
            missing = sorted(member.job.features - set(self.capabilities))
            if missing:
                outcomes[index] = JobError(C.UNSUPPORTED_FEATURE,
                                           f"simulated worker does not offer {', '.join(missing)}")
            elif member.should_abort():
                outcomes[index] = JobError(C.CANCELLED, "aborted before it started")
            else:
                live.append(index)
        if not live:
            return outcomes

        def progress(stage, step, total_steps, **extra):
            for index in live:
                if not members[index].should_abort():
                    members[index].progress(stage, step, total_steps, eta_s=extra.get("eta_s"))

        def should_abort() -> bool:
            return all(members[index].should_abort() for index in live)

        jobs = [members[index].job for index in live]
        self._maybe_stall(jobs[0])   # the fault holds for a batched call too
        call_job = jobs[0].model_copy(update={"stream": any(job.stream for job in jobs), "preview": False})
        try:
            shared = self._run(call_job, progress, should_abort, started,
                               images=sum(job.batch_size for job in jobs),
                               step_factor=1.0 + self.batch_cost * (len(jobs) - 1))
        except JobError as exc:
            for index in live:
                outcomes[index] = JobError(exc.code, exc.message, dict(exc.details))
            return outcomes
        finally:
            self._count("jobs_total", len(live))
            self._count("busy_s", time.perf_counter() - started)
        batch = {"jobs": len(jobs), "images": sum(job.batch_size for job in jobs),
                 "request_ids": [job.request_id for job in jobs]}
        for index in live:
            member = members[index]
            if member.should_abort():
                outcomes[index] = JobError(C.CANCELLED, "cancelled while running in a batch; the other "
                                                        "jobs of the batch went on")
                continue
            outcomes[index] = {**shared, "generated_images": self._images(member.job),
                               "processing_metrics": {**shared["processing_metrics"], "batch": batch},
                               "features_used": sorted(member.job.features) + ["dynamic_batch"],
                               "warnings": []}
        return outcomes

    def _run(self, job: Job, progress, should_abort, started: float, images: int | None = None,
             step_factor: float = 1.0) -> dict:
        missing = sorted(job.features - set(self.capabilities))
        if missing:
            raise JobError(C.UNSUPPORTED_FEATURE, f"simulated worker does not offer {', '.join(missing)}")
        images = job.batch_size if images is None else images
        pixels_mb = ACTIVATION_MB_PER_MEGAPIXEL * job.width * job.height / 1e6 * images
        step_s = self.step_s
        if self.cost_model == "scaled":
            step_s = self.step_s * job.width * job.height / REFERENCE_PIXELS
            need_mb = sum(self._size_of(n) for n in job.needed_models) + pixels_mb
            if need_mb > self.memory_mb:
                self._count("oom_events")
                log.info("SIMULATED out of memory: job %s needs %.0f MB, budget %.0f MB",
                         job.request_id, need_mb, self.memory_mb)
                raise JobError(C.OUT_OF_MEMORY, f"simulated device out of memory: job needs "
                                                f"{need_mb:.0f} MB, budget is {self.memory_mb:.0f} MB")
            self._reserved_mb = pixels_mb
        step_s *= step_factor
        try:
            for name in job.needed_models:
                if name not in self._cache:
                    progress("loading", 0, job.steps)
                self._ensure_loaded(name, should_abort)
        finally:
            self._reserved_mb = 0.0
        load_done = time.perf_counter()
        with self._lock:
            self._activation_mb = pixels_mb
        try:
            key = f"{job.models.base}@{job.width}x{job.height}"
            base_steps = job.steps
            if job.models.refiner:
                base_steps = max(1, int(round(job.steps * job.refiner_switch)))
            throttle = self.preview_cadence.throttle_for(job)
            for step in range(1, job.steps + 1):
                step_start = time.perf_counter()
                self._sleep(step_s, should_abort)
                stage = "denoising" if step <= base_steps else "refining"
                extra = {}
                if job.stream:  # the same optional fields as the real executor's progress
                    extra["eta_s"] = round((job.steps - step) * step_s, 3)
                    if job.preview and throttle.due(step):
                        extra["preview"] = simulated_preview(step, job.steps, job.preview_size)
                progress(stage, step, job.steps, **extra)
                if step_factor == 1.0:   # a batched call's steps are not one job's step time
                    self._record_step(key, time.perf_counter() - step_start)
            progress("postprocessing", job.steps, job.steps)
        finally:
            with self._lock:
                self._activation_mb = 0.0
        done = time.perf_counter()
        return {
            "generated_images": self._images(job),
            "processing_metrics": {
                "total_time": done - started, "queue_time": 0.0, "inference_time": done - load_done,
                "preprocessing_time": load_done - started, "postprocessing_time": 0.0,
                "device_name": f"simulated {self.device}", "worker_id": self.worker_id,
                "memory_used_mb": sum(self._cache.values()) + pixels_mb,
                "model_info": {"base": job.models.base, "simulated": True},
            },
            "features_used": sorted(job.features),
            "simulated": True,
            "warnings": [],
        }

    @staticmethod
    def _images(job: Job) -> list[dict]:
        seed = job.seed if job.seed != -1 else random.randrange(2**32)
        images = []
        for index in range(job.batch_size):
            digest = hashlib.sha256(f"sim:{job.request_id}:{seed + index}".encode()).hexdigest()
            images.append({"index": index, "seed": seed + index, "width": job.width,
                           "height": job.height, "format": job.output.format, "path": None,
                           "sha256": digest})
        return images

    def load_model(self, name: str) -> dict:
        took = self._ensure_loaded(name, lambda: False)
        return {"model": name, "load_time_s": took, "simulated": True}

    def list_models(self) -> dict:
        """SIMULATED: every model it was told the size of, or holds, listed as a base model."""
        with self._lock:
            names = sorted(set(self.model_sizes_mb) | set(self._cache))
            listing = [{"name": n, "size_mb": self._size_of(n), "loaded": n in self._cache}
                       for n in names]
        return {kind: (listing if kind == "base" else []) for kind in C.MODEL_KINDS}

    def cleanup(self, models: list[str] | None = None) -> dict:
        with self._lock:
            names = list(self._cache) if models is None else [m for m in models if m in self._cache]
            for name in names:
                self._cache.pop(name, None)
        return {"unloaded": names, "memory": self.telemetry()["memory"], "simulated": True}

    # --- the simulated cache -----------------------------------------------------------------
    def _size_of(self, name: str) -> float:
        return float(self.model_sizes_mb.get(name, self.model_mb))

    def _ensure_loaded(self, name: str, should_abort) -> float:
        size = self._size_of(name)
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                self._cache_hits += 1
                return 0.0
            self._cache_misses += 1
            if size > self.memory_mb:
                self._counters["oom_events"] += 1
                raise JobError(C.OUT_OF_MEMORY, f"simulated model {name} needs {size:.0f} MB, "
                                                f"budget is {self.memory_mb:.0f} MB")
            self._loading.append(name)
        started = time.perf_counter()
        try:
            self._sleep(self.load_s * size / self.model_mb if self.model_mb > 0 else self.load_s,
                        should_abort)
        finally:
            with self._lock:
                self._loading.remove(name)
        took = time.perf_counter() - started
        with self._lock:
            while self._cache and sum(self._cache.values()) + size + self._reserved_mb > self.memory_mb:
                evicted, _ = self._cache.popitem(last=False)
                self._counters["evictions_total"] += 1
                log.info("simulated cache: evicted %s to make room for %s", evicted, name)
            self._cache[name] = size
            self._load_time_s[name] = took
            self._counters["models_loaded_total"] += 1
        log.info("simulated load of %s took %.3f s", name, took)
        return took

    def _record_step(self, key: str, seconds: float) -> None:
        with self._lock:
            old = self._step_time_s.get(key)
            self._step_time_s[key] = seconds if old is None else (
                _EWMA_ALPHA * seconds + (1 - _EWMA_ALPHA) * old)

    @staticmethod
    def _sleep(seconds: float, should_abort) -> None:
        if should_abort():
            raise JobError(C.CANCELLED, "aborted")
        deadline = time.perf_counter() + seconds
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            time.sleep(min(remaining, _SLEEP_SLICE_S))
            if should_abort():
                raise JobError(C.CANCELLED, "aborted")


_process = None


def _rss_mb() -> float | None:
    global _process
    try:
        if _process is None:
            import psutil
            _process = psutil.Process(os.getpid())
        return _process.memory_info().rss / 2**20
    except Exception:  # telemetry is best effort
        return None
