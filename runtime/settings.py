"""The one table of settings of `serve`, `broker` and `worker`.

Each setting has one name, used three ways: the flag `--cpu-workers`, the TOML key
`cpu_workers` (or `cpu-workers`) in the `--config FILE`, and the environment variable
`SDXL_BROKER_CPU_WORKERS`. A value comes from, in falling precedence: the flag, the environment,
the file, the table's default. A command takes the settings whose `commands` name it, so a
setting shared by two commands has the same name, type and default in both.

The file may hold keys of every command: top-level keys apply to each command that has that
setting (others ignore them), keys under `[serve]`, `[broker]` or `[worker]` only to that command
and win over top-level ones. A key no command knows is an error, never silently ignored.

docs/configuration.md and the settings table in README.md are generated from this table
(`python -m runtime.settings` rewrites them; tests/serve/test_settings_table.py checks them).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any, Callable

ENV_PREFIX = "SDXL_BROKER_"
COMMANDS = ("serve", "broker", "worker")
S, B, W = "serve", "broker", "worker"


class ConfigError(ValueError):
    """A setting that cannot be used: unknown key, unreadable file, bad value."""


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def upper(value: Any) -> str:
    return str(value).strip().upper()


@dataclass(frozen=True)
class Setting:
    name: str                          # argparse dest, TOML key, env suffix (upper-cased)
    type: Callable[[Any], Any]
    default: Any
    help: str
    commands: tuple[str, ...]
    choices: tuple[str, ...] | None = None
    default_text: str | None = None    # for help and docs when the default is computed
    metavar: str | None = None
    readme: bool = False               # listed in the README's short table

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def describe_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if self.default is None:
            return "none"
        if self.type is boolean:
            return "on" if self.default else "off"
        return str(self.default)

    def convert(self, value: Any) -> Any:
        value = self.type(value)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(self.choices)}")
        return value


SETTINGS: tuple[Setting, ...] = (
    # --- where things listen and connect ---
    Setting("frontend", str, "tcp://127.0.0.1:5555", "client endpoint (ROUTER) to bind", (S, B),
            metavar="EP", readme=True),
    Setting("backend", str, "tcp://127.0.0.1:5556",
            "worker endpoint (ROUTER) to bind; workers on other hosts connect here", (S, B),
            metavar="EP", readme=True),
    Setting("local_frontend", str, None,
            "a second client endpoint without CURVE, loopback only (ipc://, inproc:// or "
            "tcp://127.0.0.1:PORT)", (S, B), metavar="EP", readme=True),
    Setting("connect", str, None, "the broker's backend endpoint, e.g. tcp://127.0.0.1:5556 "
            "(required)", (W,), metavar="EP"),
    # --- which workers ---
    Setting("devices", str, "auto",
            "auto | cpu | none | a comma list such as cuda:0,cuda:1 or directml:0 or mps; one "
            "worker per device (auto: every accelerator found, else cpu; found by a short-lived "
            "child process, so the broker process never imports torch)", (S,), readme=True),
    Setting("cpu_workers", int, None,
            "number of cpu workers, each with its own memory budget and CPU threads", (S,),
            default_text="1 when the devices are cpu, else 0", metavar="N", readme=True),
    Setting("sim_workers", int, 0,
            "add N simulated workers (no diffusers; for tests and benchmarks). Given alone "
            "(without --devices/--cpu-workers) only simulated workers run", (S,), metavar="N",
            readme=True),
    Setting("device", str, "cpu", "the device this worker runs on (cpu, cuda:0, directml:0, mps)",
            (W,)),
    Setting("worker_id", str, None, "stable worker id", (W,), default_text="host-device-pid",
            metavar="ID"),
    Setting("supervisor_pid", int, None,
            "exit when the process with this pid stops being this worker's parent (serve passes "
            "its own pid; a worker started alone keeps running when its parent goes). On Linux "
            "the worker also gets SIGTERM when the thread that started it ends: start it from a "
            "thread that lives as long as the supervisor", (W,),
            default_text="none", metavar="PID"),
    Setting("cpu_threads_per_worker", int, None,
            "CPU threads of each worker's torch/OpenMP/MKL; serve also pins each worker to its "
            "own cores where the OS allows", (S, W),
            default_text="cores / real workers on this host (a lone worker: its cores), at least 1",
            metavar="N", readme=True),
    # --- the worker's files and memory ---
    Setting("models_dir", str, "models", "where the workers look for models", (S, W),
            metavar="DIR", readme=True),
    Setting("output_dir", str, "outputs", "root under which images are saved", (S, W),
            metavar="DIR", readme=True),
    Setting("input_dir", str, "inputs", "root for image paths named in requests", (S, W),
            metavar="DIR", readme=True),
    Setting("cache_budget_mb", float, None, "model cache budget per worker", (S, W),
            default_text="cpu: half the RAM / cpu workers; accelerators: the executor decides",
            metavar="MB", readme=True),
    Setting("allow_pickle", boolean, False, "allow pickle checkpoints (.ckpt/.bin/.pt): unsafe",
            (S, B, W), readme=True),
    Setting("upscaler", str, None,
            "the model upscaler upscale_method 'realesrgan' means: a file stem under "
            "MODELS_DIR/upscalers/ (or ESRGAN/, upscale_models/) or a path inside the model root",
            (S, W), default_text="the only upscaler there is", metavar="NAME", readme=True),
    Setting("literal_prompts", boolean, False,
            "send every prompt to the text encoders as typed: no A1111 (word:1.2) weighting, no "
            "lora:NAME:W prompt tags, no long-prompt chunking (a request can ask the same with "
            "literal_prompt)", (S, W), readme=True),
    Setting("preview_every_steps", int, 1,
            "progress previews at most every N steps (a request's preview_every_steps wins)",
            (S, W), metavar="N"),
    Setting("preview_interval_ms", int, 250,
            "progress previews at least this many ms apart (a request's preview_interval_ms "
            "wins)", (S, W), metavar="MS"),
    Setting("single_file_config", str, None,
            "a diffusers folder (inside the model root) whose configs serve every single-file "
            "SDXL checkpoint of its architecture", (S, W), metavar="DIR", readme=True),
    Setting("max_batch", int, None,
            "dynamic batching: images one pipeline call may run for compatible queued jobs (same "
            "models, LoRAs, size, steps, scheduler, guidance, ControlNets; any prompts and seeds), "
            "counting each job's batch_size; 1 turns batching off", (S, W), metavar="N",
            default_text="4; 1 on a real CPU worker (batching measured no faster there: "
                         "docs/benchmarks.md)", readme=True),
    Setting("batch_window_ms", float, 0.0,
            "dynamic batching: how long a job about to run waits for compatible companions (0: "
            "only what is already queued on the worker, so a lone job never waits)", (S, W),
            metavar="MS"),
    # --- the broker ---
    Setting("state_dir", str, None, "directory of the job journal (jobs survive a restart)",
            (S, B), default_text="none (in memory)", metavar="DIR", readme=True),
    Setting("journal_reserve_mb", float, 16.0,
            "disk space kept beside the journal (a file) and released when the disk fills, so "
            "the replies of running jobs are still stored; new jobs are refused `unavailable` "
            "until it can be set aside again", (S, B), metavar="MB"),
    Setting("max_queue", int, 1000, "queued jobs beyond this get queue_full", (S, B), metavar="N",
            readme=True),
    Setting("max_queue_mb", float, 2048.0,
            "request bytes (images included) that queued jobs may hold; a job beyond it gets "
            "queue_full naming the limit", (S, B), metavar="MB", readme=True),
    Setting("max_timeout_s", float, 3600.0,
            "upper bound of a job's timeout: a request asking for more is run with this one and "
            "warned", (S, B), metavar="SECONDS", readme=True),
    Setting("max_attempts", int, 2, "runs of a job whose worker died before worker_lost", (S, B),
            metavar="N", readme=True),
    Setting("stuck_job_s", float, 300.0,
            "a worker holding jobs without progress this long (no step, no model load begun, no "
            "answer) has them aborted there and re-run elsewhere within --max-attempts, and gets "
            "only probe jobs until it finishes one; above the longest model load or step of a "
            "healthy worker; 0: off", (S, B), metavar="SECONDS", readme=True),
    Setting("no_worker_grace_s", float, 60.0,
            "with no worker registered, a job waits this long for one, then unsupported_feature "
            "(with workers registered, a job none can run is refused at once)", (S, B),
            metavar="SECONDS"),
    Setting("routing", str, "smart", "routing policy", (S, B),
            choices=("smart", "round-robin", "least-loaded", "tiered"), readme=True),
    Setting("heartbeat_interval_s", float, 1.0, "seconds between heartbeats, both directions",
            (S, B, W), metavar="SECONDS", readme=True),
    Setting("heartbeat_liveness", int, 3,
            "missed heartbeats before a worker is lost (broker) or reconnects (worker)",
            (S, B, W), metavar="N", readme=True),
    Setting("max_message_mb", int, 64, "largest accepted message; larger ones are dropped",
            (S, B), metavar="MB", readme=True),
    Setting("decode_processes", int, 1,
            "processes that decode, validate and fingerprint client bodies over 64 KB off the "
            "broker loop, plus one for bodies up to 4 MB (0: on the loop, which then stalls for "
            "seconds on a 60 MB body)",
            (S, B), metavar="N"),
    Setting("decode_backlog_mb", int, 512,
            "undecoded large bodies held for the decode processes; beyond it a large body is "
            "refused with queue_full", (S, B), metavar="MB"),
    Setting("default_model_base", str, None, "model_base used when a request names none",
            (S, B), metavar="NAME", readme=True),
    Setting("reply_ttl_s", float, 3600.0, "how long finished replies are kept for resends",
            (S, B), metavar="SECONDS", readme=True),
    Setting("drain_timeout_s", float, 30.0,
            "on SIGINT/SIGTERM, wait this long for running jobs", (S, B), metavar="SECONDS",
            readme=True),
    # --- CURVE ---
    Setting("curve_secret_key", str, None,
            "the broker's CURVE .key_secret file (from `sdxl-broker keys`): CURVE on the "
            "frontend and backend", (S, B), metavar="FILE", readme=True),
    Setting("curve_allowed_keys", str, None,
            "directory of public .key files of the clients allowed to connect to the frontend "
            "(workers need --curve-worker-keys)", (S, B), metavar="DIR", readme=True),
    Setting("curve_worker_keys", str, None,
            "directory of public .key files of the workers allowed to connect to the backend "
            "(serve's own workers get a key of their own)", (S, B), metavar="DIR", readme=True),
    Setting("curve_admin_keys", str, None,
            "directory of public .key files of the clients that may manage workers (cleanup, "
            "model loads) and cancel any job; they may also connect as clients", (S, B),
            metavar="DIR", readme=True),
    Setting("allow_remote_management", boolean, False,
            "without CURVE, treat clients on other machines like those on the broker's "
            "machine: they may run cleanup and model loads (a trusted network); under CURVE "
            "only --curve-admin-keys may", (S, B)),
    Setting("allow_local_cancel", boolean, False,
            "without CURVE, let any client on the broker's machine (any client at all with "
            "--allow-remote-management) cancel any job, not only the connection that submitted "
            "it; under CURVE only the submitter's key and --curve-admin-keys may", (S, B)),
    Setting("curve_server_key", str, None,
            "the broker's public CURVE .key file: talk CURVE to the backend", (W,), metavar="FILE"),
    Setting("curve_client_key", str, None,
            "this worker's CURVE .key_secret file (its public .key must be in the broker's "
            "--curve-worker-keys)", (W,), metavar="FILE"),
    # --- metrics and logs ---
    Setting("metrics_port", int, None, "serve Prometheus metrics on this port (/metrics)", (S, B),
            default_text="off", metavar="PORT", readme=True),
    Setting("metrics_addr", str, "127.0.0.1", "address the metrics server listens on", (S, B),
            metavar="ADDR"),
    Setting("log_level", upper, "INFO", "logging level", (S, B, W),
            choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    Setting("log_format", str, "text", "text, or json: one JSON object per line", (S, B, W),
            choices=("text", "json"), readme=True),
    # --- serve's HTTP/WebSocket gateway (gateway/) ---
    Setting("http", str, None, "also run the HTTP/WebSocket gateway (A1111 API, /v1, dashboard) "
            "at HOST:PORT, a ZeroMQ client of this broker", (S,), default_text="off",
            metavar="HOST:PORT", readme=True),
    Setting("http_token", str, None, "gateway: require Authorization: Bearer TOKEN (needed to "
            "bind --http to a non-loopback address)", (S,), metavar="TOKEN"),
    Setting("http_insecure", boolean, False, "gateway: allow a non-loopback --http without a token",
            (S,)),
    Setting("http_cors_origin", str, None, "gateway: comma list of origins CORS allows", (S,),
            default_text="CORS off", metavar="ORIGINS"),
    Setting("http_max_body_mb", float, 64.0, "gateway: largest request body accepted", (S,),
            metavar="MB"),
    # --- serve's supervision ---
    Setting("ready_timeout_s", float, 300.0, "give up if the workers are not registered by then",
            (S,), metavar="SECONDS"),
    Setting("max_restarts", int, 5, "crashes of one worker (within 2 minutes) before giving up",
            (S,), metavar="N"),
    # --- simulated workers ---
    Setting("sim", boolean, False, "run a SIMULATED executor (no diffusers) for tests and benchmarks",
            (W,)),
    Setting("sim_load_s", float, 0.5,
            "simulated load time of a model of --sim-model-mb; scales with size", (S, W),
            metavar="SECONDS"),
    Setting("sim_step_s", float, 0.02,
            "simulated time per step; at 1024x1024 with --sim-cost-model scaled", (S, W),
            metavar="SECONDS"),
    Setting("sim_memory_mb", float, 8000.0, "simulated device memory budget", (S, W), metavar="MB"),
    Setting("sim_model_mb", float, 2000.0,
            "simulated size of every model not in --sim-model-sizes", (S, W), metavar="MB"),
    Setting("sim_model_sizes", str, None,
            "simulated sizes of named models, e.g. tiny-sdxl-refiner=3000", (S, W),
            metavar="NAME=MB,..."),
    Setting("sim_cost_model", str, "flat",
            "flat: every step takes --sim-step-s; scaled: steps scale with pixels and activations "
            "count against the memory budget (out_of_memory when models + activations exceed it)",
            (S, W), choices=("flat", "scaled")),
    Setting("sim_stall_after_jobs", int, None,
            "SIMULATED fault: after this many jobs the simulated worker stalls forever in its next "
            "job (no progress, ignores abort) while it keeps heart-beating", (S, W),
            default_text="never", metavar="N"),
    Setting("sim_batch_cost", float, 0.5,
            "dynamic batching: each job after the first of a simulated batched call adds this "
            "share of a lone job's step time", (S, W), metavar="SHARE"),
    Setting("sim_capabilities", str, None,
            "comma list of features the simulated worker offers", (S, W), default_text="all",
            metavar="LIST"),
)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def for_command(command: str) -> tuple[Setting, ...]:
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    return tuple(s for s in SETTINGS if command in s.commands)


# --- flags ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Every setting of `command` as a flag. Flags default to None, so resolve() can tell a
    flag given from one left out."""
    parser.epilog = (f"Every flag can also be set in the --config TOML file (same name, dashes or "
                     f"underscores; top level or under [{command}]) or as {ENV_PREFIX}<NAME> (e.g. "
                     f"{ENV_PREFIX}LOG_LEVEL=DEBUG); flags win over the environment, which wins "
                     "over the file. All settings: docs/configuration.md.")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help=f"TOML settings file (also {ENV_PREFIX}CONFIG)")
    for s in for_command(command):
        text = f"{s.help} (default: {s.describe_default()})"
        if s.type is boolean:
            parser.add_argument(s.flag, dest=s.name, action=argparse.BooleanOptionalAction,
                                default=None, help=text)
        else:
            parser.add_argument(s.flag, dest=s.name, default=None, type=s.type, choices=s.choices,
                                metavar=s.metavar, help=text)


