"""A SIMULATED worker for the routing benchmark: `python -m bench.sim_worker --connect EP ...`.

The same process as `sdxl-broker worker --sim` (gpu_worker.transport.WorkerTransport with
gpu_worker.sim_executor.SimulatedExecutor underneath), plus the cost model issue 8 asks for
that the stock sim executor does not have yet (asked of the lead in the benchmark's report):
- step time proportional to pixels (`--sim-step-s` is the time at 1024x1024);
- load time proportional to the model's size (`--sim-load-s` is the time for `--sim-model-mb`);
- per-model sizes (`--sim-model-sizes name=mb,...`, e.g. the refiner and ControlNets);
- the job's activations count against the memory budget, and a job whose models plus
  activations exceed the whole budget fails with out_of_memory, as it would on a device;
- counters in the telemetry (`bench_counters`): loads, evictions, out-of-memory events and
  busy seconds, which the benchmark reads from status_response at the end of a run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

from gpu_worker import main as worker_main
from gpu_worker.sim_executor import ALL_FEATURES, SimulatedExecutor, _job_models
from protocol import constants as C
from protocol.errors import JobError
from protocol.job import Job

log = logging.getLogger("bench.sim_worker")

REFERENCE_PIXELS = 1024 * 1024


class BenchSimExecutor(SimulatedExecutor):
    """SIMULATION: SimulatedExecutor with pixel-scaled steps, size-scaled loads, activations in
    the memory budget and counters. Runs one job at a time (the transport's busy thread)."""

    def __init__(self, *args, step_s_at_1024: float, load_s_per_model_mb: float,
                 activation_mb_per_megapixel: float = 2048.0, **kwargs):
        super().__init__(*args, step_s=step_s_at_1024, **kwargs)
        self.step_s_at_1024 = step_s_at_1024
        self.load_s_per_model_mb = load_s_per_model_mb
        self.activation_mb_per_megapixel = activation_mb_per_megapixel
        self._reserved_mb = 0.0  # activations of the job about to run, kept free while loading
        self.counters = {"loads": 0, "evictions": 0, "out_of_memory": 0, "busy_s": 0.0,
                         "load_s": 0.0, "jobs": 0}
        self._counter_lock = threading.Lock()

    def telemetry(self) -> dict:
        out = super().telemetry()
        with self._counter_lock:
            out["bench_counters"] = dict(self.counters)
        return out

    def _count(self, name: str, amount: float = 1) -> None:
        with self._counter_lock:
            self.counters[name] += amount

    def run(self, job: Job, progress, should_abort) -> dict:
        started = time.perf_counter()
        activation_mb = self.activation_mb_per_megapixel * job.width * job.height / 1e6 * job.batch_size
        need_mb = sum(self._size_of(n) for n in _job_models(job)) + activation_mb
        if need_mb > self.memory_mb:
            self._count("out_of_memory")
            log.info("SIMULATED out of memory: job %s needs %.0f MB, budget %.0f MB",
                     job.request_id, need_mb, self.memory_mb)
            raise JobError(C.OUT_OF_MEMORY, f"simulated device out of memory: job needs "
                                            f"{need_mb:.0f} MB, budget is {self.memory_mb:.0f} MB")
        self.step_s = self.step_s_at_1024 * job.width * job.height / REFERENCE_PIXELS
        self._reserved_mb = activation_mb
        try:
            return super().run(job, progress, should_abort)
        finally:
            self._reserved_mb = 0.0
            self._count("jobs")
            self._count("busy_s", time.perf_counter() - started)

    def _ensure_loaded(self, name: str, should_abort) -> float:
        """The stock LRU cache, with load time by size and the job's activations kept free."""
        size = self._size_of(name)
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return 0.0
            self._loading.append(name)
        started = time.perf_counter()
        try:
            self._sleep(self.load_s_per_model_mb * size, should_abort)
        finally:
            with self._lock:
                self._loading.remove(name)
        took = time.perf_counter() - started
        with self._lock:
            while self._cache and sum(self._cache.values()) + size + self._reserved_mb > self.memory_mb:
                evicted, _ = self._cache.popitem(last=False)
                self._count("evictions")
                log.info("simulated cache: evicted %s to make room for %s", evicted, name)
            self._cache[name] = size
            self._load_time_s[name] = took
        self._count("loads")
        self._count("load_s", took)
        log.info("simulated load of %s took %.3f s", name, took)
        return took


def _parse_sizes(text: str | None) -> dict[str, float]:
    sizes = {}
    for part in (text or "").split(","):
        if part.strip():
            name, _, mb = part.partition("=")
            sizes[name.strip()] = float(mb)
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    worker_main.add_arguments(parser)
    parser.add_argument("--sim-model-sizes", default=None, metavar="NAME=MB,...",
                        help="sizes of named models (others are --sim-model-mb)")
    parser.add_argument("--bench-counters-file", default=None, metavar="PATH",
                        help="write the counters (loads, evictions, OOM, busy s) here as JSON on exit")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from gpu_worker.transport import WorkerTransport

    worker_id = args.worker_id or f"bench-sim-{os.getpid()}"
    executor = BenchSimExecutor(
        args.device, step_s_at_1024=args.sim_step_s,
        load_s_per_model_mb=args.sim_load_s / args.sim_model_mb,
        memory_mb=args.sim_memory_mb, model_mb=args.sim_model_mb,
        model_sizes_mb=_parse_sizes(args.sim_model_sizes), capabilities=ALL_FEATURES,
        worker_id=worker_id)
    transport = WorkerTransport(executor, args.connect, worker_id=worker_id,
                                heartbeat_interval_s=args.heartbeat_interval_s,
                                heartbeat_liveness=args.heartbeat_liveness)

    def _stop(signum, _frame):
        transport.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        return transport.run()
    finally:
        if args.bench_counters_file:
            with executor._counter_lock:
                counters = dict(executor.counters)
            tmp = f"{args.bench_counters_file}.tmp"
            with open(tmp, "w") as fh:
                json.dump(counters, fh)
            os.replace(tmp, args.bench_counters_file)  # never a half-written file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sim_worker",
                                     description="A SIMULATED worker for bench/routing.py.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
