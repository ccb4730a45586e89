"""Routing policy, without sockets: filters, warm-model preference, round-robin spread."""

from __future__ import annotations

from collections import Counter

from protocol.job import ControlNetSpec, Job, ModelSpec

from broker import routing
from broker.registry import WorkerRecord
from broker.routing import DispatchEstimate
from protocol.worker_protocol import Telemetry


def make_job(rid="r1", base="tiny-sdxl", width=512, height=512, steps=10, **kw) -> Job:
    return Job(request_id=rid, prompt="a cat", models=ModelSpec(base=base, **kw.pop("models", {})),
               width=width, height=height, steps=steps, **kw)


def make_worker(worker_id, *, total_mb=8000.0, used_mb=0.0, loaded=(), step_s=0.1, load_s=3.0,
                capabilities=("txt2img", "img2img", "inpaint", "lora", "controlnet", "refiner",
                              "custom_vae", "textual_inversion", "upscale"),
                worker_types=("sdxl_worker", "enhanced_sdxl_worker"), device="cpu", jobs=None):
    loaded = dict(loaded)
    return WorkerRecord(
        worker_id=worker_id, identity=worker_id.encode(), device=device,
        device_type=device.split(":")[0], memory_total_mb=total_mb,
        capabilities=frozenset(capabilities), worker_types=frozenset(worker_types),
        jobs=dict(jobs or {}),
        telemetry=Telemetry.from_dict({
            "memory": {"total_mb": total_mb, "used_mb": used_mb, "free_mb": total_mb - used_mb},
            "models_loaded": [{"name": n, "size_mb": mb} for n, mb in loaded.items()],
            "step_time_s": {"tiny-sdxl@512x512": step_s},
            "load_time_s": {"tiny-sdxl": load_s},
        }))


def test_warm_worker_chosen_over_cold_ones():
    cold_a, cold_b = make_worker("a"), make_worker("b")
    warm = make_worker("c", loaded={"tiny-sdxl": 2000.0}, used_mb=2000.0)
    rr = routing.RoundRobin()
    for i in range(5):
        assert routing.choose_worker(make_job(f"r{i}"), [cold_a, warm, cold_b], "smart", rr) is warm


def test_busy_warm_worker_loses_to_idle_cold_one_when_load_is_cheaper_than_waiting():
    # warm but two jobs ahead of 100 steps * 0.5 s each; cold one loads in 1 s
    warm = make_worker("warm", loaded={"tiny-sdxl": 2000.0}, step_s=0.5, jobs={"x": 1})
    cold = make_worker("cold", step_s=0.5, load_s=1.0)
    job = make_job(steps=100)
    assert routing.predicted_finish_s(job, warm) == 2 * 0.5 * 100
    assert routing.predicted_finish_s(job, cold) == 0.5 * 100 + 1.0
    assert routing.choose_worker(job, [warm, cold], "smart", routing.RoundRobin()) is cold


def test_memory_that_does_not_fit_is_never_chosen():
    small = make_worker("small", total_mb=4000.0)
    small.telemetry.model_sizes_mb.update({"huge-model": 6000.0})
    full = make_worker("full", total_mb=16000.0, used_mb=15000.0)  # used by something not evictable
    roomy = make_worker("roomy", total_mb=16000.0)
    job = make_job(base="huge-model")
    rr = routing.RoundRobin()
    for policy in routing.POLICIES:
        for _ in range(6):
            assert routing.choose_worker(job, [small, full, roomy], policy, rr) is roomy
    assert routing.choose_worker(job, [small, full], "smart", rr) is None


def test_evictable_models_count_as_free_memory():
    w = make_worker("w", total_mb=8000.0, used_mb=7000.0, loaded={"other": 7000.0})
    assert routing.choose_worker(make_job(), [w], "smart", routing.RoundRobin()) is w


def test_memory_estimate_is_models_plus_pixels():
    job = make_job(width=1024, height=1024, batch_size=2,
                   models={"refiner": "ref"})
    sizes = {"tiny-sdxl": 100.0, "ref": 50.0}
    expected = 150.0 + routing.ACTIVATION_MB_PER_MEGAPIXEL * (1024 * 1024 / 1e6) * 2
    assert routing.estimate_memory_mb(job, sizes) == expected
    unknown = make_job(base="nobody-measured-this")
    assert routing.estimate_memory_mb(unknown, {}) > routing.UNKNOWN_MODEL_MB


def test_round_robin_spreads_evenly():
    workers = [make_worker(f"w{i}") for i in range(4)]
    rr = routing.RoundRobin()
    picks = Counter(routing.choose_worker(make_job(f"r{i}"), workers, "round-robin", rr).worker_id
                    for i in range(400))
    assert picks == {f"w{i}": 100 for i in range(4)}


