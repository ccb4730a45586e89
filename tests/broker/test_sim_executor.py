"""The SIMULATED executor: LRU cache against its memory budget, abort, capability refusal."""

from __future__ import annotations

import pytest

from protocol.errors import JobError
from protocol.job import Job, ModelSpec

from gpu_worker.sim_executor import SimulatedExecutor


def job(base="a", **kw) -> Job:
    return Job(request_id="r", prompt="p", models=ModelSpec(base=base, **kw.pop("models", {})),
               width=256, height=256, steps=3, **kw)


def loaded(ex: SimulatedExecutor) -> list[str]:
    return [m["name"] for m in ex.telemetry()["models_loaded"]]


def test_lru_eviction_within_budget_and_telemetry():
    ex = SimulatedExecutor(load_s=0.0, step_s=0.0, memory_mb=5000, model_mb=2000)
    assert ex.describe()["simulated"] is True
    stages = []
    data = ex.run(job("a"), lambda s, i, n: stages.append(s), lambda: False)
    assert stages[0] == "loading" and stages.count("denoising") == 3 and stages[-1] == "postprocessing"
    assert data["simulated"] is True and data["generated_images"][0]["width"] == 256
    ex.run(job("b"), lambda *a: None, lambda: False)
    ex.run(job("a"), lambda *a: None, lambda: False)   # a is now most recently used
    ex.run(job("c"), lambda *a: None, lambda: False)   # 3 x 2000 > 5000: evict b (LRU)
    assert loaded(ex) == ["a", "c"]
    t = ex.telemetry()
    assert t["memory"]["used_mb"] == 4000 and t["memory"]["free_mb"] == 1000
    assert "a@256x256" in t["step_time_s"] and "c" in t["load_time_s"]
    assert ex.cleanup(["a"])["unloaded"] == ["a"] and loaded(ex) == ["c"]
    assert ex.load_model("z")["model"] == "z" and loaded(ex) == ["c", "z"]


def test_abort_and_refusals():
    ex = SimulatedExecutor(load_s=0.0, step_s=0.05, memory_mb=3000, model_mb=2000,
                           capabilities=("txt2img",))
    calls = []

    def abort_after_first_step():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(JobError) as err:
        ex.run(job(), lambda *a: None, abort_after_first_step)
    assert err.value.code == "cancelled"
    with pytest.raises(JobError) as err:
        ex.run(job(models={"refiner": "r"}), lambda *a: None, lambda: False)
    assert err.value.code == "unsupported_feature" and "refiner" in err.value.message
    big = SimulatedExecutor(load_s=0.0, step_s=0.0, memory_mb=1000, model_mb=2000)
    with pytest.raises(JobError) as err:
        big.run(job(), lambda *a: None, lambda: False)
    assert err.value.code == "out_of_memory"
