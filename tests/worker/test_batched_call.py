"""Dynamic batching in the real executor (gpu_worker/batched_call.py): compatible jobs in one
diffusers call, each with its own prompt, seeds, files and outcome. Real diffusers, tiny kit.

Tolerance: a batched image may differ from the lone job's image by float noise of the batched
maths; measured on the tiny kit at most 1 level (of 255) in rare pixels, so the check allows a
maximum difference of 2 levels and a mean under 0.05 levels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from gpu_worker.executor_api import BatchMember
from protocol import constants as C
from protocol.errors import JobError
from protocol.job import Job

pytestmark = pytest.mark.slow

MAX_LEVELS, MEAN_LEVELS = 2, 0.05


def make_job(request_id: str, prompt: str, seed: int, **overrides) -> Job:
    fields = dict(request_id=request_id, prompt=prompt, models={"base": "tiny-sdxl"}, width=256,
                  height=256, steps=3, seed=seed, precision={"dtype": "float32"},
                  scheduler="EulerDiscreteScheduler", output={"return_images": True})
    fields.update(overrides)
    return Job.model_validate(fields)


def pixels(entry: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(entry["image"])).convert("RGB"), dtype=np.int16)


def assert_same_within_noise(batched: dict, lone: dict) -> None:
    a, b = pixels(batched), pixels(lone)
    diff = np.abs(a - b)
    assert diff.max() <= MAX_LEVELS and diff.mean() < MEAN_LEVELS, (diff.max(), diff.mean())


def member(job: Job, events: list | None = None, abort=lambda: False) -> BatchMember:
    def progress(stage, step, total, **extra):
        if events is not None:
            events.append((job.request_id, stage, step))
    return BatchMember(job, progress, abort)


def test_batched_jobs_keep_their_own_prompt_seed_and_equal_the_lone_images(executor):
    jobs = [make_job("b0", "a red fox", 11), make_job("b1", "a blue whale", 22, batch_size=2),
            make_job("b2", "(a green:1.3) frog", 33)]   # the last one weighted by compel
    events: list = []
    outcomes = executor.run_batch([member(job, events) for job in jobs])
    assert all(isinstance(o, dict) for o in outcomes), outcomes
    for job, outcome in zip(jobs, outcomes):
        assert [g["seed"] for g in outcome["generated_images"]] == [job.seed + i for i in range(job.batch_size)]
        assert "dynamic_batch" in outcome["features_used"]
        assert outcome["processing_metrics"]["batch"] == {"jobs": 3, "images": 4,
                                                          "request_ids": ["b0", "b1", "b2"]}
        assert all(job.request_id in g["path"] for g in outcome["generated_images"])
        lone = executor.run(job, lambda *a, **k: None, lambda: False)
        for batched_image, lone_image in zip(outcome["generated_images"], lone["generated_images"]):
            assert_same_within_noise(batched_image, lone_image)
    assert "prompt_weighting" in outcomes[2]["features_used"]
    assert "prompt_weighting" not in outcomes[0]["features_used"]
    # each job heard its own denoising steps
    for job in jobs:
        assert [step for rid, stage, step in events if rid == job.request_id and stage == "denoising"] == [1, 2, 3]


def test_an_invalid_job_fails_alone_and_an_aborted_one_is_dropped(executor):
    good = make_job("g0", "a cat", 1)
    aborted = {"now": False}
    quitter = make_job("g2", "a dog", 3)
    steps: list = []

    def abort_after_first_step():
        return aborted["now"]

    def progress(stage, step, total, **extra):
        steps.append(step)
        if stage == "denoising" and step == 1:
            aborted["now"] = True

    # `bad` shares the call's key but fails the job rules (an upscale factor past the bound)
    bad = make_job("g1", "a cat", 2, postprocess={"upscale_factor": 50})
    outcomes = executor.run_batch([member(good), BatchMember(quitter, progress, abort_after_first_step),
                                   member(bad)])
    assert isinstance(outcomes[0], dict) and len(outcomes[0]["generated_images"]) == 1
    assert isinstance(outcomes[1], JobError) and outcomes[1].code == C.CANCELLED
    assert isinstance(outcomes[2], JobError) and outcomes[2].code == C.VALIDATION_ERROR
    # the call went on to the end for the others after g2 was aborted at step 1
    assert outcomes[0]["processing_metrics"]["batch"]["jobs"] == 2
    assert max(steps) == 1


def test_every_job_aborted_stops_the_call(executor):
    flag = {"on": False}

    def progress(stage, step, total, **extra):
        if stage == "denoising":
            flag["on"] = True
    jobs = [make_job(f"a{i}", "a cat", i, steps=20) for i in range(2)]
    seen = []
    outcomes = executor.run_batch([BatchMember(job, lambda *a, **k: seen.append(a) or progress(*a, **k),
                                               lambda: flag["on"]) for job in jobs])
    assert all(isinstance(o, JobError) and o.code == C.CANCELLED for o in outcomes)
    assert max(a[1] for a in seen if a[0] == "denoising") < 20
