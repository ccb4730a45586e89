"""One table of settings for serve, broker and worker (runtime/settings.py): the flags, TOML keys
and environment variables of every command come from it, the docs are generated from it, and a
real `serve` keeps torch out of its broker process and shares the CPU among its workers."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import psutil
import pytest

from broker import serve
from runtime import settings as T
from runtime.settings import ConfigError
from tests.serve.conftest import ROOT, cli, free_port, stop_processes, wait_for


def _args(argv, command):
    parser = argparse.ArgumentParser()
    T.add_arguments(parser, command)
    return parser.parse_args(argv)


def _run_cli(argv, environ):
    return subprocess.run([sys.executable, "-m", "broker.cli", *argv], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, env={**os.environ, **environ})


def _help_flags(command: str) -> set[str]:
    """The options `sdxl-broker COMMAND --help` lists (the lines that start an option)."""
    done = _run_cli([command, "--help"], {"COLUMNS": "400"})
    assert done.returncode == 0, done.stderr
    flags = set()
    for line in done.stdout.splitlines():
        if re.match(r"^  -", line):   # "  --flag METAVAR   help" or "  --x, --no-x   help"
            flags.update(re.findall(r"(?:^|, )(-[-\w]+)", line.split("  ")[1]))
    return flags - {"-h", "--help", "--config"}


@pytest.mark.parametrize("command", T.COMMANDS)
def test_each_command_has_exactly_its_rows_of_the_table(command):
    expected = {s.flag for s in T.for_command(command)}
    expected |= {"--no-" + s.flag[2:] for s in T.for_command(command) if s.type is T.boolean}
    assert _help_flags(command) == expected


def test_serve_and_broker_share_names_and_defaults():
    serve_rows = {s.name: s for s in T.for_command("serve")}
    broker_rows = {s.name: s for s in T.for_command("broker")}
    assert set(broker_rows) <= set(serve_rows)   # serve is the broker plus its workers
    for name in ("default_model_base", "heartbeat_liveness", "reply_ttl_s", "drain_timeout_s"):
        assert name in serve_rows and name in broker_rows
    s = T.resolve(_args(["--default-model-base", "tiny-sdxl", "--reply-ttl-s", "60"], "serve"),
                  "serve", {"SDXL_BROKER_HEARTBEAT_LIVENESS": "5"})
    assert (s["default_model_base"], s["reply_ttl_s"], s["heartbeat_liveness"]) == ("tiny-sdxl", 60.0, 5)
    # serve's old spelling still works: argparse takes it as the unambiguous prefix
    assert T.resolve(_args(["--default-model", "x"], "serve"), "serve", {})["default_model_base"] == "x"


def test_one_file_configures_every_command(tmp_path):
    cfg = tmp_path / "all.toml"
    cfg.write_text('models-dir = "/m"\nmax_queue = 9\nheartbeat_liveness = 4\n'
                   '[broker]\nmax_queue = 5\n[worker]\ncpu-threads-per-worker = 1\n')
    serve_s = T.resolve(_args(["--config", str(cfg)], "serve"), "serve", {})
    broker_s = T.resolve(_args(["--config", str(cfg)], "broker"), "broker", {})
    worker_s = T.resolve(_args([], "worker"), "worker", {"SDXL_BROKER_CONFIG": str(cfg)})
    assert (serve_s["models_dir"], serve_s["max_queue"], serve_s["cpu_threads_per_worker"]) == ("/m", 9, None)
    assert (broker_s["max_queue"], broker_s["heartbeat_liveness"]) == (5, 4)   # [broker] wins
    assert "models_dir" not in broker_s                                         # not a broker setting
    assert (worker_s["models_dir"], worker_s["cpu_threads_per_worker"], worker_s["heartbeat_liveness"]) == ("/m", 1, 4)

    cfg.write_text("[worker]\nmax_queue = 3\n")
    with pytest.raises(ConfigError, match=r"\[worker\] has no setting 'max_queue'"):
        T.resolve(_args(["--config", str(cfg)], "worker"), "worker", {})
    cfg.write_text("[serve]\nmax_queu = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'max_queu'"):
        T.resolve(_args(["--config", str(cfg)], "broker"), "broker", {})
    with pytest.raises(ConfigError, match="routing: 'fastest' is not one of"):
        T.resolve(_args([], "broker"), "broker", {"SDXL_BROKER_ROUTING": "fastest"})


@pytest.mark.parametrize("command", T.COMMANDS)
def test_a_bad_value_is_a_usage_error_naming_the_setting(command):
    extra = ["--connect", "tcp://127.0.0.1:1"] if command == "worker" else []
    done = _run_cli([command, *extra], {"SDXL_BROKER_HEARTBEAT_LIVENESS": "many"})
    assert done.returncode == 2, done.stderr
    assert f"sdxl-broker {command}: setting heartbeat_liveness" in done.stderr
    assert "ready" not in done.stdout


def test_a_worker_without_an_endpoint_says_so():
    done = _run_cli(["worker"], {})
    assert done.returncode == 2 and "--connect" in done.stderr


def test_docs_and_readme_are_generated_from_the_table():
    with open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8") as fh:
        assert fh.read() == T.config_doc(), "run `python -m runtime.settings`"
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    assert T.readme_table() in readme, "run `python -m runtime.settings`"
    for s in T.SETTINGS:
        assert f"`{s.name}` / `{s.env}`" in T.config_doc()


def test_worker_argv_round_trips_through_the_worker_flags():
    settings = T.resolve(_args(["--cpu-workers", "2", "--devices", "cpu", "--log-format", "json",
                                "--heartbeat-liveness", "7", "--no-allow-pickle"], "serve"), "serve", {})
    plan = serve.plan_workers(settings, cpus=[0, 1], total_memory_mb=4000.0)[1]
    argv = serve.worker_argv(plan, "tcp://127.0.0.1:7000", settings)
    worker_args = _args(argv[argv.index("worker") + 1:], "worker")
    w = T.resolve(worker_args, "worker", {})
    assert (w["connect"], w["worker_id"], w["device"]) == ("tcp://127.0.0.1:7000", "cpu-1", "cpu")
    assert (w["cpu_threads_per_worker"], w["cache_budget_mb"]) == (1, 1000.0)
    assert (w["log_format"], w["heartbeat_liveness"], w["allow_pickle"], w["sim"]) == ("json", 7, False, False)


def test_cpu_threads_are_shared_and_pinned_only_when_they_fit():
    def plan(argv, cpus):
        s = T.resolve(_args(argv + ["--devices", "cpu"], "serve"), "serve", {})
        return [(p.worker_id, p.cpu_threads, p.cpu_affinity)
                for p in serve.plan_workers(s, cpus=cpus, total_memory_mb=8000.0)]

    assert plan(["--cpu-workers", "2"], [0, 1, 2, 3]) == [("cpu-0", 2, (0, 1)), ("cpu-1", 2, (2, 3))]
    assert plan(["--cpu-workers", "2", "--cpu-threads-per-worker", "3"], [0, 1, 2, 3]) == [
        ("cpu-0", 3, None), ("cpu-1", 3, None)]
    assert plan(["--cpu-workers", "3"], [5]) == [("cpu-0", 1, None), ("cpu-1", 1, None), ("cpu-2", 1, None)]
    # simulated workers run no torch: they neither take a share nor get pinned
    assert plan(["--cpu-workers", "1", "--sim-workers", "2"], [0, 1]) == [
        ("cpu-0", 2, (0, 1)), ("sim-0", None, None), ("sim-1", None, None)]
    with pytest.raises(ConfigError, match="cpu_threads_per_worker"):
        plan(["--cpu-threads-per-worker", "0"], [0, 1])
    env = serve.worker_env(serve.WorkerPlan("cpu-0", "cpu", cpu_threads=2),
                           {"PATH": "/bin", "SDXL_BROKER_MAX_QUEUE": "3", "OMP_NUM_THREADS": "8"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    assert serve.worker_env(serve.WorkerPlan("cpu-0", "cpu", cpu_threads=2),
                            {"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"   # the user's wins


def test_a_lone_worker_sets_its_thread_variables_before_torch_loads():
    from gpu_worker.main import apply_cpu_threads, cpu_affinity

    env = {"OMP_NUM_THREADS": "3"}
    assert apply_cpu_threads(None, env) == 3 and env["MKL_NUM_THREADS"] == "3"   # kept (serve's)
    assert apply_cpu_threads(2, env) == 2 and env == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                                                      "OMP_WAIT_POLICY": "PASSIVE"}
    env = {}
    assert apply_cpu_threads(None, env) == len(cpu_affinity() or []) == int(env["OMP_NUM_THREADS"])
    with pytest.raises(ConfigError):
        apply_cpu_threads(0, {})


def test_the_cli_imports_only_the_command_it_runs():
    probe = ("import sys\nfrom broker import cli\n"
             "parser = cli.build_parser(sys.argv[1:])\nparser.parse_args(sys.argv[1:])\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('torch', 'diffusers', 'gpu_worker', 'clients', 'protocol', 'broker', 'runtime')))\n")
    def modules(*argv):
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)
        assert done.returncode == 0, done.stderr
        return set(eval(done.stdout))   # a printed list of module names

    assert modules() == {"broker", "broker.cli"}
    loaded = modules("broker", "--max-queue", "5")
    assert "broker.service" in loaded and not any(m.split(".")[0] in ("torch", "diffusers", "gpu_worker")
                                                   for m in loaded)
    assert "gpu_worker.main" in modules("worker", "--connect", "tcp://127.0.0.1:1")
    assert not any(m.startswith("gpu_worker") for m in modules("status"))


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as fh:
        return fh.read()


def _status(frontend: str) -> dict:
    from clients.client import BrokerClient

    with BrokerClient(frontend, timeout_s=5.0, retries=1) as client:
        return client.status()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/maps and affinity")
def test_real_serve_keeps_torch_out_of_the_broker_and_shares_the_cpus(start_serve, tmp_path):
    cpus = serve.available_cpus()
    sp = start_serve(["--frontend", f"ipc://{tmp_path}/fe.sock", "--backend", f"ipc://{tmp_path}/be.sock",
                      "--devices", "auto", "--cpu-workers", "2", "--models-dir", str(tmp_path),
                      "--output-dir", str(tmp_path / "out")], ready_timeout_s=240.0)
    rows = {w["worker_id"]: w for w in _status(sp.endpoint)["workers"]}
    assert sorted(rows) == ["cpu-0", "cpu-1"]
    # a loaded torch maps its shared libraries: the workers have them, the broker process not
    for row in rows.values():
        assert "libtorch" in _maps(row["pid"])
    broker_maps = _maps(sp.proc.pid)
    assert "libtorch" not in broker_maps and "torch/_C" not in broker_maps
    log = "".join(sp.stderr_lines)
    assert "finding devices (child process" in log

    share = max(1, len(cpus) // 2)
    pinned = [tuple(cpus[:share]), tuple(cpus[share:2 * share])] if 2 * share <= len(cpus) else None
    for index, worker_id in enumerate(("cpu-0", "cpu-1")):
        row = rows[worker_id]
        process = psutil.Process(row["pid"])
        assert row["cpu_threads"] == share   # torch.get_num_threads() in a fresh thread of the worker
        assert process.environ()["OMP_NUM_THREADS"] == str(share)
        assert process.environ()["MKL_NUM_THREADS"] == str(share)
        assert process.environ()["OMP_WAIT_POLICY"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
        assert not any(k.startswith("SDXL_BROKER_") for k in process.environ())
        assert sorted(process.cpu_affinity()) == sorted(row["cpu_affinity"])
        if pinned:
            assert tuple(row["cpu_affinity"]) == pinned[index]
        assert f"worker {worker_id}: {share} CPU thread(s)" in log
    assert sp.stop() == 0


@pytest.mark.slow
def test_a_worker_alone_takes_the_thread_setting_from_a_shared_file(tmp_path):
    cfg = tmp_path / "sdxl.toml"
    cfg.write_text("heartbeat_interval_s = 0.5\n[worker]\ncpu_threads_per_worker = 1\nsim = true\n")
    frontend, backend = f"ipc://{tmp_path}/fe.sock", f"ipc://{tmp_path}/be.sock"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SDXL_BROKER_CONFIG": str(cfg)}
    procs = []
    try:
        broker = subprocess.Popen([sys.executable, "-m", "broker.cli", "broker", "--frontend", frontend,
                                   "--backend", backend, "--metrics-port", str(free_port())],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        procs.append(broker)
        assert broker.stdout.readline().startswith("ready ")
        worker = subprocess.Popen([sys.executable, "-m", "broker.cli", "worker", "--connect", backend,
                                   "--worker-id", "alone"], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(worker)
        assert wait_for(lambda: any(w["worker_id"] == "alone" for w in _status(frontend)["workers"]), 30)
        row = next(w for w in _status(frontend)["workers"] if w["worker_id"] == "alone")
        assert row["cpu_threads"] == 1 and row["simulated"] is True
    finally:
        stop_processes(procs)
    assert broker.returncode == 0
