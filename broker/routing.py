"""Routing policy: which worker runs a job. Pure functions of the job and the workers'
telemetry (no sockets, no clock), so every rule here is unit-tested directly.

1. Hard filters, in order: the worker serves the job's worker type, its capabilities cover
   `job.features`, it matches the device hint, and the job's estimated memory need fits its
   free + evictable memory. A job that fails the static part of these on every registered
   worker gets a reason ("no worker offers feature refiner") the broker reports at timeout.
2. Rank (policy "smart") every worker passing the filters, full ones included, by predicted
   finish time:
       backlog (the dispatch-time estimates of the jobs it holds) + this job's steps * measured
       step time + load_weight * measured load time of each model neither loaded, loading
       nor brought by the backlog, where load_weight = 1 + queued jobs / live workers
       (a load also holds up the queue behind it; see load_weight_for), where the loads
       include each model the worker's LRU cache would evict for this job that queued jobs
       want (`wanted`), since evicting it costs a load later
   ties -> the worker with fewer models loaded -> round-robin. If the best worker has no free
   slot, the job waits for it (choose_worker returns None) instead of going to a worse free one.
Other policies for comparison, each among workers with a free slot: "round-robin",
"least-loaded", "tiered" (Ray Serve style: has the model, then fewest models loaded, then the
rest; least-loaded within a tier).
3. Health, under every policy: a worker the stuck-job watchdog fired on (broker/watchdog.py) is
   unhealthy until it finishes a job. Each policy chooses among the healthy workers only; when
   that gives no worker now (none passes the filters, or the best is full), an unhealthy one
   that holds no job and reports running none (it let go of the job it was stuck on) gets the
   job as a probe, one at a time. So routing prefers workers whose last outcome is a success to
   one whose last outcome was a stall, and a recovered worker can prove itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

from protocol import constants as C
from protocol import rule_texts as R
from protocol.job import Job
from protocol.rules import pool_upscaler
from protocol.worker_protocol import MAX_JOBS_PER_WORKER

from broker.registry import WorkerRecord

POLICIES = ("smart", "round-robin", "least-loaded", "tiered")

# --- the memory estimate ---------------------------------------------------------------
# need_mb = sum(size_mb of each model the job uses: base, refiner, vae, controlnets)
#         + ACTIVATION_MB_PER_MEGAPIXEL * width * height / 1e6 * batch_size
# A model's size is the size some worker measured when it loaded it (telemetry
# models_loaded[].size_mb, or a worker's model_sizes_mb catalogue); unknown models count
# UNKNOWN_MODEL_MB. Activations: SDXL's UNet + VAE decode at 1024x1024 in fp16 peak near
# 2 GB above the weights, so 2048 MB per megapixel per image.
ACTIVATION_MB_PER_MEGAPIXEL = 2048.0
UNKNOWN_MODEL_MB = 1000.0
# Predicted-time defaults when a worker has not measured anything yet.
DEFAULT_STEP_TIME_S = 1.0
DEFAULT_LOAD_TIME_S = 5.0
_TIE_S = 1e-3  # finish times are compared in whole milliseconds; equal ones are a tie


def known_model_sizes(workers: Iterable[WorkerRecord]) -> dict[str, float]:
    sizes: dict[str, float] = {}
    for w in workers:
        sizes.update(w.reported_model_sizes())
    return sizes


def estimate_memory_mb(job: Job, model_sizes_mb: dict[str, float]) -> float:
    """The job's estimated peak memory need on a device with none of its models loaded."""
    models_mb = sum(model_sizes_mb.get(name, UNKNOWN_MODEL_MB) for name in job.needed_models)
    megapixels = job.width * job.height / 1e6
    return models_mb + ACTIVATION_MB_PER_MEGAPIXEL * megapixels * job.batch_size


def _device_matches(hint: str | None, worker: WorkerRecord) -> bool:
    if not hint or hint == "auto":
        return True
    return hint == worker.device or hint == worker.device_type


@dataclass(frozen=True)
class JobNeeds:
    """What routing reads from a job, computed once per routing decision (not per worker)."""
    worker_type: str
    features: frozenset[str]
    device: str | None
    models: tuple[str, ...]
    need_mb: float            # estimate_memory_mb with nothing loaded
    base: str
    width: int
    height: int
    work_steps: int           # steps * batch_size
    upscaler: str | None = None   # a model upscaler by name (protocol.rules.pool_upscaler)

    @classmethod
    def of(cls, job: Job, sizes: dict[str, float]) -> "JobNeeds":
        return cls(job.worker_type, job.features, job.device, job.needed_models,
                   estimate_memory_mb(job, sizes), job.models.base, job.width, job.height,
                   job.steps * job.batch_size, pool_upscaler(job))


