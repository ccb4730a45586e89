"""The real SDXL base architecture with random weights, for benchmarks on a GPU host.

The configs below are the published SDXL base 1.0 configs (UNet, VAE, CLIP ViT-L text encoder,
OpenCLIP ViT-bigG text encoder with projection, Euler scheduler), written out so no model hub
is needed. The weights are random: the compute and memory per step are those of real SDXL,
the images are noise. The tokenizers are the tiny kit's offline CLIP BPE tokenizer (a small
vocabulary); the text encoders keep SDXL's 49,408-row embedding tables, so their size and cost
are SDXL's.

`build_random_sdxl(out_dir, ...)` writes `sdxl-random/` (a diffusers folder of safetensors
files) and `loras/sdxl-random-lora.safetensors` (a rank-16 LoRA on every UNet attention
projection, in diffusers' key layout), so a worker pointed at `out_dir` loads them like any
user model.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

log = logging.getLogger(__name__)

BASE_NAME = "sdxl-random"
LORA_NAME = "sdxl-random-lora"
LORA_RANK = 16
NATIVE_SIZE = 1024

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (diffusers UNet2DConditionModel)
UNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (diffusers AutoencoderKL)
VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# text_encoder/config.json: CLIP ViT-L/14 text tower (transformers CLIPTextModel)
TEXT_ENCODER_CONFIG = {
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# text_encoder_2/config.json: OpenCLIP ViT-bigG/14 text tower (CLIPTextModelWithProjection)
TEXT_ENCODER_2_CONFIG = {
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "vocab_size": 49408,
}

# parameter counts of the published checkpoints: the configs above must reproduce them
PUBLISHED_PARAMETERS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                        "text_encoder_2": 694_659_840}


def build_components(device: str = "cpu", dtype=None) -> dict:
    """Random-weight SDXL components made directly on `device` in `dtype` (the "meta" device
    builds them without memory, e.g. to count parameters). Returns the pipeline's components."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from gpu_worker.demo_models import _scheduler, build_tokenizer

    dtype = dtype or torch.float32
    tokenizer = build_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in the target dtype: no float32 copy of 2.6 B params
    try:
        with torch.device(device):
            components = {
                "unet": UNet2DConditionModel(**UNET_CONFIG).eval(),
                "vae": AutoencoderKL(**VAE_CONFIG).eval(),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG, **ids)).eval(),
                "text_encoder_2": CLIPTextModelWithProjection(
                    CLIPTextConfig(**TEXT_ENCODER_2_CONFIG, **ids)).eval(),
            }
    finally:
        torch.set_default_dtype(previous_dtype)
    components.update(tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=_scheduler())
    return components


def parameter_counts(components: dict) -> dict[str, int]:
    return {name: sum(p.numel() for p in components[name].parameters()) for name in PUBLISHED_PARAMETERS}


def lora_state_dict(unet, rank: int = LORA_RANK, seed: int = 7) -> dict:
    """A random LoRA on every attention projection (to_q/k/v/out.0), in diffusers' key layout
    (`unet.<module>.lora.down.weight` / `.lora.up.weight`), made on the CPU from the modules'
    shapes alone (no copy of the UNet)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            continue
        down = torch.randn(rank, module.in_features, generator=generator) / module.in_features ** 0.5
        up = torch.randn(module.out_features, rank, generator=generator) * 0.01
        state[f"unet.{name}.lora.down.weight"] = down.to(torch.float16).contiguous()
        state[f"unet.{name}.lora.up.weight"] = up.to(torch.float16).contiguous()
    return state


def build_random_sdxl(out_dir: str, *, device: str = "cpu", dtype=None,
                      progress: Callable[[str, float], None] | None = None) -> dict[str, str]:
    """Write the random SDXL base (diffusers folder, safetensors) and its LoRA under out_dir.
    Returns {name: path}. progress(what, seconds) is called after each part."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    report = progress or (lambda what, seconds: None)
    base_path = os.path.join(out_dir, BASE_NAME)
    lora_path = os.path.join(out_dir, "loras", f"{LORA_NAME}.safetensors")
    started = time.perf_counter()
    components = build_components(device, dtype or torch.float16)
    report("random SDXL components built", time.perf_counter() - started)
    started = time.perf_counter()
    pipe = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(base_path, safe_serialization=True)
    report(f"saved {base_path}", time.perf_counter() - started)
    started = time.perf_counter()
    os.makedirs(os.path.dirname(lora_path), exist_ok=True)
    save_file(lora_state_dict(components["unet"]), lora_path, metadata={"format": "pt"})
    report(f"saved {lora_path}", time.perf_counter() - started)
    del pipe, components
    return {BASE_NAME: base_path, LORA_NAME: lora_path}
