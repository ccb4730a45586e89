"""A discrete-event SIMULATION of the broker's dispatch loop, for diagnosing routing results.

It runs the broker's own policy code (broker.routing.choose_worker on broker.registry
WorkerRecord objects) against simulated devices that follow bench.sim_worker's cost model,
in simulated time (no sockets, no sleeping), and mirrors broker.server._dispatch: the first 64
queued jobs scanned in order, each sent to the policy's choice (for "smart" the best worker by
predicted finish, busy ones included; the job waits when that worker is full), the dispatch-time
estimate recorded on the worker as its backlog. Two things can be varied to find out why a policy loads what it loads:

- `fresh_telemetry`: the broker sees each device's models the instant they change, instead of
  at the next heartbeat (the real broker learns them only from heartbeats);
- `running_by_remaining` (what-if): the running job counts as its exact remaining time in the
  worker's backlog (the broker itself estimates it from the step in the worker's last
  heartbeat, which this replay mirrors);
- `max_jobs_per_worker`: how many jobs the broker may hand one worker (the real value is 2:
  one running and one prefetched; a large value is early binding, like the oracle's).

Policy "smart-hold" exists only here, as a what-if for the broker (docs/benchmarks.md): each
queued job goes to the worker where it would finish first counting that worker's whole backlog
(running job, queued jobs' compute and loads, the models they bring), and waits for that worker
when it has no free slot; with `hold_patience_s` a worker that loads less wins if it finishes
at most that much later.

    python -m bench.replay --workers 4 --load 0.7 --jobs 400

It is a diagnosis tool: the benchmark's figures come from bench/routing.py's real runs.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import statistics
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from broker import routing
from broker.registry import WorkerRecord
from protocol.job import ControlNetSpec, Job, LoraSpec, ModelSpec
from protocol.worker_protocol import Telemetry

from bench import workload as W
from bench.oracle import run_oracle
from bench.routing import percentile

DISPATCH_LOOKAHEAD = 64  # broker.server._DISPATCH_LOOKAHEAD: queued jobs scanned per dispatch


def to_job(item: W.WorkItem) -> Job:
    return Job(request_id=item.request_id, prompt="replay", width=item.width, height=item.height,
               steps=item.steps, models=ModelSpec(base=item.base_model, refiner=item.refiner),
               loras=tuple(LoraSpec(name=n) for n in item.loras),
               controlnets=((ControlNetSpec(type=item.controlnet, image=b"x"),)
                            if item.controlnet else ()))


@dataclass
class _Device:
    spec: W.WorkerSpec
    record: WorkerRecord
    cache: OrderedDict = field(default_factory=OrderedDict)   # name -> mb, LRU first
    loading: list = field(default_factory=list)
    inbox: deque = field(default_factory=deque)               # items sent, not started
    running: W.WorkItem | None = None
    compute_from_s: float | None = None   # when the running job's models were loaded
    load_times: dict = field(default_factory=dict)
    step_times: dict = field(default_factory=dict)


@dataclass
class ReplayResult:
    loads: int
    latencies_s: list[float]
    busy_s: float
    makespan_s: float


def replay(items: list[W.WorkItem], specs: list[W.WorkerSpec], cost: W.CostModel, policy: str,
           *, fresh_telemetry: bool = False, max_jobs_per_worker: int = 2,
           heartbeat_s: float = 1.0, seed: int = 0, hold_patience_s: float = 0.0,
           running_by_remaining: bool = False) -> ReplayResult:
    sizes = {m: cost.model_mb(m) for i in items for m in i.models}  # as the sim workers advertise
    devices = [_Device(s, WorkerRecord(worker_id=s.worker_id, identity=s.worker_id.encode(),
                                       memory_total_mb=s.memory_mb,
                                       capabilities=frozenset(routing_features())))
               for s in specs]
    by_id = {d.spec.worker_id: d for d in devices}
    jobs = {i.request_id: to_job(i) for i in items}
    rr = routing.RoundRobin()
    queue: list[str] = []
    events: list = []
    seq = itertools.count()
    done_at: dict[str, float] = {}
    running_until: dict[str, float] = {}
    loads = 0
    busy_s = 0.0
    rng = random.Random(seed)

    def push(t, kind, *args):
        heapq.heappush(events, (t, next(seq), kind, args))

    def snapshot(d: _Device) -> Telemetry:
        used = sum(d.cache.values())
        return Telemetry.from_dict({
            "memory": {"total_mb": d.spec.memory_mb, "used_mb": used,
                       "free_mb": max(d.spec.memory_mb - used, 0.0)},
            "models_loaded": [{"name": n, "size_mb": mb} for n, mb in d.cache.items()],
            "models_loading": list(d.loading), "step_time_s": dict(d.step_times),
            "load_time_s": dict(d.load_times), "model_sizes_mb": sizes})

    def changed(d: _Device) -> None:
        if fresh_telemetry:
            d.record.set_telemetry(snapshot(d))

    def start_next(d: _Device, t: float) -> None:
        nonlocal loads
        if d.running is not None or not d.inbox:
            return
        item = d.running = d.inbox.popleft()
        d.compute_from_s = None
        missing = [m for m in item.models if m not in d.cache]
        load_s = sum(cost.model_load_s(m) for m in missing)
        loads += len(missing)
        d.loading = missing
        changed(d)
        running_until[d.spec.worker_id] = t + load_s + item.compute_s(cost)
        push(t + load_s, "loaded", d, item, missing)

    def backlog(d: _Device, t: float) -> tuple[float, set]:
        """(seconds until the device has finished what it holds, models it will then have)."""
        busy_until = t
        if d.running is not None:
            busy_until = max(t, running_until.get(d.spec.worker_id, t))
        # what the broker can know: the last telemetry, plus the models of the jobs it sent
        models = set(d.record.models_loaded) | set(d.record.telemetry.models_loading)
        if d.running is not None:
            models |= set(d.running.models)
        for item in d.inbox:
            busy_until += item.compute_s(cost) + sum(cost.model_load_s(m) for m in item.models
                                                    if m not in models)
            models |= set(item.models)
        return busy_until, models

    def dispatch_hold(t: float) -> None:
        """What-if (not the broker's rule): each queued job in order goes to the device where
        it would finish first, counting the device's whole backlog and the models its queued
        jobs will load; if that device has no free slot, the job waits for it."""
        for rid in list(queue):
            room = [d for d in devices if len(d.record.jobs) < max_jobs_per_worker]
            if not room:
                return
            item = item_by_id[rid]
            options = []
            for d in devices:
                if item.memory_mb(cost) > d.spec.memory_mb:
                    continue
                until, models = backlog(d, t)
                missing = sum(1 for m in item.models if m not in models)
                finish = until + item.compute_s(cost) + sum(
                    cost.model_load_s(m) for m in item.models if m not in models)
                options.append((round(finish, 3), missing, len(d.cache), d.spec.worker_id, d))
            best_finish = min(o[0] for o in options)
            # within hold_patience_s of the earliest finish, a worker that loads less wins
            d = min((o for o in options if o[0] <= best_finish + hold_patience_s),
                    key=lambda o: (o[1], o[0], o[2], o[3]))[4]
            if len(d.record.jobs) >= max_jobs_per_worker:
                continue
            queue.remove(rid)
            d.record.jobs[rid] = 1
            d.inbox.append(item)
            start_next(d, t)

    def dispatch(t: float) -> None:
        if policy == "smart-hold":
            dispatch_hold(t)
            return
        live = [d.record for d in devices]
        sizes = routing.known_model_sizes(live)
        if running_by_remaining:  # what-if: the running job's backlog is its remaining time
            for d in devices:
                if d.running is not None:
                    d.record.estimates[d.running.request_id] = routing.DispatchEstimate(
                        max(running_until[d.spec.worker_id] - t, 0.0), tuple(d.running.models))
        # as broker.server._dispatch: the models the jobs in the lookahead window need
        wanted = frozenset(m for r in list(queue)[:DISPATCH_LOOKAHEAD] for m in jobs[r].needed_models)
        for considered, rid in enumerate(list(queue)):
            if considered >= DISPATCH_LOOKAHEAD or not any(
                    len(r.jobs) < max_jobs_per_worker for r in live):
                return
            chosen = routing.choose_worker(jobs[rid], live, policy, rr, sizes, waiting=len(queue), wanted=wanted)
            if chosen is None:
                continue
            queue.remove(rid)
            # as broker.server._dispatch: the estimate routing counts as backlog until done
            chosen.estimates = {r: e for r, e in chosen.estimates.items() if r in chosen.jobs}
            chosen.estimates[rid] = routing.dispatch_estimate(jobs[rid], chosen)
            chosen.jobs[rid] = 1
            d = by_id[chosen.worker_id]
            d.inbox.append(item_by_id[rid])
            start_next(d, t)

    item_by_id = {i.request_id: i for i in items}
    for item in items:
        push(item.arrival_s, "arrive", item)
    for d in devices:
        d.record.set_telemetry(snapshot(d))
        push(rng.uniform(0, heartbeat_s), "heartbeat", d)
    remaining = len(items)
    last_t = 0.0
    saved = routing.MAX_JOBS_PER_WORKER
    routing.MAX_JOBS_PER_WORKER = max_jobs_per_worker  # eligible_now reads the module global
    try:
        while events and remaining:
            t, _, kind, args = heapq.heappop(events)
            last_t = t
            if kind == "arrive":
                queue.append(args[0].request_id)
            elif kind == "heartbeat":
                d = args[0]
                d.record.set_telemetry(snapshot(d))
                # as the worker's heartbeat: the job it runs and the step it reached
                d.record.current_job = d.running.request_id if d.running is not None else None
                d.record.current_step = 0
                if d.running is not None and d.compute_from_s is not None:
                    steps = jobs[d.running.request_id].steps
                    d.record.current_step = int(steps * (t - d.compute_from_s)
                                                / max(d.running.compute_s(cost), 1e-9))
                push(t + heartbeat_s, "heartbeat", d)
                idle = all(x.running is None and not x.inbox for x in devices)
                if idle and queue and not any(e[2] == "arrive" for e in events):
                    dispatch(t)
                    if all(x.running is None for x in devices):
                        raise RuntimeError(f"{len(queue)} queued jobs no device will take")
            elif kind == "loaded":
                d, item, missing = args
                activation = cost.activation_mb(item.width, item.height)
                for m in item.models:  # in the sim executor's order: hits move to the end
                    if m in d.cache:
                        d.cache.move_to_end(m)
                        continue
                    size = cost.model_mb(m)
                    while d.cache and sum(d.cache.values()) + size + activation > d.spec.memory_mb:
                        d.cache.popitem(last=False)
                    d.cache[m] = size
                    d.load_times[m] = cost.model_load_s(m)
                d.loading = []
                d.compute_from_s = t
                changed(d)
                push(t + item.compute_s(cost), "done", d, item)
                busy_s += item.compute_s(cost) + sum(cost.model_load_s(m) for m in missing)
            elif kind == "done":
                d, item = args
                d.step_times[f"{item.base_model}@{item.width}x{item.height}"] = \
                    cost.step_time_s(item.width, item.height)
                del d.record.jobs[item.request_id]
                d.running = None
                done_at[item.request_id] = t
                remaining -= 1
                changed(d)
                start_next(d, t)
            dispatch(t)
    finally:
        routing.MAX_JOBS_PER_WORKER = saved
    latencies = [done_at[i.request_id] - i.arrival_s for i in items if i.request_id in done_at]
    return ReplayResult(loads=loads, latencies_s=latencies, busy_s=busy_s, makespan_s=last_t)


def routing_features() -> tuple[str, ...]:
    from gpu_worker.sim_executor import ALL_FEATURES
    return ALL_FEATURES


# (label, policy, fresh telemetry, jobs per worker, running job by remaining time): the broker
# as it is, then one change each
VARIANTS = (
    ("as the broker runs it", None, False, 2, False),
    ("fresh telemetry", None, True, 2, False),
    ("early binding (no slot limit)", None, False, 10_000, False),
    ("exact remaining time (what-if)", None, False, 2, True),
)
WHAT_IFS = (("smart-hold what-if (see docs)", "smart-hold", False, 2, 0.0),
            ("smart-hold, 4 s patience", "smart-hold", False, 2, 4.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="4,8", help="comma list of worker counts (default 4,8)")
    parser.add_argument("--loads", default="0.7", help="comma list of loads (default 0.7)")
    parser.add_argument("--jobs", type=int, default=300, help="jobs (default 300, as bench.routing)")
    parser.add_argument("--seed", type=int, default=8, help="workload seed (default 8)")
    parser.add_argument("--policies", default=",".join(routing.POLICIES),
                        help="broker policies to vary (default all)")
    args = parser.parse_args(argv)
    cost = W.CostModel()
    print("SIMULATED replay of the broker's dispatch (broker.routing code, simulated time)")
    print(f"{'workers':>7} {'load':>5} {'policy':<13} {'variant':<32} {'loads':>6} {'p50 s':>7} {'p99 s':>7}")
    for n in (int(x) for x in args.workers.split(",")):
        specs = W.worker_specs(n, cost)
        for load in (float(x) for x in args.loads.split(",")):
            items = W.make_workload(W.WorkloadConfig(n_jobs=args.jobs, n_workers=n, load=load,
                                                     seed=args.seed, cost=cost))
            oracle = run_oracle(items, specs, cost, patience_s=cost.load_time_s)
            print(f"{n:>7} {load:>5.0%} {'oracle':<13} {'clairvoyant (bench/oracle.py)':<32} "
                  f"{oracle.loads:>6} {percentile(oracle.latencies_s, 50):>7.1f} "
                  f"{percentile(oracle.latencies_s, 99):>7.1f}")
            runs = [(label, p, fresh, jobs, 0.0, remaining) for p in args.policies.split(",")
                    for label, _, fresh, jobs, remaining in VARIANTS]
            runs += [(*what_if, False) for what_if in WHAT_IFS]
            for label, policy, fresh, max_jobs, patience_s, remaining in runs:
                r = replay(items, specs, cost, policy, fresh_telemetry=fresh,
                           max_jobs_per_worker=max_jobs, hold_patience_s=patience_s,
                           running_by_remaining=remaining)
                print(f"{n:>7} {load:>5.0%} {policy:<13} {label:<32} {r.loads:>6} "
                      f"{percentile(r.latencies_s, 50):>7.1f} {percentile(r.latencies_s, 99):>7.1f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