def _lacks_upscaler(name: str | None, worker: WorkerRecord) -> bool:
    """The worker reported its upscalers and `name` is not one (unreported: it may have it)."""
    offered = worker.telemetry.upscalers
    return name is not None and offered is not None and name not in offered


def _static_reason(needs: JobNeeds, worker: WorkerRecord) -> str | None:
    if worker.worker_types and needs.worker_type not in worker.worker_types:
        return f"worker type {needs.worker_type} not served"
    if not needs.features <= worker.capabilities:
        return f"feature {', '.join(sorted(needs.features - worker.capabilities))} not offered"
    if not _device_matches(needs.device, worker):
        return f"device {needs.device} not present"
    if _lacks_upscaler(needs.upscaler, worker):
        return f"upscaler {needs.upscaler} not present"
    total = worker.memory["total_mb"]
    if total > 0 and needs.need_mb > total:
        return f"needs {needs.need_mb:.0f} MB, has {total:.0f} MB"
    return None


def _fits_now(needs: JobNeeds, worker: WorkerRecord) -> bool:
    """The job's remaining need fits in free memory plus models it could evict."""
    memory = worker.memory
    if memory["total_mb"] <= 0:
        return True
    loaded = worker.models_loaded
    own_loaded_mb = sum(loaded.get(n, 0.0) for n in needs.models)
    evictable = worker.loaded_total_mb - own_loaded_mb
    return needs.need_mb - own_loaded_mb <= memory["free_mb"] + evictable


def can_ever_run(needs: JobNeeds, workers: Sequence[WorkerRecord]) -> bool:
    """Whether some live worker could run the job once free (stops at the first one)."""
    return any(not w.lost and _static_reason(needs, w) is None for w in workers)


def unroutable_reason(job: Job, workers: Sequence[WorkerRecord]) -> str | None:
    """Why no registered worker can ever run this job, or None if one can."""
    live = [w for w in workers if not w.lost]
    if not live:
        return "no worker is registered"
    needs = JobNeeds.of(job, known_model_sizes(live))
    reasons = [_static_reason(needs, w) for w in live]
    if any(r is None for r in reasons):
        return None
    if all(w.worker_types and job.worker_type not in w.worker_types for w in live):
        return f"no worker serves worker type {job.worker_type}"
    offered = set().union(*(w.capabilities for w in live))
    missing = sorted(job.features - offered)
    if missing:
        return f"no worker offers feature {', '.join(missing)}"
    if job.device and not any(_device_matches(job.device, w) for w in live):
        return R.DEVICE(device=job.device)
    if needs.upscaler is not None and all(_lacks_upscaler(needs.upscaler, w) for w in live):
        pool = sorted(set().union(*(w.telemetry.upscalers for w in live)))
        return R.UPSCALE_METHOD(name=repr(needs.upscaler),
                                valid=", ".join([C.DEFAULT_UPSCALE_METHOD, *pool]))
    largest = max(w.memory["total_mb"] for w in live)
    if needs.need_mb > largest:
        return f"needs {needs.need_mb:.0f} MB, largest worker has {largest:.0f} MB"
    return "; ".join(f"{w.worker_id}: {r}" for w, r in zip(live, reasons))


def could_run(needs: JobNeeds, worker: WorkerRecord) -> bool:
    """The worker passes the job's hard filters now (type, features, device, memory)."""
    return not worker.lost and _static_reason(needs, worker) is None and _fits_now(needs, worker)


def fits_batch(needs: JobNeeds, worker: WorkerRecord, extra_images: int) -> bool:
    """A batched call of the job with `extra_images` more images of its size still fits."""
    extra_mb = ACTIVATION_MB_PER_MEGAPIXEL * needs.width * needs.height / 1e6 * extra_images
    bigger = replace(needs, need_mb=needs.need_mb + extra_mb)
    return _static_reason(bigger, worker) is None and _fits_now(bigger, worker)


# A job that rides along in another job's batched call adds this share of its own steps' time
# and no model loads. Measured on the tiny kit on CPU: 8 prompts in one call cost 0.29x of 8
# calls (docs/benchmarks.md); compute-bound GPUs gain less, so half is the prudent middle.
BATCH_COMPANION_COST = 0.5


def companion_estimate(estimate: "DispatchEstimate") -> "DispatchEstimate":
    return replace(estimate, total_s=estimate.steps_s * BATCH_COMPANION_COST,
                   steps_s=estimate.steps_s * BATCH_COMPANION_COST)


def _eligible(needs: JobNeeds, workers: Sequence[WorkerRecord],
              max_jobs: int = MAX_JOBS_PER_WORKER) -> list[WorkerRecord]:
    return [w for w in workers
            if not w.lost and w.calls < max_jobs
            and _static_reason(needs, w) is None and _fits_now(needs, w)]


