"""serve's settings: flags > SDXL_BROKER_* environment > TOML file > defaults; worker plans."""

import argparse
from dataclasses import dataclass

import pytest

from broker import serve
from runtime import settings as settings_table
from runtime.settings import ConfigError


def _args(argv, command="serve"):
    parser = argparse.ArgumentParser()
    settings_table.add_arguments(parser, command)
    return parser.parse_args(argv)


def _resolve(args, env, command="serve"):
    return settings_table.resolve(args, command, env)


def test_flag_beats_environment_beats_file_beats_default(tmp_path):
    cfg = tmp_path / "serve.toml"
    cfg.write_text('max-queue = 7\nrouting = "tiered"\n[serve]\ncpu_workers = 3\nsim-workers = 1\n')
    env = {"SDXL_BROKER_ROUTING": "least-loaded", "SDXL_BROKER_CPU_WORKERS": "2"}
    s = _resolve(_args(["--config", str(cfg), "--cpu-workers", "4"]), env)
    assert s["cpu_workers"] == 4            # flag
    assert s["routing"] == "least-loaded"   # environment over file
    assert s["max_queue"] == 7              # file
    assert s["sim_workers"] == 1            # file, [serve] table
    assert s["max_attempts"] == 2           # default
    assert s["_explicit"] >= {"cpu_workers", "routing", "max_queue", "sim_workers"}
    assert "max_attempts" not in s["_explicit"]


def test_bad_settings_are_clear_errors(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("max_queu = 7\n")
    with pytest.raises(ConfigError, match="unknown setting 'max_queu'"):
        _resolve(_args(["--config", str(cfg)]), {})
    with pytest.raises(ConfigError, match="cpu_workers"):
        _resolve(_args([]), {"SDXL_BROKER_CPU_WORKERS": "two"})
    cfg.write_text("max_queue = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        _resolve(_args(["--config", str(cfg)]), {})
    with pytest.raises(ConfigError, match="cannot read"):
        _resolve(_args(["--config", str(tmp_path / "missing.toml")]), {})


def test_boolean_environment_values():
    s = _resolve(_args([]), {"SDXL_BROKER_ALLOW_PICKLE": "yes"})
    assert s["allow_pickle"] is True
    assert _resolve(_args([]), {})["allow_pickle"] is False


@dataclass
class _Dev:
    name: str


def _plan(argv, env=None, devices=("cpu",), memory_mb=8000.0):
    settings = _resolve(_args(argv), env or {})
    return serve.plan_workers(settings, discover=lambda: [_Dev(d) for d in devices],
                              total_memory_mb=memory_mb, cpus=[0, 1])


def test_auto_runs_one_worker_per_accelerator():
    plans = _plan([], devices=("cuda:0", "cuda:1", "cpu"))
    assert [(p.worker_id, p.device, p.simulated) for p in plans] == [
        ("cuda:0", "cuda:0", False), ("cuda:1", "cuda:1", False)]


def test_cpu_only_machine_splits_the_memory_budget():
    plans = _plan(["--cpu-workers", "2"], memory_mb=8000.0)
    assert [p.worker_id for p in plans] == ["cpu-0", "cpu-1"]
    assert [p.cache_budget_mb for p in plans] == [2000.0, 2000.0]
    assert [p.cache_budget_mb for p in _plan(["--cpu-workers", "2", "--cache-budget-mb", "900"])] == [900.0, 900.0]
    assert [p.worker_id for p in _plan([])] == ["cpu-0"]


def test_sim_workers_alone_run_only_simulations():
    plans = _plan(["--sim-workers", "2"], devices=("cuda:0",))
    assert [(p.worker_id, p.simulated) for p in plans] == [("sim-0", True), ("sim-1", True)]
    mixed = _plan(["--sim-workers", "1", "--devices", "cpu"])
    assert [(p.worker_id, p.simulated) for p in mixed] == [("cpu-0", False), ("sim-0", True)]


def test_explicit_device_list_and_duplicates():
    assert [p.device for p in _plan(["--devices", "cuda:0,directml:0"])] == ["cuda:0", "directml:0"]
    with pytest.raises(ConfigError, match="twice"):
        _plan(["--devices", "cuda:0,cuda:0"])


def test_worker_command_line_carries_the_settings():
    settings = _resolve(_args(["--sim-workers", "1", "--sim-step-s", "0.2",
                                             "--models-dir", "/m", "--allow-pickle"]), {})
    plan = serve.plan_workers(settings)[0]
    argv = serve.worker_argv(plan, "tcp://127.0.0.1:7000", settings)
    assert argv[argv.index("--connect") + 1] == "tcp://127.0.0.1:7000"
    assert argv[argv.index("--worker-id") + 1] == "sim-0"
    assert argv[argv.index("--models-dir") + 1] == "/m"
    assert argv[argv.index("--sim-step-s") + 1] == "0.2"
    assert "--sim" in argv and "--allow-pickle" in argv
    assert "--sim-load-s" not in argv  # unset: the worker's own default applies


def test_wildcard_endpoints_become_loopback_for_local_workers():
    assert serve.connectable("tcp://*:5556") == "tcp://127.0.0.1:5556"
    assert serve.connectable("tcp://0.0.0.0:5556") == "tcp://127.0.0.1:5556"
    assert serve.connectable("ipc:///tmp/x") == "ipc:///tmp/x"


def test_real_workers_get_the_model_file_settings():
    settings = _resolve(_args(["--devices", "cpu", "--upscaler", "4x-UltraSharp",
                               "--single-file-config", "sdxl-config"]), {})
    argv = serve.worker_argv(serve.plan_workers(settings)[0], "tcp://127.0.0.1:7000", settings)
    assert argv[argv.index("--upscaler") + 1] == "4x-UltraSharp"
    assert argv[argv.index("--single-file-config") + 1] == "sdxl-config"
    worker = _resolve(_args(argv[argv.index("worker") + 1:], "worker"), {}, "worker")
    assert worker["upscaler"] == "4x-UltraSharp" and worker["single_file_config"] == "sdxl-config"


def test_max_batch_defaults_by_device_and_reaches_the_workers_only_when_set():
    from gpu_worker.main import default_max_batch

    worker = lambda argv: _resolve(_args(argv, "worker"), {}, "worker")  # noqa: E731
    assert default_max_batch(worker(["--device", "cpu"])) == 1          # no gain measured on CPU
    assert default_max_batch(worker(["--device", "cuda:0"])) == 4
    assert default_max_batch(worker(["--device", "cpu", "--sim"])) == 4  # simulates an accelerator
    assert default_max_batch(worker(["--device", "cpu", "--max-batch", "8"])) == 8
    plan = serve.WorkerPlan(worker_id="w", device="cpu")
    unset = serve.worker_argv(plan, "ipc://be", _resolve(_args([]), {}))
    assert "--max-batch" not in unset       # the worker decides by its device
    given = serve.worker_argv(plan, "ipc://be", _resolve(_args(["--max-batch", "6"]), {}))
    assert given[given.index("--max-batch") + 1] == "6"
    with pytest.raises(ConfigError, match="max_batch"):
        serve.plan_workers(_resolve(_args(["--max-batch", "0", "--sim-workers", "1"]), {}))
