"""A discrete-event SIMULATION that drives the broker's real core (broker.core.BrokerCore) in
simulated time, for diagnosing routing results.

Simulated devices follow bench.workload's cost model (an LRU cache of models against a memory
budget, load and step times) with no sockets and no sleeping. They talk to the core only with
the messages real workers send (READY, HEARTBEAT with telemetry and the step reached, RESULT),
clients submit the routing benchmark's own request bodies (bench.workload.to_request), and
every dispatch decision is the core's own `tick`: the first 64 queued jobs scanned in order,
each sent to the policy's choice (for "smart" the best worker by predicted finish, busy ones
included; the job waits when that worker is full), the dispatch-time estimate recorded as the
worker's backlog. Things that can be varied to find out why a policy loads what it loads:

- `fresh_telemetry`: each device sends a heartbeat the instant its models change, instead of
  only every `heartbeat_s` (the real broker learns them only from heartbeats);
- `exact_progress` (what-if): before every dispatch pass each running device reports the exact
  step it reached, so the running job counts as its exact remaining steps in the backlog
  (the real broker knows the step of the last heartbeat);
- `max_jobs_per_worker`: how many jobs the broker may hand one worker (BrokerConfig; the real
  value is 2: one running and one prefetched; a large value is early binding, like the oracle's).
- dynamic batching (`cost.max_batch`, `--max-batch`): each device says max_batch in READY, so
  the core sends compatible queued jobs along with a job, and a device runs the compatible
  jobs in its inbox as one call costing (1 + cost.batch_cost x (k - 1)) lone computes, as the
  real worker and the sim executor do. The oracle does not batch.

Policy "smart-hold" exists only here, as a what-if for the broker (docs/benchmarks.md): each
queued job goes to the worker where it would finish first counting that worker's whole backlog
(running job, queued jobs' compute and loads, the models they bring), and waits for that worker
when it has no free slot; with `hold_patience_s` a worker that loads less wins if it finishes
at most that much later. It has its own dispatcher below (it is not the broker's).

    python -m bench.replay --workers 4 --load 0.7 --jobs 400

It is a diagnosis tool: the benchmark's figures come from bench/routing.py's real runs.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from broker import routing
from broker.core import BrokerConfig, BrokerCore, ClientRequest, ToClient, ToWorkers
from broker.journal import MemoryJournal
from protocol import constants as C
from protocol import worker_protocol as P

from bench import workload as W
from bench.oracle import run_oracle
from bench.routing import percentile


@dataclass
class _Device:
    spec: W.WorkerSpec
    cache: OrderedDict = field(default_factory=OrderedDict)   # name -> mb, LRU first
    loading: list = field(default_factory=list)
    inbox: deque = field(default_factory=deque)               # items sent, not started
    running: W.WorkItem | None = None
    companions: list = field(default_factory=list)          # items riding in running's call
    compute_from_s: float | None = None   # when the running job's models were loaded
    running_until_s: float = 0.0
    load_times: dict = field(default_factory=dict)
    step_times: dict = field(default_factory=dict)
    dispatch_ids: dict = field(default_factory=dict)         # request_id -> dispatch_id
    held: int = 0                                            # smart-hold: jobs sent, not done
    reported_models: frozenset = frozenset()                 # smart-hold: at the last heartbeat

    max_batch: int = 1                                       # jobs per batched call

    @property
    def identity(self) -> bytes:
        return self.spec.worker_id.encode()

    @property
    def call(self) -> list:
        """The items of the running call (the running item and its batch companions)."""
        return [self.running, *self.companions] if self.running is not None else []


@dataclass
class ReplayResult:
    loads: int
    latencies_s: list[float]
    busy_s: float
    makespan_s: float


class _CoreDispatcher:
    """The broker's real core, fed what the simulated devices and clients would send it."""

    def __init__(self, devices: list[_Device], items: list[W.WorkItem], policy: str,
                 max_jobs_per_worker: int, heartbeat_s: float, snapshot, step_of):
        config = BrokerConfig(routing=policy, max_queue=len(items) + 1,
                              max_jobs_per_worker=max_jobs_per_worker,
                              heartbeat_interval_s=heartbeat_s)
        self.core = BrokerCore(config, now=0.0, first_dispatch_id=1)
        self.core.open(MemoryJournal(), 0.0, wall_now=0.0)
        self.by_identity = {d.identity: d for d in devices}
        self.item_by_id = {i.request_id: i for i in items}
        self.snapshot, self.step_of = snapshot, step_of
        for d in devices:
            self._take(self.core.on_worker(d.identity, P.Ready(
                worker_id=d.spec.worker_id, memory_total_mb=d.spec.memory_mb,
                capabilities=list(routing_features()), simulated=True, telemetry=snapshot(d),
                max_batch=d.max_batch), 0.0))

    def _take(self, outputs) -> list[tuple[_Device, W.WorkItem]]:
        sent = []
        for out in outputs:
            if isinstance(out, ToWorkers) and isinstance(out.message, P.RunJob):
                d = self.by_identity[out.identities[0]]
                d.dispatch_ids[out.message.request_id] = out.message.dispatch_id
                sent.append((d, self.item_by_id[out.message.request_id]))
            elif isinstance(out, ToClient) and out.message.get("final") and not out.message.get("success"):
                raise RuntimeError(f"replay job failed in the broker: {out.message}")
        return sent

    def queued(self) -> int:
        return len(self.core.queue)

    def arrive(self, item: W.WorkItem, t: float) -> list:
        body = json.dumps(W.to_request(item, timeout_s=C.MAX_TIMEOUT_S)).encode()
        return self._take(self.core.on_client(ClientRequest((b"replay-client", b""), body), t))

    def heartbeat(self, d: _Device, t: float) -> list:
        current = d.running.request_id if d.running is not None else None
        return self._take(self.core.on_worker(d.identity, P.WorkerHeartbeat(
            telemetry=self.snapshot(d), busy=current is not None, current_job=current,
            current_step=self.step_of(d, t)), t))

    def done(self, d: _Device, item: W.WorkItem, t: float) -> list:
        return self._take(self.core.on_worker(d.identity, P.JobResult(
            request_id=item.request_id, dispatch_id=d.dispatch_ids.pop(item.request_id),
            data={"generated_images": []}), t))

    def tick(self, t: float) -> list:
        return self._take(self.core.tick(t))