def _own_cost_s(needs: JobNeeds, worker: WorkerRecord, have) -> tuple[float, float]:
    """(seconds of steps, seconds loading the models not in `have`) for this job on the worker."""
    step_s = worker.step_time_s(needs.base, needs.width, needs.height)
    if step_s is None:
        step_s = DEFAULT_STEP_TIME_S * needs.width * needs.height / (1024 * 1024)
    load_s = 0.0
    for name in needs.models:
        if name not in have:
            measured = worker.load_time_s(name)
            load_s += DEFAULT_LOAD_TIME_S if measured is None else measured
    return step_s * needs.work_steps, load_s


def _evicted_by(needs: JobNeeds, worker: WorkerRecord) -> list[str]:
    """The models the worker's cache would evict to make room for this job: its
    models_loaded telemetry is least recently used first, and the cache evicts in that order."""
    memory = worker.memory
    loaded = worker.models_loaded
    if memory["total_mb"] <= 0 or not loaded:
        return []
    need_mb = needs.need_mb - sum(loaded.get(n, 0.0) for n in needs.models)
    free_mb = memory["free_mb"]
    evicted = []
    for name, mb in loaded.items():
        if need_mb <= free_mb:
            break
        if name not in needs.models:
            evicted.append(name)
            free_mb += mb
    return evicted


@dataclass(frozen=True, slots=True)
class DispatchEstimate:
    """What the broker records on a worker when it sends it a job (WorkerRecord.estimates):
    the worker's backlog, as routing counts it, until the job is answered."""
    total_s: float                 # seconds of model loads and steps
    models: tuple[str, ...]        # the models the job brings to the worker
    steps_s: float = 0.0           # seconds of steps alone
    total_steps: int = 0           # progress steps in total (job.steps, refiner included)


def _remaining_s(worker: WorkerRecord, rid: str, estimate: DispatchEstimate) -> float:
    """What is left of a job the worker holds: its dispatch-time estimate, or, once the
    worker's heartbeat says it is denoising that job, the steps not yet done at the worker's
    measured pace (its loads are over by then). Without this a job nearly done counted in full
    and smart routing sent work away from a worker about to be free."""
    if worker.current_job != rid or worker.current_step <= 0 or estimate.total_steps <= 0:
        return estimate.total_s
    total_steps = estimate.total_steps
    return estimate.steps_s * max(total_steps - worker.current_step, 0) / max(total_steps, 1)


def _finish_s(needs: JobNeeds, worker: WorkerRecord, load_weight: float = 1.0,
              wanted: frozenset[str] = frozenset()) -> float:
    """Backlog of the jobs the worker holds (their dispatch-time estimates; one without an
    estimate counts this job's steps) + this job's steps + loads of the models neither loaded,
    loading nor brought by the backlog."""
    have = worker.warm   # copied below only when the backlog brings more models
    backlog_s, unknown = 0.0, 0
    for rid in worker.jobs:
        estimate = worker.estimates.get(rid)
        if estimate is None:
            unknown += 1
        else:
            backlog_s += _remaining_s(worker, rid, estimate)
            if not have.issuperset(estimate.models):
                have = have.union(estimate.models)
    run_s, load_s = _own_cost_s(needs, worker, have)
    if load_s and wanted:
        # evicting a model that queued jobs want costs one more load later
        for name in _evicted_by(needs, worker):
            if name in wanted:
                measured = worker.load_time_s(name)
                load_s += DEFAULT_LOAD_TIME_S if measured is None else measured
    if not worker.jobs:
        # an idle worker's time is free: no queued job waits on its load (without this, a
        # worker restarted cold under a long queue never got work while a warm one did)
        load_weight = 1.0
    return backlog_s + unknown * run_s + run_s + load_weight * load_s


def dispatch_estimate(job: Job, worker: WorkerRecord,
                      needs: JobNeeds | None = None) -> DispatchEstimate:
    """What the broker records on a worker when it sends it `job` (see WorkerRecord.estimates).
    `needs`: the job's JobNeeds when the caller has it (its memory estimate is not used here)."""
    if needs is None:
        needs = JobNeeds.of(job, {})
    have = set(worker.models_loaded)
    for rid in worker.jobs:
        estimate = worker.estimates.get(rid)
        if estimate is not None:
            have.update(estimate.models)
    steps_s, load_s = _own_cost_s(needs, worker, have)
    # the worker's progress (and heartbeat current_step) counts job.steps, refiner included
    return DispatchEstimate(steps_s + load_s, needs.models, steps_s, job.steps)


