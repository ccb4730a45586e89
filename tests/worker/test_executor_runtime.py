"""Runtime behaviour of the real executor: cache budget, OOM recovery, cancel, progress,
telemetry from another thread. Real diffusers on the tiny kit."""

from __future__ import annotations

import os
import threading

import pytest

from gpu_worker.executor import DiffusersExecutor, InjectedOOM
from protocol import constants as C
from protocol.errors import JobError
from protocol.job import Job

pytestmark = pytest.mark.slow


def make_job(**overrides) -> Job:
    fields = dict(request_id="rt", prompt="a photo of a dog", models={"base": "tiny-sdxl"}, width=256,
                  height=256, steps=2, seed=3, precision={"dtype": "float32"},
                  scheduler="EulerDiscreteScheduler")
    fields.update(overrides)
    return Job.model_validate(fields)


def test_cache_eviction_keeps_measured_size_under_budget(demo_models_dir, worker_dirs, structured_image):
    executor = DiffusersExecutor("cpu", models_dir=demo_models_dir, output_dir=worker_dirs["outputs"],
                                 input_dir=worker_dirs["inputs"], cache_budget_mb=1000.0)

    def run_with(control_type: str) -> None:
        executor.run(make_job(controlnets=[{"type": control_type, "image": structured_image, "preprocess": False}]),
                     lambda *a: None, lambda: False)

    run_with("canny")
    sizes = {m["name"]: m["size_mb"] for m in executor.telemetry()["models_loaded"]}
    assert set(sizes) == {"tiny-sdxl", "tiny-canny"} and all(size > 0 for size in sizes.values())
    # room for the base and one ControlNet, not two
    budget_mb = sizes["tiny-sdxl"] + 1.5 * sizes["tiny-canny"]
    executor.cache.budget_mb = budget_mb
    for control_type in ("depth", "canny"):
        run_with(control_type)
        telemetry = executor.telemetry()
        assert sum(m["size_mb"] for m in telemetry["models_loaded"]) <= budget_mb
        assert executor.cache.total_mb() <= budget_mb
    assert executor.cache.evictions == 2  # canny evicted for depth, then depth for canny
    names = [m["name"] for m in executor.telemetry()["models_loaded"]]
    assert names == ["tiny-sdxl", "tiny-canny"]
    assert executor.cleanup()["unloaded"]
    assert executor.telemetry()["models_loaded"] == []


def test_injected_oom_is_recovered_and_double_oom_fails_cleanly(executor):
    reference = executor.run(make_job(batch_size=2), lambda *a: None, lambda: False)
    executor._fault_injector = InjectedOOM(1)  # TEST HOOK
    try:
        recovered = executor.run(make_job(batch_size=2), lambda *a: None, lambda: False)
        assert "oom_retry" in recovered["features_used"]
        assert any("out of memory" in warning for warning in recovered["warnings"])
        assert [i["seed"] for i in recovered["generated_images"]] == [3, 4]
        assert len(recovered["generated_images"]) == 2

        executor._fault_injector = InjectedOOM(2)
        with pytest.raises(JobError) as info:
            executor.run(make_job(), lambda *a: None, lambda: False)
        assert info.value.code == C.OUT_OF_MEMORY
    finally:
        executor._fault_injector = None
    after = executor.run(make_job(batch_size=2), lambda *a: None, lambda: False)
    assert [i["sha256"] for i in after["generated_images"]] == [i["sha256"] for i in reference["generated_images"]]


def test_cancel_through_should_abort_stops_at_the_next_step(executor, worker_dirs):
    steps_seen = []

    def progress(stage, step, total):
        if stage == "denoising":
            steps_seen.append(step)

    before = set(os.listdir(worker_dirs["outputs"]))
    with pytest.raises(JobError) as info:
        executor.run(make_job(steps=20, request_id="to-cancel"), progress, lambda: len(steps_seen) >= 2)
    assert info.value.code == C.CANCELLED
    assert steps_seen == [1, 2]  # stopped right after the step where the abort was seen
    assert not any("to-cancel" in name for name in set(os.listdir(worker_dirs["outputs"])) - before)
    assert executor.run(make_job(), lambda *a: None, lambda: False)["generated_images"]


def test_progress_and_telemetry_from_another_thread_while_running(executor):
    events = []
    telemetry_samples = []
    running = threading.Event()

    def progress(stage, step, total):
        events.append((stage, step, total))
        if stage == "denoising":  # sampled while steps run: the model is loaded by then
            running.set()

    def poll():
        running.wait(30)
        while len(telemetry_samples) < 20 and running.is_set():
            telemetry_samples.append(executor.telemetry())

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    executor.run(make_job(steps=6), progress, lambda: False)
    running.clear()
    poller.join(10)
    assert events[0] == ("loading", 0, 0)
    assert [e[1] for e in events if e[0] == "denoising"] == [1, 2, 3, 4, 5, 6]
    assert all(e[2] == 6 for e in events if e[0] == "denoising")
    assert events[-1][0] == "postprocessing"
    assert telemetry_samples, "telemetry never answered while the job ran"
    sample = telemetry_samples[-1]
    assert sample["memory"]["total_mb"] > 0 and sample["rss_mb"] > 0
    assert any(m["name"] == "tiny-sdxl" for m in sample["models_loaded"])
    assert any(key.startswith("tiny-sdxl@256x256") for key in executor.telemetry()["step_time_s"])


def test_describe_and_load_model(executor):
    described = executor.describe()
    assert described["device"] == "cpu" and not described["simulated"]
    assert {"txt2img", "img2img", "inpaint", "lora", "controlnet", "refiner"} <= set(described["capabilities"])
    loaded = executor.load_model("tiny-sdxl")
    assert loaded["model"] == "tiny-sdxl"
    with pytest.raises(JobError) as info:
        executor.load_model("no-such-model")
    assert info.value.code == C.MODEL_NOT_FOUND


def test_save_path_outside_output_root_is_refused(executor):
    with pytest.raises(JobError) as info:
        executor.run(make_job(output={"save_path": "../../escape"}), lambda *a: None, lambda: False)
    assert info.value.code == C.VALIDATION_ERROR and "save_path" in info.value.message


def test_jpeg_webp_with_postprocessing(executor):
    jpeg = executor.run(make_job(output={"format": "jpeg", "quality": 60, "return_images": True},
                                 postprocess={"auto_contrast": True, "upscale_factor": 2}),
                        lambda *a: None, lambda: False)
    image = jpeg["generated_images"][0]
    assert image["format"] == "jpeg" and image["path"].endswith(".jpg")
    assert (image["width"], image["height"]) == (512, 512)
    assert image["image"][:3] == b"\xff\xd8\xff"
    assert {"auto_contrast", "upscale_lanczos"} <= set(jpeg["features_used"])
    with pytest.raises(JobError) as info:
        executor.run(make_job(postprocess={"upscale_factor": 2, "upscale_method": "no-such-upscaler"}),
                     lambda *a: None, lambda: False)
    assert info.value.code == C.UNSUPPORTED_FEATURE and "tiny-esrgan" in info.value.message
