"""An offline, clairvoyant reference for the routing benchmark, computed in simulation only.

It is given the whole workload up front (every future arrival) and the same cost model the sim
workers use, and it never goes through the broker. It is a *reference*, not a proven optimum:
the exact minimum number of model loads for multi-worker caching with latency is NP-hard, so it
combines the two classic clairvoyant rules that each are optimal in their own setting:

- **Belady eviction** (optimal for one cache): when a device must make room, it evicts the
  model whose next request in the future arrival stream is furthest away (never, first).
- **Clairvoyant greedy placement**: jobs are placed in arrival order on the worker where they
  finish first (one job at a time per worker, loads before compute, as the sim workers do).
  A worker that already holds the job's models is preferred as long as it finishes no more than
  `patience_s` later than the best worker; among equally good workers it picks the one whose
  eviction victims are next needed furthest in the future.

Alongside it, `cold_start_floor` is a hard lower bound: every distinct model the workload uses
must be loaded at least once on a pool that starts empty.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from bench.workload import CostModel, WorkerSpec, WorkItem


@dataclass
class _Device:
    spec: WorkerSpec
    free_at_s: float = 0.0
    resident_mb: dict[str, float] = field(default_factory=dict)
    busy_s: float = 0.0


@dataclass
class SimOutcome:
    policy: str
    loads: int
    evictions: int
    out_of_memory: int
    latencies_s: list[float]        # finish - arrival, per job in arrival order
    assignments: list[str]          # worker_id per job
    busy_s: dict[str, float]        # loading + computing, per worker
    makespan_s: float               # last finish, from time 0
    unplaceable: int = 0            # jobs no worker can ever hold


def cold_start_floor(jobs: list[WorkItem]) -> int:
    """Loads no policy can avoid: each distinct model once, on a pool that starts empty."""
    return len({m for j in jobs for m in j.models})


class _FutureUses:
    """For each model, the sorted job indices that need it: next use in O(log n)."""

    def __init__(self, jobs: list[WorkItem]):
        self._uses: dict[str, list[int]] = {}
        for j in jobs:
            for m in j.models:
                self._uses.setdefault(m, []).append(j.index)

    def next_use(self, model: str, after_index: int) -> float:
        uses = self._uses.get(model, [])
        k = bisect.bisect_right(uses, after_index)
        return uses[k] if k < len(uses) else math.inf


def _belady_victims(dev: _Device, job: WorkItem, cost: CostModel,
                    future: _FutureUses) -> list[str]:
    """Models to evict so the job's models and activations fit, furthest next use first."""
    keep = set(job.models)
    need_mb = sum(cost.model_mb(m) for m in job.models if m not in dev.resident_mb)
    need_mb += cost.activation_mb(job.width, job.height)
    used_mb = sum(dev.resident_mb.values())
    spare_mb = dev.spec.memory_mb - used_mb
    candidates = sorted((m for m in dev.resident_mb if m not in keep),
                        key=lambda m: future.next_use(m, job.index), reverse=True)
    victims = []
    for m in candidates:
        if spare_mb >= need_mb:
            break
        victims.append(m)
        spare_mb += dev.resident_mb[m]
    return victims


def run_oracle(jobs: list[WorkItem], workers: list[WorkerSpec], cost: CostModel,
               patience_s: float = 0.0) -> SimOutcome:
    """Place every job with full knowledge of the future (see the module docstring)."""
    devices = [_Device(spec) for spec in workers]
    future = _FutureUses(jobs)
    loads = evictions = unplaceable = 0
    latencies: list[float] = []
    assignments: list[str] = []
    for job in jobs:
        compute_s = job.compute_s(cost)
        fits = [d for d in devices if job.memory_mb(cost) <= d.spec.memory_mb]
        if not fits:
            unplaceable += 1
            latencies.append(math.inf)
            assignments.append("")
            continue
        options = []
        for d in fits:
            missing = [m for m in job.models if m not in d.resident_mb]
            start_s = max(job.arrival_s, d.free_at_s)
            finish_s = start_s + sum(cost.model_load_s(m) for m in missing) + compute_s
            victims = _belady_victims(d, job, cost, future)
            # the soonest future need among the victims: later is less harmful
            harm = min((future.next_use(v, job.index) for v in victims), default=math.inf)
            options.append((finish_s, len(missing), -harm, d.spec.worker_id, d, missing, victims))
        best_finish = min(o[0] for o in options)
        # within patience, fewer loads win; then earlier finish; then the least harmful eviction
        chosen = min((o for o in options if o[0] <= best_finish + patience_s),
                     key=lambda o: (o[1], o[0], o[2], o[3]))
        finish_s, _, _, _, dev, missing, victims = chosen
        for v in victims:
            del dev.resident_mb[v]
        evictions += len(victims)
        for m in missing:
            dev.resident_mb[m] = cost.model_mb(m)
        loads += len(missing)
        dev.busy_s += finish_s - max(job.arrival_s, dev.free_at_s)
        dev.free_at_s = finish_s
        latencies.append(finish_s - job.arrival_s)
        assignments.append(dev.spec.worker_id)
    makespan = max((d.free_at_s for d in devices), default=0.0)
    return SimOutcome(policy="oracle", loads=loads, evictions=evictions, out_of_memory=0,
                      latencies_s=latencies, assignments=assignments,
                      busy_s={d.spec.worker_id: d.busy_s for d in devices},
                      makespan_s=makespan, unplaceable=unplaceable)
