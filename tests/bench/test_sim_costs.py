"""The SIMULATED executor's benchmark cost model (`--sim-cost-model scaled`, issue 8): loads by
size, steps by pixels, activations in the memory budget, and the counters bench reads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from protocol.errors import JobError
from protocol.job import Job, ModelSpec

from gpu_worker.main import parse_model_sizes
from gpu_worker.sim_executor import SimulatedExecutor


def job(base="a", size=512, steps=2) -> Job:
    return Job(request_id=f"r-{base}-{size}", prompt="p", models=ModelSpec(base=base),
               width=size, height=size, steps=steps)


def run(ex, j):
    return ex.run(j, lambda *a: None, lambda: False)


def test_activations_count_against_the_budget_and_out_of_memory_is_counted():
    # 2000 MB model + 2147 MB of activations (2048 MB per 1e6 pixels) at 1024x1024 > 3000 MB
    scaled = SimulatedExecutor(load_s=0.0, step_s=0.0, memory_mb=3000, model_mb=2000,
                               cost_model="scaled")
    with pytest.raises(JobError) as err:
        run(scaled, job(size=1024))
    assert err.value.code == "out_of_memory" and "4147 MB" in err.value.message
    assert scaled.counters()["oom_events"] == 1 and scaled.telemetry()["oom_events"] == 1
    run(scaled, job(size=512))                 # 2000 + 512 fits
    flat = SimulatedExecutor(load_s=0.0, step_s=0.0, memory_mb=3000, model_mb=2000)
    run(flat, job(size=1024))                  # the stock model ignores activations
    assert flat.counters()["oom_events"] == 0


def test_activations_are_kept_free_when_loading_so_the_lru_model_is_evicted():
    ex = SimulatedExecutor(load_s=0.0, step_s=0.0, memory_mb=5000, model_mb=2000,
                           cost_model="scaled")
    run(ex, job("a", 512))
    run(ex, job("b", 1024))                    # 2000 + 2000 + 2147 > 5000: a goes
    assert [m["name"] for m in ex.telemetry()["models_loaded"]] == ["b"]
    c = ex.counters()
    assert c["models_loaded_total"] == 2 and c["evictions_total"] == 1 and c["jobs_total"] == 2
    assert c["busy_s"] > 0


def test_load_time_scales_with_size_and_step_time_with_pixels():
    ex = SimulatedExecutor(load_s=0.05, step_s=0.08, memory_mb=100_000, model_mb=1000,
                           model_sizes_mb={"big": 3000}, cost_model="scaled")
    ex.load_model("small")
    ex.load_model("big")
    loads = ex.telemetry()["load_time_s"]
    assert loads["big"] >= 0.15 and loads["small"] < loads["big"] / 2
    run(ex, job("small", 256, steps=3))        # 1/16 of the pixels: 5 ms steps, not 80 ms
    assert ex.telemetry()["step_time_s"]["small@256x256"] < 0.04


def test_model_sizes_flag_parsing():
    assert parse_model_sizes("a=2000, b=3000.5") == {"a": 2000.0, "b": 3000.5}
    assert parse_model_sizes(None) == {}
    for bad in ("a", "a=big", "=3"):
        with pytest.raises(ValueError, match="NAME=MB"):
            parse_model_sizes(bad)
    with pytest.raises(ValueError):
        SimulatedExecutor(cost_model="fancy")


def test_worker_help_lists_the_cost_model_flags():
    out = subprocess.run([sys.executable, "-m", "broker.cli", "worker", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "--sim-cost-model" in out.stdout and "--sim-model-sizes" in out.stdout
