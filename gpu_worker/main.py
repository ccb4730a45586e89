"""`sdxl-broker worker`: one worker process bound to one device, connected to a broker's backend.

Its settings are the `worker` rows of runtime.settings (flags > SDXL_BROKER_* > TOML > defaults),
the same names `serve` uses. Without --sim it runs gpu_worker.executor.DiffusersExecutor
(imported only then, so a --sim worker never imports torch or diffusers). With --sim it runs the
SIMULATED executor.

CPU threads: --cpu-threads-per-worker (default: the cores this process may run on) is applied
before torch loads: OMP_NUM_THREADS / MKL_NUM_THREADS (OpenMP reads them once, for every thread,
including the busy thread that runs jobs), then torch.set_num_threads.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from runtime import settings as settings_table
from runtime.logs import configure_logging
from runtime.settings import ConfigError

log = logging.getLogger("gpu_worker")

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def add_arguments(parser: argparse.ArgumentParser, command: str = "worker") -> None:
    settings_table.add_arguments(parser, "worker")


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


def cpu_affinity() -> list[int] | None:
    """The cores this process may run on (None where the OS does not say)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        try:
            import psutil

            return sorted(psutil.Process().cpu_affinity())
        except (AttributeError, OSError):
            return None


def apply_cpu_threads(requested: int | None, environ=os.environ) -> int:
    """Set the thread variables for this process before torch loads; returns the thread count.
    An explicit request wins over variables already set; without one, variables already set
    (e.g. by serve) are kept and the default is the cores this process may run on."""
    if requested is not None and requested < 1:
        raise ConfigError("cpu_threads_per_worker must be >= 1")
    if requested is None:
        inherited = environ.get("OMP_NUM_THREADS", "")
        if inherited.isdigit() and int(inherited) >= 1:
            requested = int(inherited)
        else:
            requested = len(cpu_affinity() or []) or os.cpu_count() or 1
    for name in _THREAD_VARIABLES:
        environ[name] = str(requested)
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see broker/serve.py worker_env
    return requested


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def torch_threads_in_a_fresh_thread() -> int:
    """torch.get_num_threads() as a new thread sees it (jobs run on the transport's busy thread)."""
    import threading

    import torch

    seen: list[int] = []
    probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    probe.start()
    probe.join()
    return seen[0]


def build_executor(settings: dict, worker_id: str, threads: int | None = None):
    if settings["sim"]:
        from gpu_worker.sim_executor import ALL_FEATURES, SimulatedExecutor
        capabilities = ALL_FEATURES
        if settings["sim_capabilities"] is not None:
            capabilities = tuple(c.strip() for c in settings["sim_capabilities"].split(",") if c.strip())
        return SimulatedExecutor(settings["device"], load_s=settings["sim_load_s"],
                                 step_s=settings["sim_step_s"], memory_mb=settings["sim_memory_mb"],
                                 model_mb=settings["sim_model_mb"],
                                 model_sizes_mb=parse_model_sizes(settings["sim_model_sizes"]),
                                 capabilities=capabilities, worker_id=worker_id,
                                 cost_model=settings["sim_cost_model"],
                                 batch_cost=settings["sim_batch_cost"],
                                 preview_cadence=_preview_cadence(settings),
                                 stall_after_jobs=settings["sim_stall_after_jobs"])
    if threads is not None:
        _set_torch_threads(threads)   # before the executor builds anything
    from runtime.logs import route_library_logs

    route_library_logs()   # before diffusers/transformers load: their messages use our handler
    from gpu_worker.executor import DiffusersExecutor  # heavy: torch + diffusers
    return DiffusersExecutor(settings["device"], models_dir=settings["models_dir"],
                             output_dir=settings["output_dir"], input_dir=settings["input_dir"],
                             cache_budget_mb=settings["cache_budget_mb"],
                             allow_pickle=settings["allow_pickle"], worker_id=worker_id,
                             upscaler=settings["upscaler"], single_file_config=settings["single_file_config"],
                             literal_prompts=settings["literal_prompts"],
                             preview_cadence=_preview_cadence(settings))