# --- the file ---------------------------------------------------------------------------------------
def _read_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def file_values(path: str, command: str) -> dict[str, Any]:
    """The file's values that apply to `command` (raw, not converted yet)."""
    data = _read_toml(path)
    mine = {s.name for s in for_command(command)}
    top: dict[str, Any] = {}
    own: dict[str, Any] = {}
    for key, value in data.items():
        if key in COMMANDS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                name = sub_key.replace("-", "_")
                if name not in BY_NAME:
                    raise ConfigError(f"{path}: unknown setting {sub_key!r} in [{key}]")
                if key not in BY_NAME[name].commands:
                    raise ConfigError(f"{path}: [{key}] has no setting {sub_key!r}")
                if key == command:
                    own[name] = sub_value
            continue
        name = key.replace("-", "_")
        if name not in BY_NAME:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        if name in mine:
            top[name] = value
    return {**top, **own}


# --- resolution -------------------------------------------------------------------------------------
def resolve(args: argparse.Namespace, command: str,
            environ: dict[str, str] | None = None) -> dict[str, Any]:
    """flags > SDXL_BROKER_* environment > TOML file > defaults, for `command`'s settings.
    Also records which settings were given explicitly (key "_explicit")."""
    environ = os.environ if environ is None else environ
    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    from_file = file_values(config_path, command) if config_path else {}
    out: dict[str, Any] = {}
    explicit: set[str] = set()
    for s in for_command(command):
        flag_value = getattr(args, s.name, None)
        env_value = environ.get(s.env)
        try:
            if flag_value is not None:
                value = s.convert(flag_value)
            elif env_value is not None:
                value = s.convert(env_value)
            elif s.name in from_file:
                value = s.convert(from_file[s.name])
            else:
                out[s.name] = s.default
                continue
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"setting {s.name}: {exc}") from None
        explicit.add(s.name)
        out[s.name] = value
    out["_explicit"] = explicit
    return out