class _HoldDispatcher:
    """What-if (not the broker's rule): each queued job in order goes to the device where it
    would finish first, counting the device's whole backlog and the models its queued jobs
    will load; if that device has no free slot, the job waits for it."""

    def __init__(self, devices: list[_Device], cost: W.CostModel, max_jobs_per_worker: int,
                 hold_patience_s: float):
        self.devices, self.cost = devices, cost
        self.max_jobs, self.patience_s = max_jobs_per_worker, hold_patience_s
        self.queue: list[W.WorkItem] = []

    def queued(self) -> int:
        return len(self.queue)

    def arrive(self, item: W.WorkItem, t: float) -> list:
        self.queue.append(item)
        return []

    def heartbeat(self, d: _Device, t: float) -> list:
        d.reported_models = frozenset(d.cache) | frozenset(d.loading)
        return []

    def done(self, d: _Device, item: W.WorkItem, t: float) -> list:
        d.held -= 1
        return []

    def _backlog(self, d: _Device, t: float) -> tuple[float, set]:
        """(seconds until the device has finished what it holds, models it will then have)."""
        cost = self.cost
        busy_until = max(t, d.running_until_s) if d.running is not None else t
        # what a broker can know: the last telemetry, plus the models of the jobs it sent
        models = set(d.reported_models)
        if d.running is not None:
            models |= set(d.running.models)
        for item in d.inbox:
            busy_until += item.compute_s(cost) + sum(cost.model_load_s(m) for m in item.models
                                                    if m not in models)
            models |= set(item.models)
        return busy_until, models

    def tick(self, t: float) -> list:
        sent = []
        cost = self.cost
        for item in list(self.queue):
            if not any(d.held < self.max_jobs for d in self.devices):
                break
            options = []
            for d in self.devices:
                if item.memory_mb(cost) > d.spec.memory_mb:
                    continue
                until, models = self._backlog(d, t)
                missing = sum(1 for m in item.models if m not in models)
                finish = until + item.compute_s(cost) + sum(
                    cost.model_load_s(m) for m in item.models if m not in models)
                options.append((round(finish, 3), missing, len(d.cache), d.spec.worker_id, d))
            best_finish = min(o[0] for o in options)
            # within hold_patience_s of the earliest finish, a worker that loads less wins
            d = min((o for o in options if o[0] <= best_finish + self.patience_s),
                    key=lambda o: (o[1], o[0], o[2], o[3]))[4]
            if d.held >= self.max_jobs:
                continue
            self.queue.remove(item)
            d.held += 1
            sent.append((d, item))
        return sent


