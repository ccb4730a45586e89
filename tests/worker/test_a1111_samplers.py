"""A1111 sampler names: accepted at the protocol edge, mapped to the diffusers scheduler and
config that run the same algorithm, run for real on the tiny kit, named in the infotext."""

from __future__ import annotations

import pytest
from PIL import Image

from gpu_worker.schedulers import make_scheduler
from protocol.errors import ValidationFailed
from protocol.parse import parse_request

pytestmark = pytest.mark.slow

# name as a user types it -> (class, config that must be set)
EXPECTED = {
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler",
                     {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "Euler a Karras": ("DPMSolverMultistepScheduler",
                       {"algorithm_type": "sde-dpmsolver++", "solver_order": 1, "use_karras_sigmas": True}),
    "DPM++ 2S a": ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "LCM": ("LCMScheduler", {}),
    "DPM++ 3M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}


def job_for(name: str, **fields):
    body = {"message_type": "generate_sdxl_enhanced", "request_id": f"s-{name}", "prompt": "a photo of a cat",
            "model_base": "tiny-sdxl", "width": 256, "height": 256, "steps": 2, "seed": 3,
            "scheduler": name, "dtype": "float32", **fields}
    return parse_request(body).job


@pytest.mark.parametrize("name", list(EXPECTED))
def test_a1111_name_maps_to_the_scheduler_that_reproduces_it(name, base_pipeline_config):
    job = job_for(name)
    scheduler, warnings = make_scheduler(job.scheduler, base_pipeline_config, job.use_karras_sigmas)
    cls, config = EXPECTED[name]
    assert type(scheduler).__name__ == cls and not warnings
    for key, value in config.items():
        assert scheduler.config[key] == value, (name, key)


@pytest.mark.parametrize("name", ["DPM++ 2M SDE Karras", "DPM++ 2M SDE", "DPM++ SDE Karras", "Euler a Karras",
                                  "DPM++ 2S a", "LCM", "DPM++ 3M SDE"])
def test_a1111_sampler_runs_and_is_named_in_the_infotext(executor, name):
    result = executor.run(job_for(name), lambda *a: None, lambda: False)
    image = result["generated_images"][0]
    text = Image.open(image["path"]).text["parameters"]
    assert f"Sampler: {name}," in text
    assert not [w for w in result["warnings"] if "Karras" in w]


def test_unknown_sampler_is_refused_naming_the_valid_ones():
    with pytest.raises(ValidationFailed) as failed:
        parse_request({"message_type": "generate_sdxl_enhanced", "request_id": "x", "prompt": "p",
                       "scheduler": "DPM++ 9M Turbo"})
    assert "DPM++ 2M SDE Karras" in str(failed.value.errors)


@pytest.fixture(scope="module")
def base_pipeline_config(demo_models_dir):
    import json
    import os

    with open(os.path.join(demo_models_dir, "tiny-sdxl", "scheduler", "scheduler_config.json")) as fh:
        return json.load(fh)
