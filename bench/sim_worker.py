"""A SIMULATED worker for the routing benchmark: `python -m bench.sim_worker --connect EP ...`.

A thin wrapper around `sdxl-broker worker --sim --sim-cost-model scaled` (gpu_worker.main with
gpu_worker.sim_executor.SimulatedExecutor, whose cost model is issue 8's: pixel-scaled steps,
size-scaled loads, activations in the memory budget, out_of_memory counted). The one thing it
adds is `--bench-counters-file`: the executor's counters (loads, evictions, out-of-memory
events, busy seconds) written as JSON when the worker stops, which bench/routing.py reads
because the broker's status_response does not carry them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from gpu_worker import main as worker_main

log = logging.getLogger("bench.sim_worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    worker_main.add_arguments(parser, "worker")
    parser.set_defaults(sim=True, sim_cost_model="scaled")
    parser.add_argument("--bench-counters-file", default=None, metavar="PATH",
                        help="write the counters (loads, evictions, OOM, busy s) here as JSON on exit")


def bench_counters(executor) -> dict:
    """The executor's counters under the names bench/routing.py reads."""
    c = executor.counters()
    return {"loads": c["models_loaded_total"], "evictions": c["evictions_total"],
            "out_of_memory": c["oom_events"], "busy_s": c["busy_s"], "jobs": c["jobs_total"]}


def run(args: argparse.Namespace) -> int:
    from gpu_worker.transport import WorkerTransport
    from runtime import settings as settings_table
    from runtime.logs import configure_logging

    args.sim = True  # this wrapper never starts a real executor
    settings = settings_table.resolve(args, "worker")
    configure_logging(settings["log_level"], settings["log_format"])
    worker_id = settings["worker_id"] or f"bench-sim-{os.getpid()}"
    executor = worker_main.build_executor(settings, worker_id)
    transport = WorkerTransport(executor, settings["connect"], worker_id=worker_id,
                                heartbeat_interval_s=settings["heartbeat_interval_s"],
                                heartbeat_liveness=settings["heartbeat_liveness"],
                                max_batch=worker_main.default_max_batch(settings),
                                batch_window_ms=settings["batch_window_ms"])

    def _stop(signum, _frame):
        transport.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        return transport.run()
    finally:
        if args.bench_counters_file:
            tmp = f"{args.bench_counters_file}.tmp"
            with open(tmp, "w") as fh:
                json.dump(bench_counters(executor), fh)
            os.replace(tmp, args.bench_counters_file)  # never a half-written file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sim_worker",
                                     description="A SIMULATED worker for bench/routing.py.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