def replay(items: list[W.WorkItem], specs: list[W.WorkerSpec], cost: W.CostModel, policy: str,
           *, fresh_telemetry: bool = False, max_jobs_per_worker: int = P.MAX_JOBS_PER_WORKER,
           heartbeat_s: float = 1.0, seed: int = 0, hold_patience_s: float = 0.0,
           exact_progress: bool = False) -> ReplayResult:
    sizes = {m: cost.model_mb(m) for i in items for m in i.models}  # as the sim workers advertise
    devices = [_Device(s, max_batch=cost.max_batch) for s in specs]
    events: list = []
    seq = itertools.count()
    done_at: dict[str, float] = {}
    loads = 0
    busy_s = 0.0
    rng = random.Random(seed)

    def push(t, kind, *args):
        heapq.heappush(events, (t, next(seq), kind, args))

    def snapshot(d: _Device) -> P.Telemetry:
        used = sum(d.cache.values())
        return P.Telemetry.from_dict({
            "memory": {"total_mb": d.spec.memory_mb, "used_mb": used,
                       "free_mb": max(d.spec.memory_mb - used, 0.0)},
            "models_loaded": [{"name": n, "size_mb": mb} for n, mb in d.cache.items()],
            "models_loading": list(d.loading), "step_time_s": dict(d.step_times),
            "load_time_s": dict(d.load_times), "model_sizes_mb": sizes})

    def step_of(d: _Device, t: float) -> int:
        """The denoising step the running job reached (0 while its models load)."""
        if d.running is None or d.compute_from_s is None:
            return 0
        return int(d.running.steps * (t - d.compute_from_s) / max(cost.call_compute_s(d.call), 1e-9))

    if policy == "smart-hold":
        broker = _HoldDispatcher(devices, cost, max_jobs_per_worker, hold_patience_s)
    else:
        broker = _CoreDispatcher(devices, items, policy, max_jobs_per_worker, heartbeat_s,
                                 snapshot, step_of)

    def start_next(d: _Device, t: float) -> None:
        nonlocal loads
        if d.running is not None or not d.inbox:
            return
        item = d.running = d.inbox.popleft()
        # dynamic batching, as the worker's busy thread: compatible items waiting in its inbox
        d.companions = [other for other in d.inbox if other.batch_key == item.batch_key][:d.max_batch - 1]
        for other in d.companions:
            d.inbox.remove(other)
        d.compute_from_s = None
        missing = [m for m in item.models if m not in d.cache]
        load_s = sum(cost.model_load_s(m) for m in missing)
        loads += len(missing)
        d.loading = missing
        changed(d, t)
        d.running_until_s = t + load_s + cost.call_compute_s(d.call)
        push(t + load_s, "loaded", d, item, missing)

    def deliver(sent: list) -> None:
        for d, item in sent:   # a dispatch's jobs all arrive before the device picks its call
            d.inbox.append(item)
        for d in {id(d): d for d, _ in sent}.values():
            start_next(d, t)

    def changed(d: _Device, t: float) -> None:
        if fresh_telemetry:
            deliver(broker.heartbeat(d, t))

    for item in items:
        push(item.arrival_s, "arrive", item)
    for d in devices:
        push(rng.uniform(0, heartbeat_s), "heartbeat", d)
    remaining = len(items)
    t = 0.0
    while events and remaining:
        t, _, kind, args = heapq.heappop(events)
        if kind == "arrive":
            deliver(broker.arrive(args[0], t))
        elif kind == "heartbeat":
            d = args[0]
            deliver(broker.heartbeat(d, t))
            push(t + heartbeat_s, "heartbeat", d)
            idle = all(x.running is None and not x.inbox for x in devices)
            if idle and broker.queued() and not any(e[2] == "arrive" for e in events):
                deliver(broker.tick(t))
                if all(x.running is None for x in devices):
                    raise RuntimeError(f"{broker.queued()} queued jobs no device will take")
        elif kind == "loaded":
            d, item, missing = args
            activation = cost.activation_mb(item.width, item.height) * len(d.call)
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
            changed(d, t)
            push(t + cost.call_compute_s(d.call), "done", d, item)
            busy_s += cost.call_compute_s(d.call) + sum(cost.model_load_s(m) for m in missing)
        elif kind == "done":
            d, item = args
            d.step_times[f"{item.base_model}@{item.width}x{item.height}"] = \
                cost.step_time_s(item.width, item.height)
            call, d.running, d.companions = d.call, None, []
            for finished in call:
                done_at[finished.request_id] = t
                remaining -= 1
                deliver(broker.done(d, finished, t))
            changed(d, t)
            start_next(d, t)
        if exact_progress:
            for d in devices:
                if d.running is not None:
                    deliver(broker.heartbeat(d, t))
        deliver(broker.tick(t))
    latencies = [done_at[i.request_id] - i.arrival_s for i in items if i.request_id in done_at]
    return ReplayResult(loads=loads, latencies_s=latencies, busy_s=busy_s, makespan_s=t)


def routing_features() -> tuple[str, ...]:
    from gpu_worker.sim_executor import ALL_FEATURES
    return ALL_FEATURES


# (label, policy, fresh telemetry, jobs per worker, exact progress): the broker as it is, then
# one change each
VARIANTS = (
    ("as the broker runs it", None, False, 2, False),
    ("fresh telemetry", None, True, 2, False),
    ("early binding (no slot limit)", None, False, 10_000, False),
    ("exact progress (what-if)", None, False, 2, True),
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
    parser.add_argument("--max-batch", type=int, default=W.CostModel.max_batch,
                        help="jobs per batched call of compatible jobs (dynamic batching; 1: off; "
                             f"default {W.CostModel.max_batch})")
    args = parser.parse_args(argv)
    cost = W.CostModel(max_batch=args.max_batch)
    print("SIMULATED devices driving the broker's real core (broker.core.BrokerCore, simulated time); "
          f"dynamic batching up to {cost.max_batch} jobs per call, each extra job "
          f"{cost.batch_cost:g} of a lone job's compute (the oracle does not batch)")
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
                           exact_progress=remaining)
                print(f"{n:>7} {load:>5.0%} {policy:<13} {label:<32} {r.loads:>6} "
                      f"{percentile(r.latencies_s, 50):>7.1f} {percentile(r.latencies_s, 99):>7.1f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