def as_argv(values: dict[str, Any], command: str) -> list[str]:
    """Flags that give `command` these values (for starting a child process); None is left out."""
    argv: list[str] = []
    for s in for_command(command):
        if s.name not in values or values[s.name] is None:
            continue
        value = values[s.name]
        if s.type is boolean:
            argv.append(s.flag if value else "--no-" + s.flag[2:])
        else:
            argv += [s.flag, str(value)]
    return argv


# --- docs -------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(settings: tuple[Setting, ...] | None = None, with_commands: bool = True) -> str:
    rows = settings if settings is not None else SETTINGS
    head = "| flag | TOML key / environment | default | commands | what it does |\n"
    head += "| --- | --- | --- | --- | --- |\n"
    if not with_commands:
        head = "| flag | default | what it does |\n| --- | --- | --- |\n"
    lines = []
    for s in rows:
        flag = f"`{s.flag}{' ' + s.metavar if s.metavar else ''}`"
        what = s.help + (f" ({' / '.join(s.choices)})" if s.choices else "")
        default = f"`{s.describe_default()}`" if s.default_text is None else s.describe_default()
        if with_commands:
            lines.append(f"| {flag} | `{s.name}` / `{s.env}` | {_cell(default)} | "
                         f"{', '.join(c for c in COMMANDS if c in s.commands)} | {_cell(what)} |")
        else:
            lines.append(f"| {flag} | {_cell(default)} | {_cell(what)} |")
    return head + "\n".join(lines) + "\n"