def _preview_cadence(settings: dict):
    from gpu_worker.previews import PreviewCadence

    return PreviewCadence(settings["preview_every_steps"], settings["preview_interval_ms"])


def default_max_batch(settings: dict) -> int:
    """--max-batch, else 4, but 1 for a real worker on a CPU: on this project's 2-core box 8
    compatible tiny jobs in one call ran no faster than one by one (docs/benchmarks.md), while
    accelerators gain from a fuller device."""
    if settings["max_batch"] is not None:
        return int(settings["max_batch"])
    return 1 if str(settings["device"]).split(":")[0] == "cpu" and not settings["sim"] else 4


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_table.resolve(args, "worker")
        if not settings["connect"]:
            raise ConfigError("--connect (the broker's backend endpoint) is required")
        threads = apply_cpu_threads(settings["cpu_threads_per_worker"])
        max_batch = default_max_batch(settings)
        if max_batch < 1 or settings["batch_window_ms"] < 0:
            raise ConfigError("max_batch must be >= 1 and batch_window_ms >= 0")
    except ConfigError as exc:
        print(f"sdxl-broker worker: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings["log_level"], settings["log_format"])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = settings["device"]
    worker_id = settings["worker_id"] or f"{os.uname().nodename}-{device}-{os.getpid()}"
    supervisor = None
    if settings["supervisor_pid"] is not None:
        # started by serve: exit when serve is gone (until the transport exists, at once)
        from runtime.parent_watch import SupervisorWatch

        supervisor = SupervisorWatch(settings["supervisor_pid"], name=f"worker {worker_id}").start()
    from gpu_worker.transport import WorkerTransport

    curve_server_key, curve_client_key = settings["curve_server_key"], settings["curve_client_key"]
    if (curve_server_key is None) != (curve_client_key is None):
        log.error("worker %s: CURVE needs both --curve-server-key and --curve-client-key", worker_id)
        return 2
    try:
        from runtime.curve import client_keys
        if curve_server_key:
            client_keys(curve_server_key, curve_client_key)   # unreadable key files: fail now
    except (ValueError, OSError) as exc:
        log.error("worker %s: bad CURVE key file: %s", worker_id, exc)
        return 2
    affinity = cpu_affinity()
    log.info("worker %s: %d CPU thread(s) (OMP_NUM_THREADS, MKL_NUM_THREADS%s), cores %s",
             worker_id, threads, "" if settings["sim"] else ", torch.set_num_threads",
             affinity if affinity is not None else "unknown")
    try:
        executor = build_executor(settings, worker_id, threads)
    except Exception:
        log.exception("worker %s: cannot start its executor on %s", worker_id, device)
        return 1
    if not settings["sim"]:
        # report what torch really uses where jobs run (a thread other than this one)
        seen = torch_threads_in_a_fresh_thread()
        if seen != threads:
            log.warning("worker %s: asked for %d CPU threads, torch uses %d", worker_id, threads, seen)
        threads = seen
    transport = WorkerTransport(executor, settings["connect"], worker_id=worker_id,
                                heartbeat_interval_s=settings["heartbeat_interval_s"],
                                heartbeat_liveness=settings["heartbeat_liveness"],
                                curve_server_key=curve_server_key,
                                curve_client_key=curve_client_key,
                                process_info={"cpu_threads": threads, "cpu_affinity": affinity},
                                max_batch=max_batch, batch_window_ms=settings["batch_window_ms"])

    def _stop(signum, _frame):
        log.info("worker %s: signal %d, stopping", worker_id, signum)
        transport.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if supervisor is not None:
        supervisor.stop_with(transport.stop)
    code = transport.run()
    log.info("worker %s stopped (exit %d)", worker_id, code)
    return code
