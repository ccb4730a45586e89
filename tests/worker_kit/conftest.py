"""Session fixtures for the model-kit tests: the kit (built once, see tests/conftest.py) and
the base pipeline loaded once from it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def base_pipeline(demo_models_dir):
    """StableDiffusionXLPipeline loaded offline from the kit's tiny-sdxl/ folder."""
    import os

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(
        os.path.join(demo_models_dir, "tiny-sdxl"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt="a photo of a cat", seed=1, steps=2, size=128, **kwargs):
    """One image as a float numpy array; fixed seed, CPU generator."""
    import torch

    return pipe(prompt=prompt, num_inference_steps=steps, height=size, width=size,
                generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images[0]
