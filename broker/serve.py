"""`sdxl-broker serve`: the broker plus one worker process per device, in one command.

Settings come from, in rising precedence: built-in defaults, a TOML file (`--config FILE`,
keys at the top level or under `[serve]`, dashes or underscores), `SDXL_BROKER_<NAME>`
environment variables (e.g. SDXL_BROKER_CPU_WORKERS=2), and command-line flags.

It starts the Broker in this process, one worker subprocess per device (restarted by the
Supervisor when it crashes), waits until every worker has registered, then prints exactly one
line `ready <frontend endpoint>` on stdout. SIGINT/SIGTERM drains (no new jobs; running ones
finish or hit --drain-timeout-s) and stops every child. Workers run in their own sessions so a
terminal's Ctrl-C reaches only `serve`, which stops them after the drain; on Linux they also
get SIGTERM if `serve` itself dies (PR_SET_PDEATHSIG), so nothing is orphaned.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("sdxl_broker.serve")

ENV_PREFIX = "SDXL_BROKER_"


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


@dataclass(frozen=True)
class Setting:
    name: str          # argparse dest, TOML key, env suffix (upper-cased)
    type: Callable[[Any], Any]
    default: Any
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("frontend", str, "tcp://127.0.0.1:5555", "client endpoint (ROUTER) to bind"),
    Setting("backend", str, "tcp://127.0.0.1:5556", "worker endpoint (ROUTER) to bind"),
    Setting("devices", str, "auto",
            "auto | cpu | none | a comma list such as cuda:0,cuda:1 or directml:0 or mps; "
            "one worker per device (auto: every accelerator found, else cpu)"),
    Setting("cpu_workers", int, None,
            "number of cpu workers, each with its own memory budget (default 1 when the "
            "devices are cpu; with accelerators, extra cpu workers only when given)"),
    Setting("sim_workers", int, 0,
            "add N simulated workers (no diffusers; for tests and benchmarks). Given alone "
            "(without --devices/--cpu-workers) only simulated workers run"),
    Setting("models_dir", str, "models", "where the workers look for models"),
    Setting("output_dir", str, "outputs", "root under which images are saved"),
    Setting("input_dir", str, "inputs", "root for image paths named in requests"),
    Setting("state_dir", str, None, "directory of the job journal (jobs survive a restart)"),
    Setting("metrics_port", int, None, "serve Prometheus metrics on this port (/metrics)"),
    Setting("metrics_addr", str, "127.0.0.1", "address the metrics server listens on"),
    Setting("max_queue", int, 1000, "queued jobs beyond this get queue_full"),
    Setting("max_attempts", int, 2, "runs of a job whose worker died before worker_lost"),
    Setting("routing", str, "smart", "smart | round-robin | least-loaded | tiered"),
    Setting("cache_budget_mb", float, None,
            "model cache budget per worker (default for cpu workers: half the RAM / N)"),
    Setting("heartbeat_interval_s", float, 1.0, "broker/worker heartbeat interval"),
    Setting("max_message_mb", int, 64, "largest accepted message"),
    Setting("default_model", str, None, "model_base used when a request names none"),
    Setting("allow_pickle", _bool, False, "allow pickle checkpoints (.ckpt/.bin/.pt)"),
    Setting("curve_secret_key", str, None, "CURVE secret key file of the broker"),
    Setting("curve_allowed_keys", str, None, "directory of authorised CURVE public keys"),
    Setting("local_frontend", str, None,
            "a second client endpoint without CURVE, loopback only (ipc:// or tcp://127.0.0.1)"),
    Setting("sim_load_s", float, None, "simulated workers: model load time"),
    Setting("sim_step_s", float, None, "simulated workers: time per denoising step"),
    Setting("sim_memory_mb", float, None, "simulated workers: device memory"),
    Setting("sim_model_mb", float, None, "simulated workers: size of one model"),
    Setting("ready_timeout_s", float, 300.0, "give up if the workers are not registered by then"),
    Setting("drain_timeout_s", float, 30.0, "on SIGINT/SIGTERM, wait this long for running jobs"),
    Setting("max_restarts", int, 5, "crashes of one worker (within 2 minutes) before giving up"),
    Setting("log_level", str, "INFO", "DEBUG | INFO | WARNING | ERROR"),
    Setting("log_format", str, "text", "text | json (one JSON object per line)"),
)
_BY_NAME = {s.name: s for s in SETTINGS}


class ConfigError(ValueError):
    pass


def _metavar(s: Setting) -> str:
    for suffix, metavar in (("_dir", "DIR"), ("_s", "SECONDS"), ("_mb", "MB"), ("_port", "PORT")):
        if s.name.endswith(suffix):
            return metavar
    if s.name in ("frontend", "backend", "local_frontend"):
        return "EP"
    return "N" if s.type is int else s.name.split("_")[-1].upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Every flag can also be set in the --config TOML file (same name, dashes "
                     "or underscores) or as SDXL_BROKER_<NAME> (e.g. SDXL_BROKER_CPU_WORKERS=2); "
                     "flags win over the environment, which wins over the file.")
    parser.add_argument("--config", metavar="FILE", default=None, help="TOML settings file")
    for s in SETTINGS:
        flag = "--" + s.name.replace("_", "-")
        if s.type is _bool:
            parser.add_argument(flag, dest=s.name, action="store_true", default=None, help=s.help)
        else:
            parser.add_argument(flag, dest=s.name, default=None, metavar=_metavar(s),
                                type=s.type,
                                help=s.help if s.default is None else f"{s.help} (default: {s.default})")


def _load_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    if isinstance(data.get("serve"), dict):
        data = {**{k: v for k, v in data.items() if k != "serve"}, **data["serve"]}
    return data


def resolve_settings(args: argparse.Namespace, environ: dict[str, str] | None = None) -> dict:
    """flags > SDXL_BROKER_* environment > TOML file > defaults. Also records which settings
    were given explicitly (key "_explicit")."""
    environ = os.environ if environ is None else environ
    file_values: dict = {}
    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        for key, value in _load_toml(config_path).items():
            name = key.replace("-", "_")
            if name not in _BY_NAME:
                raise ConfigError(f"{config_path}: unknown setting {key!r}")
            file_values[name] = value
    out: dict = {}
    explicit: set[str] = set()
    for s in SETTINGS:
        flag_value = getattr(args, s.name, None)
        env_value = environ.get(ENV_PREFIX + s.name.upper())
        try:
            if flag_value is not None:
                value = flag_value
            elif env_value is not None:
                value = s.type(env_value)
            elif s.name in file_values:
                value = s.type(file_values[s.name])
            else:
                out[s.name] = s.default
                continue
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"setting {s.name}: {exc}") from None
        explicit.add(s.name)
        out[s.name] = value
    out["_explicit"] = explicit
    return out


# --- which workers to run -------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerPlan:
    worker_id: str
    device: str
    simulated: bool = False
    cache_budget_mb: float | None = None


def plan_workers(settings: dict, discover: Callable[[], list] | None = None,
                 total_memory_mb: float | None = None) -> list[WorkerPlan]:
    explicit = settings.get("_explicit", set())
    devices_spec = str(settings["devices"]).strip().lower()
    sim_n = int(settings["sim_workers"] or 0)
    cpu_n = settings["cpu_workers"]
    if sim_n < 0 or (cpu_n is not None and cpu_n < 0):
        raise ConfigError("worker counts must be >= 0")
    only_sim = sim_n > 0 and "devices" not in explicit and "cpu_workers" not in explicit
    accelerators: list[str] = []
    want_cpu = False
    if only_sim or devices_spec == "none":
        pass
    elif devices_spec == "auto":
        if discover is None:
            from gpu_worker.devices import discover_devices as discover
        found = [d.name for d in discover()]
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
    plans += [WorkerPlan(worker_id=f"sim-{i}", device="cpu", simulated=True,
                         cache_budget_mb=settings["cache_budget_mb"]) for i in range(sim_n)]
    return plans


def connectable(endpoint: str) -> str:
    """A bound endpoint as a local worker must connect to it (wildcards -> loopback)."""
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:"):
        if endpoint.startswith(wildcard):
            return "tcp://127.0.0.1:" + endpoint[len(wildcard):]
    return endpoint


def worker_argv(plan: WorkerPlan, backend: str, settings: dict) -> list[str]:
    argv = [sys.executable, "-m", "broker.cli", "worker", "--connect", backend,
            "--device", plan.device, "--worker-id", plan.worker_id,
            "--models-dir", settings["models_dir"], "--output-dir", settings["output_dir"],
            "--input-dir", settings["input_dir"],
            "--heartbeat-interval-s", str(settings["heartbeat_interval_s"])]
    if plan.cache_budget_mb is not None:
        argv += ["--cache-budget-mb", str(plan.cache_budget_mb)]
    if settings["allow_pickle"]:
        argv.append("--allow-pickle")
    if plan.simulated:
        argv.append("--sim")
        for name in ("sim_load_s", "sim_step_s", "sim_memory_mb", "sim_model_mb"):
            if settings[name] is not None:
                argv += ["--" + name.replace("_", "-"), str(settings[name])]
    return argv


# --- logging --------------------------------------------------------------------------------
class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname,
                 "logger": record.name, "pid": record.process, "message": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# --- the command ----------------------------------------------------------------------------
def _broker_config(settings: dict):
    from broker.server import BrokerConfig

    fields = {f.name for f in dataclasses.fields(BrokerConfig)}
    values = {name: settings[name] for name in fields if name in settings}
    if "default_model_base" in fields:
        values["default_model_base"] = settings["default_model"]
    for name in ("curve_secret_key", "curve_allowed_keys"):
        if settings[name] is not None and name not in fields:
            log.warning("--%s is not supported by this broker build; ignored",
                        name.replace("_", "-"))
    return BrokerConfig(**values)


def _curve_for_workers(config, settings: dict) -> list[str]:
    """With CURVE on, the workers serve starts get their own key pair (in <state-dir>/curve or
    a temp dir), authorised for this broker only through config.curve_extra_keys."""
    if not getattr(config, "curve_secret_key", None):
        return []
    from broker.curve import local_worker_keys

    directory = (os.path.join(settings["state_dir"], "curve") if settings.get("state_dir")
                 else tempfile.mkdtemp(prefix="sdxl-broker-curve-"))
    broker_public, worker_public, worker_secret = local_worker_keys(config.curve_secret_key, directory)
    config.curve_extra_keys = (worker_public,)
    log.info("CURVE on; the local workers use the key pair in %s", directory)
    return ["--curve-server-key", broker_public, "--curve-client-key", worker_secret]


def _ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


def _remove_stale_ipc(endpoints: list[str]) -> None:
    for endpoint in endpoints:
        path = _ipc_path(endpoint)
        if path and os.path.exists(path):
            try:
                os.unlink(path)
                log.info("removed ipc socket file %s", path)
            except OSError as exc:
                log.warning("cannot remove ipc socket file %s: %s", path, exc)


def _registered_ids(broker) -> set[str]:
    return {w["worker_id"] for w in broker.status().get("workers", []) if w.get("state") != "lost"}


def run(args: argparse.Namespace) -> int:
    try:
        settings = resolve_settings(args)
    except ConfigError as exc:
        print(f"sdxl-broker serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings["log_level"], settings["log_format"])
    try:
        plans = plan_workers(settings)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    if not plans:
        log.warning("no workers planned: jobs will queue until a worker connects to the backend")

    stop_requested = threading.Event()
    hurry = threading.Event()

    def on_signal(signum, _frame):
        if stop_requested.is_set():
            log.warning("%s again: already stopping (the drain lasts at most --drain-timeout-s)",
                        signal.Signals(signum).name)
            hurry.set()  # honoured when the drain has not begun yet
        else:
            log.info("%s received: draining and stopping", signal.Signals(signum).name)
        stop_requested.set()

    previous_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    from broker.server import Broker
    from broker.supervisor import ChildSpec, RestartPolicy, Supervisor

    try:
        broker_config = _broker_config(settings)
        worker_curve_argv = _curve_for_workers(broker_config, settings)
        broker = Broker(broker_config)
    except (TypeError, ValueError, OSError) as exc:
        log.error("bad broker settings: %s", exc)
        _restore(previous_handlers)
        return 2
    supervisor = Supervisor(policy_factory=lambda: RestartPolicy(max_restarts=settings["max_restarts"]))
    endpoints: list[str] = []
    exit_code = 0
    started = True
    metrics_server = None
    try:
        try:
            broker.start()
        except Exception as exc:  # e.g. zmq.ZMQError: Address already in use
            log.error("cannot start the broker on %s / %s: %s", settings["frontend"],
                      settings["backend"], exc)
            # Broker.start leaves the socket it did bind open on failure, and an open socket
            # makes interpreter exit hang in zmq's context teardown: destroy that context.
            context = getattr(broker, "_ctx", None)
            if context is not None:
                context.destroy(linger=0)
            started = False
            exit_code = 1
            return exit_code
        endpoints = [broker.frontend_endpoint, broker.backend_endpoint]
        if broker.local_frontend_endpoint:
            endpoints.append(broker.local_frontend_endpoint)
        backend = connectable(broker.backend_endpoint)
        log.info("broker accepting on %s; workers connect to %s", broker.frontend_endpoint, backend)
        if settings["metrics_port"] is not None:
            from broker.serve_metrics import start_metrics_server

            try:
                metrics_server, _ = start_metrics_server(settings["metrics_port"], broker.status,
                                                         supervisor, addr=settings["metrics_addr"],
                                                         registry=broker.metrics.registry)
            except OSError as exc:
                log.error("cannot serve metrics on %s:%s: %s", settings["metrics_addr"],
                          settings["metrics_port"], exc)
                exit_code = 1
                return exit_code
        for plan in plans:
            supervisor.add(ChildSpec(name=plan.worker_id,
                                     argv=worker_argv(plan, backend, settings) + worker_curve_argv))
        supervisor.start()

        expected = {p.worker_id for p in plans}
        deadline = time.monotonic() + settings["ready_timeout_s"]
        while not stop_requested.is_set():
            missing = expected - _registered_ids(broker)
            if not missing:
                break
            failed = set(supervisor.down()) & missing
            if failed:
                log.error("worker(s) %s exited before registering; stopping", sorted(failed))
                exit_code = 1
                stop_requested.set()
                break
            if time.monotonic() > deadline:
                log.error("worker(s) %s did not register within %.0fs; stopping",
                          sorted(missing), settings["ready_timeout_s"])
                exit_code = 1
                stop_requested.set()
                break
            stop_requested.wait(0.1)
        if not stop_requested.is_set():
            log.info("all %d worker(s) registered: %s", len(plans), ", ".join(sorted(expected)))
            sys.stdout.write(f"ready {broker.frontend_endpoint}\n")
            sys.stdout.flush()
            stop_requested.wait()
    finally:
        supervisor.stop_restarting()
        drain_s = 0.0 if hurry.is_set() or exit_code else settings["drain_timeout_s"]
        if drain_s:
            log.info("draining: no new jobs; running ones get up to %.0fs", drain_s)
        if started:
            try:
                broker.stop(drain_timeout_s=drain_s)
            except Exception:
                log.exception("broker did not stop cleanly")
        supervisor.stop(timeout_s=10.0)
        if metrics_server is not None:
            metrics_server.shutdown()
        _remove_stale_ipc(endpoints)  # only what this process bound, never another's socket
        _restore(previous_handlers)
        log.info("serve stopped")
    return exit_code


def _restore(handlers: dict) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
