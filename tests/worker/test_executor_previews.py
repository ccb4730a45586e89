"""Progress previews and ETA from the real executor on the tiny kit, and the preview maths."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from gpu_worker.previews import (SDXL_LATENT_RGB_BIAS, SDXL_LATENT_RGB_FACTORS, PreviewThrottle,
                                 encode_preview, latents_to_rgb)
from protocol.job import Job


def make_job(**overrides) -> Job:
    fields = dict(request_id="pv", prompt="a photo of a dog", models={"base": "tiny-sdxl"},
                  width=256, height=256, steps=4, seed=3, precision={"dtype": "float32"},
                  scheduler="EulerDiscreteScheduler", stream=True)
    fields.update(overrides)
    return Job.model_validate(fields)


@pytest.mark.slow
def test_a_job_with_preview_gets_small_jpeg_previews_and_a_falling_eta(executor):
    events = []
    executor.run(make_job(preview=True, preview_size=64, steps=4),
                 lambda stage, step, total, **extra: events.append((stage, step, total, extra)),
                 lambda: False)
    denoising = [e for e in events if e[0] == "denoising"]
    assert [e[1] for e in denoising] == [1, 2, 3, 4]
    previews = [e[3]["preview"] for e in denoising if "preview" in e[3]]
    assert previews, "no preview in any denoising step"
    with Image.open(io.BytesIO(previews[0])) as image:
        assert image.format == "JPEG" and max(image.size) == 64 and image.mode == "RGB"
    etas = [e[3]["eta_s"] for e in denoising]
    assert all(eta >= 0 for eta in etas) and etas[-1] == 0


@pytest.mark.slow
def test_a_streamed_job_without_preview_gets_eta_but_no_preview(executor):
    events = []
    executor.run(make_job(steps=2), lambda stage, step, total, **extra: events.append(extra),
                 lambda: False)
    assert any("eta_s" in e for e in events)
    assert not any("preview" in e for e in events)


def test_latents_map_to_rgb_through_the_sdxl_factors():
    latents = np.zeros((4, 2, 3), np.float32)
    latents[0] = 1.0  # channel 0 alone: its row of factors plus the bias
    rgb = latents_to_rgb(latents)
    expected = ((np.clip(SDXL_LATENT_RGB_FACTORS[0] + SDXL_LATENT_RGB_BIAS, -1, 1) + 1) * 127.5)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert np.allclose(rgb[1, 2], expected.astype(np.uint8), atol=1)


def test_preview_keeps_the_aspect_ratio():
    data = encode_preview(np.random.default_rng(0).normal(size=(1, 4, 32, 64)).astype(np.float32), 128)
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (128, 64)


def test_throttle_limits_by_steps_and_by_time():
    now = [0.0]
    throttle = PreviewThrottle(every_steps=2, min_interval_s=1.0, clock=lambda: now[0])
    due = []
    for step in range(1, 9):
        now[0] += 0.6
        due.append(throttle.due(step))
    # step 1 always; then even steps at least 1 s after the last preview
    assert due == [True, False, False, True, False, True, False, True]


def test_simulated_worker_sends_previews_and_eta_like_the_real_one():
    from gpu_worker.sim_executor import SimulatedExecutor

    events = []
    sim = SimulatedExecutor(step_s=0.3, load_s=0.0)
    sim.run(make_job(preview=True, preview_size=32, steps=3),
            lambda stage, step, total, **extra: events.append((stage, step, extra)), lambda: False)
    steps = [e for e in events if e[0] == "denoising"]
    assert [e[2]["eta_s"] for e in steps] == [0.6, 0.3, 0.0]
    assert all("preview" in e[2] for e in steps)  # 0.3 s apart: every step is due
    with Image.open(io.BytesIO(steps[0][2]["preview"])) as image:
        assert image.format == "JPEG" and image.size == (32, 32)


def test_simulated_worker_keeps_the_cadence_of_the_job_or_its_default():
    from gpu_worker.previews import PreviewCadence
    from gpu_worker.sim_executor import SimulatedExecutor

    sim = SimulatedExecutor(step_s=0.0, load_s=0.0,
                            preview_cadence=PreviewCadence(every_steps=4, interval_ms=0))

    def preview_steps(**fields) -> list[int]:
        events = []
        sim.run(make_job(preview=True, preview_size=32, steps=9, **fields),
                lambda stage, step, total, **extra: events.append((stage, step, extra)), lambda: False)
        return [step for stage, step, extra in events if stage == "denoising" and "preview" in extra]

    assert preview_steps() == [1, 4, 8]                                  # the worker's default
    assert preview_steps(preview_every_steps=3) == [1, 3, 6, 9]          # the job's own
    assert preview_steps(preview_every_steps=1, preview_interval_ms=60_000) == [1]
