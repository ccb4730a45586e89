"""The local worker pool that `sdxl-broker serve` adds to the broker: which workers to run,
their command lines, CPU threads and affinity, and the Supervisor that keeps them alive.

The run path itself (settings, logging, signals, the broker, metrics, the ready line, the drain)
is broker.service, shared with `sdxl-broker broker`. This module never imports torch or
gpu_worker: with `--devices auto` the devices are found by a short-lived child process
(`python -m gpu_worker.devices`), so the broker process stays free of torch. A child rather than
"the first worker discovers": the plan (worker ids, threads, cores) is complete before any
worker starts, worker ids stay the stable device names, and the worker protocol needs no
extra field; the cost is one torch import in that child (~3 s here), which the broker process
paid itself before.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

from runtime import settings as settings_table
from runtime.settings import ConfigError

log = logging.getLogger("sdxl_broker.serve")

DISCOVERY_TIMEOUT_S = 180.0   # a torch import on a loaded machine, plus the device probes


# --- which workers to run -------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerPlan:
    worker_id: str
    device: str
    simulated: bool = False
    cache_budget_mb: float | None = None
    cpu_threads: int | None = None
    cpu_affinity: tuple[int, ...] | None = None


@dataclass(frozen=True)
class FoundDevice:
    name: str


def discover_in_child(timeout_s: float = DISCOVERY_TIMEOUT_S) -> list[FoundDevice]:
    """The host's devices, found by `python -m gpu_worker.devices` (which imports torch there,
    not here)."""
    log.info("finding devices (child process: python -m gpu_worker.devices)")
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "gpu_worker.devices"], capture_output=True,
                              text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"device discovery did not finish within {timeout_s:.0f}s") from None
    if done.returncode != 0:
        raise ConfigError("device discovery failed (python -m gpu_worker.devices exited "
                          f"{done.returncode}): {done.stderr.strip()[-800:]}")
    try:
        found = [FoundDevice(str(d["name"])) for d in json.loads(done.stdout)]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"device discovery printed something unexpected: {exc}") from None
    log.info("devices found in %.1fs: %s", time.monotonic() - started,
             ", ".join(d.name for d in found) or "none")
    return found


def available_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity), else every CPU."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return list(range(os.cpu_count() or 1))


def plan_workers(settings: dict, discover: Callable[[], list] | None = None,
                 total_memory_mb: float | None = None,
                 cpus: list[int] | None = None) -> list[WorkerPlan]:
    explicit = settings.get("_explicit", set())
    devices_spec = str(settings["devices"]).strip().lower()
    sim_n = int(settings["sim_workers"] or 0)
    cpu_n = settings["cpu_workers"]
    if sim_n < 0 or (cpu_n is not None and cpu_n < 0):
        raise ConfigError("worker counts must be >= 0")
    max_batch, window_ms = settings.get("max_batch"), settings.get("batch_window_ms")
    if (max_batch is not None and max_batch < 1) or (window_ms is not None and window_ms < 0):
        raise ConfigError("max_batch must be >= 1 and batch_window_ms >= 0")
    only_sim = sim_n > 0 and "devices" not in explicit and "cpu_workers" not in explicit
    accelerators: list[str] = []
    want_cpu = False
    if only_sim or devices_spec == "none":
        pass
    elif devices_spec == "auto":
        found = [d.name for d in (discover or discover_in_child)()]
        accelerators = [d for d in found if d != "cpu"]
        want_cpu = not accelerators
    else:
        for name in (d.strip() for d in devices_spec.split(",")):
            if not name:
                continue
            if name == "cpu":
                want_cpu = True
            elif name in accelerators:
                raise ConfigError(f"device {name} listed twice")
            else:
                accelerators.append(name)
    if not only_sim and cpu_n is None:
        cpu_n = 1 if want_cpu else 0
    cpu_n = 0 if only_sim else int(cpu_n or 0)

    plans = [WorkerPlan(worker_id=d, device=d, cache_budget_mb=settings["cache_budget_mb"])
             for d in accelerators]
    cpu_budget = settings["cache_budget_mb"]
    if cpu_n and cpu_budget is None:
        if total_memory_mb is None:
            import psutil
            total_memory_mb = psutil.virtual_memory().total / 2**20
        cpu_budget = round(total_memory_mb * 0.5 / cpu_n, 1)  # the cpu workers share the RAM
    plans += [WorkerPlan(worker_id=f"cpu-{i}", device="cpu", cache_budget_mb=cpu_budget)
              for i in range(cpu_n)]
    plans = share_cpus(plans, settings.get("cpu_threads_per_worker"),
                       available_cpus() if cpus is None else cpus)
    plans += [WorkerPlan(worker_id=f"sim-{i}", device="cpu", simulated=True,
                         cache_budget_mb=settings["cache_budget_mb"]) for i in range(sim_n)]
    return plans


def share_cpus(plans: list[WorkerPlan], threads: int | None, cpus: list[int]) -> list[WorkerPlan]:
    """Each real worker's CPU threads (given, else cores / workers, at least 1) and, when every
    worker's threads fit on separate cores, the cores it is pinned to. Every worker does CPU
    work (a GPU worker too: text encoding set-up, PNG encoding), and torch would otherwise start
    one thread per core in each: N workers on N cores run up to 10-30x slower (issue 17)."""
    if not plans:
        return plans
    if threads is not None and threads < 1:
        raise ConfigError("cpu_threads_per_worker must be >= 1")
    per_worker = threads or max(1, len(cpus) // len(plans))
    fits = per_worker * len(plans) <= len(cpus)
    out = []
    for index, plan in enumerate(plans):
        affinity = tuple(cpus[index * per_worker:(index + 1) * per_worker]) if fits else None
        out.append(replace(plan, cpu_threads=per_worker, cpu_affinity=affinity))
    return out


def connectable(endpoint: str) -> str:
    """A bound endpoint as a local worker must connect to it (wildcards -> loopback)."""
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:"):
        if endpoint.startswith(wildcard):
            return "tcp://127.0.0.1:" + endpoint[len(wildcard):]
    return endpoint


# settings serve hands to every worker as they are; the sim_* ones only to simulated workers,
# and only when given (else the worker's default applies, which is the table's default too)
_PASSED_TO_WORKERS = ("models_dir", "output_dir", "input_dir", "allow_pickle", "upscaler",
                      "single_file_config", "literal_prompts", "preview_every_steps",
                      "preview_interval_ms", "max_batch", "batch_window_ms",
                      "heartbeat_interval_s", "heartbeat_liveness", "log_level", "log_format")
_SIM_SETTINGS = tuple(s.name for s in settings_table.for_command("worker")
                      if s.name.startswith("sim_"))


def worker_argv(plan: WorkerPlan, backend: str, settings: dict) -> list[str]:
    values = {name: settings[name] for name in _PASSED_TO_WORKERS if name in settings}
    values.update(connect=backend, device=plan.device, worker_id=plan.worker_id,
                  cache_budget_mb=plan.cache_budget_mb, cpu_threads_per_worker=plan.cpu_threads,
                  supervisor_pid=os.getpid())   # the worker exits when serve is gone
    if plan.simulated:
        values["sim"] = True
        explicit = settings.get("_explicit", set())
        values.update({name: settings[name] for name in _SIM_SETTINGS
                       if name in explicit and settings.get(name) is not None})
    return [sys.executable, "-m", "broker.cli", "worker"] + settings_table.as_argv(values, "worker")


def worker_env(plan: WorkerPlan, environ: dict[str, str] | None = None) -> dict[str, str]:
    """serve's environment without SDXL_BROKER_* (the worker gets serve's resolved settings as
    flags, nothing else), plus the thread variables OpenMP and MKL read when torch loads
    (OMP_WAIT_POLICY only when the environment does not set it already)."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if not k.startswith(settings_table.ENV_PREFIX)}
    if plan.cpu_threads is not None:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(plan.cpu_threads)
        # idle OpenMP threads sleep instead of spinning: on a host where other processes also
        # want the cores, spinning threads wait for descheduled team mates (measured on this
        # 2-core box under load: 2 threads, 3 tiny jobs 32 s spinning vs 2.5 s passive)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