def predicted_finish_s(job: Job, worker: WorkerRecord) -> float:
    """Seconds until this job would be done on this worker, from its measured telemetry:
    (jobs already on it + 1) * step time * steps * batch + load time of models not warm."""
    return _finish_s(JobNeeds.of(job, {}), worker)


def load_weight_for(waiting: int, live_workers: int) -> float:
    """How many seconds of predicted finish one second of model loading counts as.

    A load delays the job itself (weight 1) and also takes device time from every job queued
    behind it: with `waiting` jobs queued over `live_workers` workers, about waiting/workers of
    them wait on this device. Counting that externality makes smart routing wait for a warm
    worker when the queue is long and load freely when it is short (docs/benchmarks.md). A
    load on an idle worker counts once (_finish_s)."""
    return 1.0 + waiting / max(live_workers, 1)


@dataclass
class RoundRobin:
    """Remembers the last worker chosen, so ties rotate evenly."""
    last_worker_id: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    def pick(self, tied: Sequence[WorkerRecord]) -> WorkerRecord:
        if len(tied) == 1:   # the usual case: no rotation to decide
            chosen = tied[0]
        else:
            ordered = sorted(tied, key=lambda w: w.worker_id)
            chosen = next((w for w in ordered if w.worker_id > self.last_worker_id), ordered[0])
        self.last_worker_id = chosen.worker_id
        self.counts[chosen.worker_id] = self.counts.get(chosen.worker_id, 0) + 1
        return chosen


def _best(candidates: list[WorkerRecord], key, rr: RoundRobin) -> WorkerRecord:
    keys = [key(w) for w in candidates]
    best_key = min(keys)
    tied = [w for w, k in zip(candidates, keys) if k == best_key]
    return rr.pick(tied)


def choose_worker(job: Job, workers: Sequence[WorkerRecord], policy: str,
                  rr: RoundRobin, sizes: dict[str, float] | None = None,
                  waiting: int = 0, wanted: frozenset[str] = frozenset(),
                  live_count: int | None = None, needs: JobNeeds | None = None,
                  max_jobs: int = MAX_JOBS_PER_WORKER) -> WorkerRecord | None:
    """The worker to run `job` now, or None (no worker has room now, or none ever can).
    `waiting`: jobs in the broker's queue, which makes "smart" weigh model loads by the
    queue they hold up (load_weight_for); `wanted`: models queued jobs need, which "smart"
    avoids evicting. `needs`: JobNeeds.of(job, sizes) when the caller keeps it per job.
    `max_jobs`: how many jobs one worker may hold (the broker's max_jobs_per_worker)."""
    if needs is None:
        if sizes is None:
            sizes = known_model_sizes(w for w in workers if not w.lost)
        needs = JobNeeds.of(job, sizes)
    if policy == "smart":
        candidates = [w for w in workers if not w.lost and _static_reason(needs, w) is None
                      and _fits_now(needs, w)]
    else:
        candidates = _eligible(needs, workers, max_jobs)
    if not candidates:
        return None
    healthy = [w for w in candidates if w.unhealthy_since is None]   # w.healthy, inlined
    chosen = None
    if healthy:
        chosen = _choose(policy, needs, healthy, rr, waiting, wanted, live_count, workers, max_jobs)
    if chosen is None:
        probes = [w for w in candidates if w.probe_ready]
        if probes:
            chosen = rr.pick(probes)
    return chosen


def _choose(policy: str, needs: JobNeeds, candidates: list[WorkerRecord], rr: RoundRobin,
            waiting: int, wanted: frozenset[str], live_count: int | None,
            workers: Sequence[WorkerRecord], max_jobs: int) -> WorkerRecord | None:
    """The policy's choice among `candidates` (they pass the filters), or None (smart: the
    best one is full)."""
    if policy == "round-robin":
        return rr.pick(candidates)
    if policy == "least-loaded":
        return _best(candidates, lambda w: (len(w.jobs),), rr)
    if policy == "tiered":
        needed = set(needs.models)
        return _best(candidates, lambda w: (
            0 if needs.base in w.models_loaded else 1,
            len(w.models_loaded) if not needed & set(w.models_loaded) else 0,
            len(w.jobs)), rr)
    # smart: rank every worker that could take the job (full ones too) by predicted finish;
    # if the best one is full, the job waits for it rather than going to a worse free one
    # (taking whichever worker freed a slot made smart no better than round-robin under load)
    if live_count is None:   # the broker passes it: counting 1,000 workers per job adds up
        live_count = sum(1 for w in workers if not w.lost)
    load_weight = load_weight_for(waiting, live_count)
    best = _best(candidates, lambda w: (round(_finish_s(needs, w, load_weight, wanted) / _TIE_S), len(w.models_loaded)), rr)
    return best if best.calls < max_jobs else None