def test_smart_ties_rotate_and_prefer_fewer_models():
    same = [make_worker(f"w{i}") for i in range(3)]
    rr = routing.RoundRobin()
    picks = Counter(routing.choose_worker(make_job(f"r{i}"), same, "smart", rr).worker_id
                    for i in range(30))
    assert picks == {"w0": 10, "w1": 10, "w2": 10}
    # identical predicted time, but one holds two unrelated models: the other is chosen
    lean = make_worker("lean")
    cluttered = make_worker("cluttered", loaded={"x": 10.0, "y": 10.0}, used_mb=20.0)
    for i in range(5):
        assert routing.choose_worker(make_job(f"t{i}"), [cluttered, lean], "smart", rr) is lean


def test_a_named_upscaler_goes_to_a_worker_that_reports_it():
    from protocol.job import PostprocessSpec
    job = make_job(postprocess=PostprocessSpec(upscale_factor=2.0, upscale_method="4x-Ultra"))
    has, lacks, unreported = make_worker("has"), make_worker("lacks"), make_worker("unreported")
    has.telemetry.upscalers = ["4x-Ultra"]
    lacks.telemetry.upscalers = ["realesrgan", "tiny-esrgan"]
    rr = routing.RoundRobin()
    assert all(routing.choose_worker(job, [lacks, has], "round-robin", rr) is has for _ in range(3))
    assert routing.unroutable_reason(job, [lacks]) == \
        "unknown upscaler '4x-Ultra'; this pool has: lanczos, realesrgan, tiny-esrgan"
    assert routing.unroutable_reason(job, [lacks, unreported]) is None  # it may have it
    default = make_job(postprocess=PostprocessSpec(upscale_factor=2.0, upscale_method="esrgan"))
    assert routing.unroutable_reason(default, [lacks]) is None
    assert routing.unroutable_reason(default, [has]).startswith("unknown upscaler 'realesrgan'")


def test_hard_filters_and_unroutable_reasons():
    no_refiner = make_worker("a", capabilities=("txt2img",))
    job = make_job(models={"refiner": "tiny-sdxl-refiner"})
    assert routing.choose_worker(job, [no_refiner], "smart", routing.RoundRobin()) is None
    assert routing.unroutable_reason(job, [no_refiner]) == "no worker offers feature refiner"

    gpu_job = make_job(device="cuda:1")
    assert routing.unroutable_reason(gpu_job, [make_worker("cpu0")]) == "no worker on device cuda:1"
    assert routing.choose_worker(make_job(device="cuda"), [make_worker("g", device="cuda:0")],
                                 "smart", routing.RoundRobin()).worker_id == "g"

    big = make_job(width=2048, height=2048)
    reason = routing.unroutable_reason(big, [make_worker("s", total_mb=4000.0)])
    assert reason.startswith("needs ") and reason.endswith("largest worker has 4000 MB")

    basic_only = make_worker("b", worker_types=("sdxl_worker",))
    enhanced = make_job(worker_type="enhanced_sdxl_worker")
    assert routing.unroutable_reason(enhanced, [basic_only]) == \
        "no worker serves worker type enhanced_sdxl_worker"
    assert routing.unroutable_reason(make_job(), []) == "no worker is registered"
    assert routing.unroutable_reason(make_job(), [make_worker("ok")]) is None


def test_full_worker_gets_no_more_jobs():
    busy = make_worker("busy", jobs={"a": 1, "b": 1})
    assert routing.choose_worker(make_job(), [busy], "smart", routing.RoundRobin()) is None
    # but it could run it later, so the job is not unroutable
    assert routing.unroutable_reason(make_job(), [busy]) is None


def test_controlnet_models_are_part_of_the_warm_set():
    job = make_job(controlnets=(ControlNetSpec(type="canny", image="x.png"),))
    assert job.needed_models == ("tiny-sdxl", "controlnet-canny")
    both = make_worker("both", loaded={"tiny-sdxl": 10.0, "controlnet-canny": 5.0})
    base_only = make_worker("base", loaded={"tiny-sdxl": 10.0})
    assert routing.choose_worker(job, [base_only, both], "smart", routing.RoundRobin()) is both


def test_smart_waits_for_a_full_warm_worker_instead_of_a_slow_cold_load():
    # warm: full (1 running + 1 prefetched, 1 s each); cold: free but needs a 30 s load
    warm = make_worker("warm", loaded={"tiny-sdxl": 10.0}, jobs={"a": 1, "b": 2})
    warm.estimates = {"a": DispatchEstimate(1.0, ("tiny-sdxl",)), "b": DispatchEstimate(1.0, ("tiny-sdxl",))}
    cold = make_worker("cold", load_s=30.0)
    job = make_job(steps=10)   # 10 x 0.1 s
    assert routing.predicted_finish_s(job, warm) == 1.0 + 1.0 + 1.0
    assert routing.predicted_finish_s(job, cold) == 1.0 + 30.0
    assert routing.choose_worker(job, [warm, cold], "smart", routing.RoundRobin()) is None
    assert routing.choose_worker(job, [warm, cold], "round-robin", routing.RoundRobin()) is cold
    # the warm worker answers one job: now it has room and gets it
    del warm.jobs["a"]
    assert routing.choose_worker(job, [warm, cold], "smart", routing.RoundRobin()) is warm