CONFIG_DOC_HEADER = """# Configuration

<!-- generated by `python -m runtime.settings` from runtime/settings.py: do not edit by hand -->

`sdxl-broker serve`, `sdxl-broker broker` and `sdxl-broker worker` share one table of settings
(runtime/settings.py). Each setting has one name everywhere: the flag (`--max-queue`), the key
in a TOML file given with `--config FILE` (`max_queue` or `max-queue`) and the environment
variable (`SDXL_BROKER_MAX_QUEUE`). A value comes from the flag, else the environment, else the
file, else the default below. `SDXL_BROKER_CONFIG` names the file when `--config` is not given.
Boolean flags have a `--no-` form; in the environment and the file `1/true/yes/on` and
`0/false/no/off` are accepted.

One file can configure every command: top-level keys apply to each command that has the setting
(the others ignore them); keys under `[serve]`, `[broker]` or `[worker]` apply to that command
only and win over the top level. A key no command knows is an error.

```toml
models_dir = "/srv/models"
log_format = "json"

[serve]
cpu_workers = 2

[broker]
frontend = "tcp://0.0.0.0:5555"
```

`serve` starts its workers with every worker setting it resolved given as a flag, and
without the `SDXL_BROKER_*` variables, so a worker of `serve` runs with exactly serve's
settings.

"""


