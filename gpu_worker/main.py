"""`sdxl-broker worker`: one worker process bound to one device, connected to a broker's backend.

Without --sim it runs gpu_worker.executor.DiffusersExecutor (imported only then, so a --sim
worker never imports torch or diffusers). With --sim it runs the SIMULATED executor.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal


log = logging.getLogger("gpu_worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connect", required=True, metavar="EP",
                        help="the broker's backend endpoint, e.g. tcp://127.0.0.1:5556")
    parser.add_argument("--device", default="cpu", help="device this worker runs on (cpu, cuda:0, ...)")
    parser.add_argument("--worker-id", default=None, help="stable id (default host-pid-random)")
    parser.add_argument("--sim", action="store_true",
                        help="run a SIMULATED executor (no diffusers) for tests and benchmarks")
    parser.add_argument("--sim-load-s", type=float, default=0.5,
                        help="simulated load time (s) of a model of --sim-model-mb; scales with size")
    parser.add_argument("--sim-step-s", type=float, default=0.02,
                        help="simulated time per step (s); at 1024x1024 with --sim-cost-model scaled")
    parser.add_argument("--sim-memory-mb", type=float, default=8000.0,
                        help="simulated device memory budget (MB)")
    parser.add_argument("--sim-model-mb", type=float, default=2000.0,
                        help="simulated size of every model not in --sim-model-sizes (MB)")
    parser.add_argument("--sim-model-sizes", default=None, metavar="NAME=MB,...",
                        help="simulated sizes of named models, e.g. tiny-sdxl-refiner=3000")
    parser.add_argument("--sim-cost-model", choices=("flat", "scaled"), default="flat",
                        help="flat: every step takes --sim-step-s; scaled: steps scale with pixels "
                             "and activations count against the memory budget (out_of_memory "
                             "when models + activations exceed it)")
    parser.add_argument("--sim-capabilities", default=None,
                        help="comma list of features the simulated worker offers (default: all)")
    parser.add_argument("--models-dir", default="models", help="root of local models (real executor)")
    parser.add_argument("--output-dir", default="outputs", help="root images are saved under")
    parser.add_argument("--input-dir", default="inputs", help="root input image paths must be under")
    parser.add_argument("--cache-budget-mb", type=float, default=None,
                        help="memory the model cache may use (default: executor decides)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow pickle checkpoints (.ckpt/.bin/.pt): unsafe, off by default")
    parser.add_argument("--heartbeat-interval-s", type=float, default=1.0,
                        help="seconds between heartbeats (default 1.0)")
    parser.add_argument("--heartbeat-liveness", type=int, default=3,
                        help="missed broker heartbeats before reconnecting (default 3)")
    parser.add_argument("--curve-server-key", default=None, metavar="FILE",
                        help="the broker's public CURVE .key file: talk CURVE to the backend")
    parser.add_argument("--curve-client-key", default=None, metavar="FILE",
                        help="this worker's CURVE .key_secret file (its public .key must be in "
                             "the broker's --curve-allowed-keys)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def parse_model_sizes(text: str | None) -> dict[str, float]:
    """"a=2000,b=3000" -> {"a": 2000.0, "b": 3000.0}; a clear ValueError on a bad part."""
    sizes = {}
    for part in (text or "").split(","):
        if part.strip():
            name, sep, mb = part.partition("=")
            try:
                sizes[name.strip()] = float(mb)
            except ValueError:
                sep = ""
            if not sep or not name.strip():
                raise ValueError(f"--sim-model-sizes: expected NAME=MB, got {part.strip()!r}")
    return sizes


def build_executor(args: argparse.Namespace, worker_id: str):
    if args.sim:
        from gpu_worker.sim_executor import ALL_FEATURES, SimulatedExecutor
        capabilities = ALL_FEATURES
        if args.sim_capabilities is not None:
            capabilities = tuple(c.strip() for c in args.sim_capabilities.split(",") if c.strip())
        return SimulatedExecutor(args.device, load_s=args.sim_load_s, step_s=args.sim_step_s,
                                 memory_mb=args.sim_memory_mb, model_mb=args.sim_model_mb,
                                 model_sizes_mb=parse_model_sizes(args.sim_model_sizes),
                                 capabilities=capabilities, worker_id=worker_id,
                                 cost_model=args.sim_cost_model)
    from gpu_worker.executor import DiffusersExecutor  # heavy: torch + diffusers
    return DiffusersExecutor(args.device, models_dir=args.models_dir, output_dir=args.output_dir,
                             input_dir=args.input_dir, cache_budget_mb=args.cache_budget_mb,
                             allow_pickle=args.allow_pickle, worker_id=worker_id)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gpu_worker.transport import WorkerTransport

    worker_id = args.worker_id or f"{os.uname().nodename}-{args.device}-{os.getpid()}"
    curve_server_key = getattr(args, "curve_server_key", None)
    curve_client_key = getattr(args, "curve_client_key", None)
    if (curve_server_key is None) != (curve_client_key is None):
        log.error("worker %s: CURVE needs both --curve-server-key and --curve-client-key", worker_id)
        return 2
    try:
        from broker.curve import client_keys
        if curve_server_key:
            client_keys(curve_server_key, curve_client_key)   # unreadable key files: fail now
    except (ValueError, OSError) as exc:
        log.error("worker %s: bad CURVE key file: %s", worker_id, exc)
        return 2
    try:
        executor = build_executor(args, worker_id)
    except Exception:
        log.exception("worker %s: cannot start its executor on %s", worker_id, args.device)
        return 1
    transport = WorkerTransport(executor, args.connect, worker_id=worker_id,
                                heartbeat_interval_s=args.heartbeat_interval_s,
                                heartbeat_liveness=args.heartbeat_liveness,
                                curve_server_key=curve_server_key,
                                curve_client_key=curve_client_key)

    def _stop(signum, _frame):
        log.info("worker %s: signal %d, stopping", worker_id, signum)
        transport.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    code = transport.run()
    log.info("worker %s stopped (exit %d)", worker_id, code)
    return code