def test_backlog_counts_models_its_queued_jobs_bring():
    idle = make_worker("idle", load_s=10.0)
    bringing = make_worker("bringing", load_s=10.0, jobs={"a": 1})
    bringing.estimates["a"] = routing.dispatch_estimate(make_job("a"), bringing)
    assert bringing.estimates["a"] == DispatchEstimate(10.0 * 0.1 + 10.0, ("tiny-sdxl",), 10.0 * 0.1, 10)
    job = make_job("b")
    # idle: 1 s steps + 10 s load; bringing: 11 s backlog + 1 s steps, model already coming
    assert routing.predicted_finish_s(job, idle) == 11.0
    assert routing.predicted_finish_s(job, bringing) == 12.0
    assert routing.choose_worker(job, [idle, bringing], "smart", routing.RoundRobin()) is idle
    fast = make_worker("fast", load_s=10.0, step_s=0.01, jobs={"a": 1})
    fast.estimates["a"] = DispatchEstimate(0.5, ("tiny-sdxl",))
    assert routing.predicted_finish_s(job, fast) == 0.5 + 0.1
    assert routing.choose_worker(job, [idle, fast], "smart", routing.RoundRobin()) is fast


def test_a_long_queue_makes_smart_wait_for_the_warm_worker_rather_than_load():
    # warm: one job of 100 steps * 0.1 s ahead (10 s); cold: busy with a 1 s job, then a 3 s
    # load. Job of 10 s: warm finishes at 20 s, cold at 1 + 10 + 3 = 14 s with nothing queued;
    # with 8 jobs queued over 2 workers the load counts 1 + 4 = 5 times (26 s): warm wins.
    warm = make_worker("warm", loaded={"tiny-sdxl": 2000.0}, jobs={"x": 1})
    cold = make_worker("cold", jobs={"y": 1})   # busy too: a queue would wait on its load
    cold.estimates["y"] = DispatchEstimate(1.0, ("other-model",))
    job = make_job(steps=100)
    assert routing.load_weight_for(0, 2) == 1.0
    assert routing.load_weight_for(8, 2) == 5.0
    assert routing.choose_worker(job, [warm, cold], "smart", routing.RoundRobin(), waiting=0) is cold
    assert routing.choose_worker(job, [warm, cold], "smart", routing.RoundRobin(), waiting=8) is warm


def test_smart_avoids_evicting_a_model_that_queued_jobs_want():
    # two idle workers, each full with two 3000 MB models (LRU first); the new job's model
    # evicts "keep-me" on one and "spare" on the other. With nothing queued they tie on time
    # (round-robin decides); with queued jobs wanting "keep-me", the other worker wins.
    sizes = {"new-model": 3000.0, "keep-me": 3000.0, "spare": 3000.0, "other": 3000.0}

    def full_worker(worker_id, lru_first):
        w = make_worker(worker_id, total_mb=7000.0, used_mb=6000.0,
                        loaded={lru_first: 3000.0, "other": 3000.0})
        w.telemetry.model_sizes_mb.update(sizes)
        return w

    a, b = full_worker("a", "keep-me"), full_worker("b", "spare")
    job = make_job(base="new-model", width=256, height=256)
    chosen = {routing.choose_worker(job, [a, b], "smart", routing.RoundRobin(),
                                    wanted=frozenset({"keep-me"})).worker_id for _ in range(4)}
    assert chosen == {"b"}
    unaware = {routing.choose_worker(job, [a, b], "smart", rr).worker_id
               for rr in [routing.RoundRobin()] for _ in range(4)}
    assert unaware == {"a", "b"}


def test_the_running_job_counts_only_its_remaining_steps_once_the_heartbeat_shows_progress():
    worker = make_worker("w", loaded={"tiny-sdxl": 2000.0}, jobs={"a": 1})
    worker.estimates["a"] = routing.dispatch_estimate(make_job("a", steps=100), worker)  # 10 s
    job = make_job("b", steps=10)                                                      # 1 s
    assert routing.predicted_finish_s(job, worker) == 10.0 + 1.0
    worker.current_job, worker.current_step = "a", 75          # heartbeat: step 75 of 100
    assert routing.predicted_finish_s(job, worker) == 2.5 + 1.0
    worker.current_job = "other"                               # a job it does not hold
    assert routing.predicted_finish_s(job, worker) == 10.0 + 1.0


def test_a_load_on_an_idle_worker_counts_once_however_long_the_queue():
    warm = make_worker("warm", loaded={"tiny-sdxl": 2000.0}, jobs={"x": 1})   # 10 s ahead
    idle = make_worker("idle")                                               # 3 s load
    job = make_job(steps=100)
    assert routing.choose_worker(job, [warm, idle], "smart", routing.RoundRobin(), waiting=50) is idle