def config_doc() -> str:
    return CONFIG_DOC_HEADER + markdown_table() + "\n" + THREADS_DOC


THREADS_DOC = """## CPU threads per worker

Each worker's torch, OpenMP and MKL use `--cpu-threads-per-worker` threads. `serve` defaults it
to the host's cores (those this process may run on) divided by the number of real (not
simulated) workers it starts, at least 1; it sets `OMP_NUM_THREADS` and `MKL_NUM_THREADS` in
each worker's environment (and `OMP_WAIT_POLICY=PASSIVE` unless set: idle OpenMP threads sleep
instead of spinning, which on a busy host was 13x faster with 2 threads), passes the flag (the worker calls `torch.set_num_threads`), and when
the workers' threads fit the cores it pins each worker to its own cores (Linux and Windows; not
macOS). A `worker` started alone defaults to all the cores it may run on. Each worker logs its
threads and affinity at start and reports them in its telemetry (`cpu_threads`, as torch
reports it in a fresh thread like the one that runs jobs, and `cpu_affinity`, in the status rows).
"""

README_BEGIN = "<!-- settings table: generated by `python -m runtime.settings` -->"
README_END = "<!-- end of settings table -->"


def readme_table() -> str:
    rows = tuple(s for s in SETTINGS if s.readme)
    return README_BEGIN + "\n" + markdown_table(rows, with_commands=False) + README_END


def render_readme(text: str) -> str:
    """README.md with its settings table (between the markers) regenerated."""
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    return text[:start] + readme_table() + text[end:]


def main() -> int:
    """Rewrite docs/configuration.md and README.md's table from SETTINGS."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "configuration.md"), "w", encoding="utf-8") as out:
        out.write(config_doc())
    readme = os.path.join(root, "README.md")
    with open(readme, encoding="utf-8") as fh:
        text = fh.read()
    with open(readme, "w", encoding="utf-8") as out:
        out.write(render_readme(text))
    print("wrote docs/configuration.md and README.md's settings table")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
