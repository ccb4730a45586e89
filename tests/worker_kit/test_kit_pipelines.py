"""The kit runs every feature for real with diffusers, offline: the single file gives the same
weights and image as the folder, and the refiner, VAE, ControlNets, LoRAs and textual
inversion each load and change the image."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from conftest import generate

pytestmark = pytest.mark.slow


def test_base_generates_256_in_4_steps(base_pipeline):
    generate(base_pipeline, steps=1)  # warm-up
    started = time.perf_counter()
    image = generate(base_pipeline, steps=4, size=256)
    print(f"tiny-sdxl 256x256, 4 steps: {time.perf_counter() - started:.2f} s")  # figure, not a gate
    assert image.shape == (256, 256, 3)
    assert np.isfinite(image).all() and image.std() > 0.01
    assert np.array_equal(image, generate(base_pipeline, steps=4, size=256))  # same seed, same image


def test_single_file_loads_the_same_weights_and_image(demo_models_dir, base_pipeline):
    import torch
    from diffusers import StableDiffusionXLPipeline

    single = StableDiffusionXLPipeline.from_single_file(
        os.path.join(demo_models_dir, "tiny-sdxl.safetensors"),
        config=os.path.join(demo_models_dir, "tiny-sdxl"), local_files_only=True)
    single.set_progress_bar_config(disable=True)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        folder_state = getattr(base_pipeline, component).state_dict()
        file_state = getattr(single, component).state_dict()
        assert folder_state.keys() == file_state.keys(), component
        assert all(torch.equal(folder_state[k], file_state[k]) for k in folder_state), component
    assert np.array_equal(generate(base_pipeline), generate(single))


def test_refiner_takes_the_base_latents(demo_models_dir, base_pipeline):
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline

    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        os.path.join(demo_models_dir, "tiny-sdxl-refiner"), local_files_only=True)
    refiner.set_progress_bar_config(disable=True)
    latents = base_pipeline(prompt="a cat", num_inference_steps=4, height=128, width=128, denoising_end=0.5,
                            output_type="latent", generator=torch.Generator().manual_seed(1)).images
    assert latents.shape == (1, 4, 16, 16)  # image / 8
    refined = refiner(prompt="a cat", image=latents, num_inference_steps=4, denoising_start=0.5,
                      output_type="np", generator=torch.Generator().manual_seed(1)).images[0]
    plain = generate(base_pipeline, prompt="a cat", steps=4)
    assert refined.shape == (128, 128, 3) and np.isfinite(refined).all()
    assert np.abs(refined - plain).mean() > 1e-3


def test_custom_vae_changes_the_decoding(demo_models_dir, base_pipeline):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    vae = AutoencoderKL.from_pretrained(os.path.join(demo_models_dir, "tiny-vae"), local_files_only=True)
    with_vae = StableDiffusionXLPipeline.from_pipe(base_pipeline, vae=vae)
    assert np.abs(generate(with_vae) - generate(base_pipeline)).mean() > 0.01


def test_controlnets_change_the_image_and_differ(demo_models_dir, base_pipeline):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from PIL import Image

    control = Image.fromarray((np.random.RandomState(0).rand(128, 128, 3) * 255).astype("uint8"))
    plain = generate(base_pipeline)
    outputs = {}
    for name in ("tiny-canny", "tiny-depth"):
        net = ControlNetModel.from_pretrained(os.path.join(demo_models_dir, "controlnet", name), local_files_only=True)
        pipe = StableDiffusionXLControlNetPipeline.from_pipe(base_pipeline, controlnet=net)
        outputs[name] = generate(pipe, image=control)
        assert np.abs(outputs[name] - plain).mean() > 1e-3, name
    assert np.abs(outputs["tiny-canny"] - outputs["tiny-depth"]).mean() > 1e-3


def test_loras_change_the_image_and_unload_cleanly(demo_models_dir, base_pipeline):
    plain = generate(base_pipeline)
    loras = os.path.join(demo_models_dir, "loras")
    base_pipeline.load_lora_weights(os.path.join(loras, "tiny-lora-a.safetensors"), adapter_name="a")
    base_pipeline.load_lora_weights(os.path.join(loras, "tiny-lora-b.safetensors"), adapter_name="b")
    try:
        base_pipeline.set_adapters(["a"], [1.0])
        with_a = generate(base_pipeline)
        base_pipeline.set_adapters(["b"], [1.0])
        with_b = generate(base_pipeline)
        base_pipeline.set_adapters(["a"], [0.0])
        weight_zero = generate(base_pipeline)
    finally:
        base_pipeline.delete_adapters(["a", "b"])
    assert np.abs(with_a - plain).mean() > 1e-3
    assert np.abs(with_b - plain).mean() > 1e-3
    assert np.abs(with_a - with_b).mean() > 1e-3
    assert np.array_equal(weight_zero, plain)
    assert np.array_equal(generate(base_pipeline), plain)


def test_textual_inversion_loads_into_both_encoders(demo_models_dir, base_pipeline):
    from safetensors.torch import load_file

    embedding = load_file(os.path.join(demo_models_dir, "embeddings", "tiny-ti.safetensors"))
    assert embedding["clip_l"].shape[-1] == base_pipeline.text_encoder.config.hidden_size
    assert embedding["clip_g"].shape[-1] == base_pipeline.text_encoder_2.config.hidden_size
    tokens_before = len(base_pipeline.tokenizer)
    base_pipeline.load_textual_inversion(embedding["clip_l"], token="<tiny-ti>",
                                         text_encoder=base_pipeline.text_encoder, tokenizer=base_pipeline.tokenizer)
    base_pipeline.load_textual_inversion(embedding["clip_g"], token="<tiny-ti>",
                                         text_encoder=base_pipeline.text_encoder_2, tokenizer=base_pipeline.tokenizer_2)
    try:
        with_token = generate(base_pipeline, prompt="a photo of a cat <tiny-ti>")
        without = generate(base_pipeline, prompt="a photo of a cat")
    finally:
        base_pipeline.unload_textual_inversion()
    assert np.abs(with_token - without).mean() > 1e-4
    assert len(base_pipeline.tokenizer) == tokens_before
    assert base_pipeline.text_encoder.get_input_embeddings().num_embeddings == tokens_before