# --- the gateway (--http) ------------------------------------------------------------------
def check_gateway(settings: dict) -> None:
    """ConfigError when --http is malformed, or exposed beyond loopback without a token or
    --http-insecure, or cannot reach a plain frontend."""
    if not settings.get("http"):
        return
    from gateway.cli import exposure_problem, parse_host_port

    try:
        host, _port = parse_host_port(settings["http"])
    except Exception as exc:
        raise ConfigError(f"--http: {exc}") from None
    problem = exposure_problem(host, settings["http_token"], settings["http_insecure"])
    if problem:
        raise ConfigError(problem)
    if settings.get("curve_secret_key") and not settings.get("local_frontend"):
        raise ConfigError("--http with CURVE needs --local-frontend: the gateway connects there")


def gateway_local_frontend(settings: dict) -> str | None:
    """With --http and no --local-frontend: an ipc endpoint in a private (0700) temporary folder
    for the gateway, so it is the operator's trusted client (it cancels any job of its users'
    and shows every queued prompt on the dashboard) while a process of another user on this
    machine cannot reach that endpoint. None where ipc:// is not available (Windows): the
    gateway then connects to the main frontend like any client. The folder goes at exit."""
    if not settings.get("http") or settings.get("local_frontend") or os.name != "posix":
        return None
    import atexit
    import shutil

    folder = tempfile.mkdtemp(prefix="sdxl-broker-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return f"ipc://{folder}/gateway.sock"


def gateway_child(settings: dict, endpoint: str):
    """The `sdxl-broker gateway` child for --http, a ZeroMQ client of `endpoint` (the plain
    frontend: the local one when CURVE guards the main one). The token goes in the
    environment, not on a command line everyone can read."""
    from broker.supervisor import ChildSpec

    argv = [sys.executable, "-m", "broker.cli", "gateway", "--endpoint", endpoint,
            "--http", settings["http"], "--output-dir", settings["output_dir"],
            "--http-max-body-mb", str(settings["http_max_body_mb"]),
            "--log-level", str(settings["log_level"]).lower()]
    if settings["http_insecure"]:
        argv.append("--http-insecure")
    if settings.get("default_model_base"):
        argv += ["--http-default-model", settings["default_model_base"]]
    for origin in (settings["http_cors_origin"] or "").split(","):
        if origin.strip():
            argv += ["--http-cors-origin", origin.strip()]
    env = dict(os.environ)
    # the child talks plain ZeroMQ to `endpoint`: a client's CURVE keys in the environment
    # (clients.client.connection_from_args reads them) are not for it
    for name in ("SDXL_BROKER_HTTP_TOKEN", "SDXL_BROKER_CURVE_SERVER_KEY", "SDXL_BROKER_CURVE_CLIENT_KEY"):
        env.pop(name, None)
    if settings["http_token"]:
        env["SDXL_BROKER_HTTP_TOKEN"] = settings["http_token"]
    return ChildSpec(name="gateway", argv=argv, env=env)


def _wait_for_gateway(http: str, stop: threading.Event, deadline: float) -> None:
    """`ready` is printed once the gateway accepts connections too."""
    import socket

    host, _, port = http.rpartition(":")
    host = host.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                log.info("gateway listening on http://%s", http)
                return
        except OSError:
            stop.wait(0.2)
    log.warning("the gateway is not accepting on %s yet", http)


# --- the pool -------------------------------------------------------------------------------
class LocalWorkers:
    """serve's worker processes: started with the Supervisor (restarted when they crash),
    waited for until each has registered with the broker, stopped after the drain."""

    def __init__(self, plans: list[WorkerPlan], settings: dict):
        from broker.supervisor import RestartPolicy, Supervisor

        self.plans = plans
        self.settings = settings
        self.supervisor = Supervisor(
            policy_factory=lambda: RestartPolicy(max_restarts=settings["max_restarts"]))
        self._curve_argv: list[str] = []

    def prepare_curve(self, config) -> None:
        """With CURVE on, the workers get their own key pair (in <state-dir>/curve or a temp
        dir), authorised on this broker's backend only, through config.curve_local_worker_keys."""
        if not getattr(config, "curve_secret_key", None):
            return
        from runtime.curve import local_worker_keys

        state_dir = self.settings.get("state_dir")
        directory = (os.path.join(state_dir, "curve") if state_dir
                     else tempfile.mkdtemp(prefix="sdxl-broker-curve-"))
        broker_public, worker_public, worker_secret = local_worker_keys(config.curve_secret_key,
                                                                        directory)
        config.curve_local_worker_keys = (worker_public,)
        log.info("CURVE on; the local workers use the key pair in %s", directory)
        self._curve_argv = ["--curve-server-key", broker_public, "--curve-client-key", worker_secret]

    def start(self, backend_endpoint: str, gateway_endpoint: str | None = None) -> None:
        """The workers, and with --http the gateway (a client of `gateway_endpoint`)."""
        from broker.supervisor import ChildSpec

        backend = connectable(backend_endpoint)
        for plan in self.plans:
            if not plan.simulated:
                log.info("worker %s on %s: %d CPU thread(s)%s", plan.worker_id, plan.device,
                         plan.cpu_threads,
                         f", cores {list(plan.cpu_affinity)}" if plan.cpu_affinity else
                         " (not pinned: the threads do not fit the cores)")
            self.supervisor.add(ChildSpec(
                name=plan.worker_id,
                argv=worker_argv(plan, backend, self.settings) + self._curve_argv,
                env=worker_env(plan), cpu_affinity=plan.cpu_affinity))
        if self.settings.get("http") and gateway_endpoint:
            self.supervisor.add(gateway_child(self.settings, connectable(gateway_endpoint)))
        self.supervisor.start()

    def wait_registered(self, registered: Callable[[], set[str]], stop: threading.Event,
                        timeout_s: float) -> bool:
        """True once every planned worker is registered; False (after logging why) when one
        exits first, the time runs out, or stop is set."""
        expected = {p.worker_id for p in self.plans}
        deadline = time.monotonic() + timeout_s
        while not stop.is_set():
            missing = expected - registered()
            if not missing:
                log.info("all %d worker(s) registered: %s", len(expected), ", ".join(sorted(expected)))
                if self.settings.get("http"):
                    _wait_for_gateway(self.settings["http"], stop, deadline)
                return True
            failed = set(self.supervisor.down()) & missing
            if failed:
                log.error("worker(s) %s exited before registering; stopping", sorted(failed))
                return False
            if time.monotonic() > deadline:
                log.error("worker(s) %s did not register within %.0fs; stopping",
                          sorted(missing), timeout_s)
                return False
            stop.wait(0.1)
        return False

    def stop_restarting(self) -> None:
        self.supervisor.stop_restarting()

    def stop(self) -> None:
        self.supervisor.stop(timeout_s=10.0)
