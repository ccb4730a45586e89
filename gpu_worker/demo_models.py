"""The tiny model kit: random-weight SDXL models in the layouts users really have.

No model hub is reachable here, so every feature (base, single file, refiner, VAE, ControlNet,
LoRA, textual inversion) runs on these. Shapes follow SDXL where the code paths care about them
(two CLIP encoders of *different* widths, text-time conditioning with 6 or 5 time ids, a 4-level
VAE so the latent is image/8) and are tiny everywhere else. Building is deterministic: each
component is made under its own fixed torch seed, so the same versions give the same bytes.

`sdxl-broker demo-models --out DIR` writes (names from CONTRACT.md):
  tiny-sdxl/  tiny-sdxl.safetensors  tiny-sdxl-refiner/  tiny-vae/
  controlnet/tiny-canny/  controlnet/tiny-depth/  controlnet/tiny-canny-original.safetensors
  loras/tiny-lora-a.safetensors  loras/tiny-lora-b.safetensors  embeddings/tiny-ti.safetensors
  upscalers/tiny-esrgan.safetensors  loras/tiny-lora-kohya.safetensors (kohya layout)
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from typing import Callable

log = logging.getLogger(__name__)

# Sizes. te1 and te2 must differ (single-file loading tells them apart by width).
TE1_HIDDEN = 32
TE2_HIDDEN = 64
TE2_PROJECTION = 32        # pooled text embedding fed to the UNet's text-time embedding
TEXT_LAYERS = 5            # enough for clip_skip 1..3
ADDITION_TIME_EMBED_DIM = 8
BASE_TIME_IDS = 6          # original size (2) + crop (2) + target size (2)
REFINER_TIME_IDS = 5       # original size (2) + crop (2) + aesthetic score (1)
UNET_SAMPLE_SIZE = 32      # native 256x256 at vae scale factor 8
MAX_TOKENS = 77
TI_TOKEN = "<tiny-ti>"

# Names inside the kit (CONTRACT.md "Commands").
BASE = "tiny-sdxl"
BASE_SINGLE_FILE = "tiny-sdxl.safetensors"
REFINER = "tiny-sdxl-refiner"
VAE = "tiny-vae"
CONTROLNETS = {"tiny-canny": "controlnet/tiny-canny", "tiny-depth": "controlnet/tiny-depth"}
# tiny-canny again as one file in the original ControlNet (cldm) layout, `control_model.*`:
# gpu_worker.ldm_layout.controlnet_to_ldm writes it (diffusers ships only the opposite
# direction, convert_controlnet_checkpoint, which is what loads it: the round trip is checked
# by loading it with diffusers and comparing with the folder)
CONTROLNET_SINGLE_FILES = {"tiny-canny-original": "controlnet/tiny-canny-original.safetensors"}
LORAS = {"tiny-lora-a": "loras/tiny-lora-a.safetensors", "tiny-lora-b": "loras/tiny-lora-b.safetensors"}
TEXTUAL_INVERSIONS = {"tiny-ti": "embeddings/tiny-ti.safetensors"}
# kohya/A1111 layout (lora_unet_* / lora_te1_* / lora_te2_* with alphas), UNet + both encoders
KOHYA_LORAS = {"tiny-lora-kohya": "loras/tiny-lora-kohya.safetensors"}
UPSCALERS = {"tiny-esrgan": "upscalers/tiny-esrgan.safetensors"}  # 4x, ESRGAN (RRDBNet) layout

# One seed per component: components do not shift when another one changes.
SEEDS = {
    "te1": 101, "te2": 102, "unet": 103, "vae": 104, "refiner_unet": 105, "custom_vae": 106,
    "tiny-canny": 107, "tiny-depth": 108, "tiny-lora-a": 109, "tiny-lora-b": 110, "tiny-ti": 111,
    "tiny-esrgan": 112, "tiny-lora-kohya": 113,
}

def build_tokenizer():
    """CLIP's own BPE tokenizer (49,408 tokens) from the vocabulary file open_clip ships: the
    kit tokenizes prompts as real SDXL does, and its single file loads with the configs the
    product ships (gpu_worker/single_file_configs.py)."""
    from gpu_worker.clip_vocab import clip_tokenizer

    return clip_tokenizer()


def _text_encoder(cls, hidden: int, tokenizer, seed: int, projection_dim: int | None = None):
    import torch
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),  # must equal the tokenizer length (TI unload resizes to it)
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=projection_dim or hidden,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return cls(config).eval()


def _unet(seed: int, cross_attention_dim: int, time_ids: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=UNET_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),  # ~1.5 M parameters
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=time_ids * ADDITION_TIME_EMBED_DIM + TE2_PROJECTION,
        norm_num_groups=32,
    ).eval()


def _vae(seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 4 levels: latent = image / 8
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=0.13025,  # SDXL's
    ).eval()


def _scheduler():
    """SDXL's own scheduler config; every scheduler of the seed takes it through from_config."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
        interpolation_type="linear", use_karras_sigmas=False,
    )


def _controlnet(unet, seed: int):
    """ControlNet copied from the UNet; its zero-initialised output convs get small random
    weights so that the control image really changes the result."""
    import torch
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return controlnet.eval()


def _lora_state_dict(unet, seed: int) -> dict:
    """A rank-4 LoRA on the UNet attention projections, with B != 0 so it has an effect."""
    import copy

    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(unet)
    torch.manual_seed(seed)
    # alpha 2r: a scale of 2 makes the effect plain to see in an 8-bit image
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _kohya_lora_state_dict(unet, te1, te2, seed: int) -> dict:
    """A rank-4 peft LoRA on the UNet attention and both text encoders' attention projections,
    converted to the kohya/A1111 layout by diffusers' own converter (not by this product, so the
    loading test is not the product checking itself)."""
    import copy

    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    peft_state = {}
    for prefix, module, targets in (("unet", unet, ["to_q", "to_k", "to_v", "to_out.0"]),
                                    ("text_encoder", te1, ["q_proj", "k_proj", "v_proj", "out_proj"]),
                                    ("text_encoder_2", te2, ["q_proj", "k_proj", "v_proj", "out_proj"])):
        # lora_alpha = r: the converter writes alpha = rank, so the file means what peft meant
        model = inject_adapter_in_model(
            LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets), copy.deepcopy(module))
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                # peft's state-dict names (no adapter name); B scaled up so the effect shows
                # through the tiny model's noise
                value = param.detach() * (4.0 if ".lora_B." in name else 1.0)
                peft_state[f"{prefix}.{name.replace('.default.', '.')}"] = value
    kohya = convert_state_dict_to_kohya(peft_state)
    return {k: v.detach().clone().contiguous() for k, v in sorted(kohya.items())}


def _esrgan_state_dict(seed: int) -> dict:
    """A tiny random-weight ESRGAN (RRDBNet, 4x) built with spandrel's own architecture class,
    so spandrel recognises the file as any ESRGAN download."""
    import torch

    from gpu_worker.upscalers import import_spandrel

    import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN as RRDBNet

    torch.manual_seed(seed)
    model = RRDBNet(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4).eval()
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _save_tokenizer_check(folder: str) -> None:
    """The saved tokenizer must load offline (transformers 5 writes only tokenizer.json)."""
    from transformers import CLIPTokenizer

    CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def build_demo_models(out_dir: str, progress: Callable[[str, float], None] | None = None) -> dict[str, str]:
    """Build the whole kit into out_dir. Returns {name: path}. Existing kit files are replaced.

    progress(name, seconds) is called once per finished model (the CLI prints it)."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)  # fail on a bad target before the slow imports

    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from gpu_worker.ldm_layout import controlnet_to_ldm, sdxl_to_single_file

    report = progress or (lambda name, seconds: None)
    paths: dict[str, str] = {}

    def timed(name: str, path: str, make: Callable[[str], None]) -> None:
        started = time.perf_counter()
        _replace(path, make)
        paths[name] = path
        report(name, time.perf_counter() - started)

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        started = time.perf_counter()
        tokenizer = build_tokenizer()
        te1 = _text_encoder(CLIPTextModel, TE1_HIDDEN, tokenizer, SEEDS["te1"])
        te2 = _text_encoder(CLIPTextModelWithProjection, TE2_HIDDEN, tokenizer, SEEDS["te2"], TE2_PROJECTION)
        unet = _unet(SEEDS["unet"], TE1_HIDDEN + TE2_HIDDEN, BASE_TIME_IDS)
        vae = _vae(SEEDS["vae"])
        base = StableDiffusionXLPipeline(
            vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer,
            unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
        )
        log.debug("base components built in %.2f s", time.perf_counter() - started)

        def save_base(path: str) -> None:
            base.save_pretrained(path, safe_serialization=True)
            _save_tokenizer_check(os.path.join(path, "tokenizer"))
        timed(BASE, os.path.join(out_dir, BASE), save_base)

        def save_single_file(path: str) -> None:
            # one metadata key only: safetensors writes several in random order (not reproducible)
            save_file(sdxl_to_single_file(unet, vae, te1, te2), path, metadata={"format": "pt"})
        timed(BASE_SINGLE_FILE, os.path.join(out_dir, BASE_SINGLE_FILE), save_single_file)

        def save_refiner(path: str) -> None:
            refiner = StableDiffusionXLImg2ImgPipeline(
                vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tokenizer,
                unet=_unet(SEEDS["refiner_unet"], TE2_HIDDEN, REFINER_TIME_IDS), scheduler=_scheduler(),
                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
            )
            refiner.save_pretrained(path, safe_serialization=True)
        timed(REFINER, os.path.join(out_dir, REFINER), save_refiner)

        timed(VAE, os.path.join(out_dir, VAE),
              lambda path: _vae(SEEDS["custom_vae"]).save_pretrained(path, safe_serialization=True))

        controlnets = {name: _controlnet(unet, SEEDS[name]) for name in CONTROLNETS}
        for name, rel in CONTROLNETS.items():
            timed(name, os.path.join(out_dir, rel),
                  lambda path, model=controlnets[name]: model.save_pretrained(path, safe_serialization=True))

        for name, rel in CONTROLNET_SINGLE_FILES.items():
            def save_controlnet_file(path: str, model=controlnets[name.removesuffix("-original")]) -> None:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                save_file(controlnet_to_ldm(model.state_dict(), dict(model.config)), path,
                          metadata={"format": "pt"})
            timed(name, os.path.join(out_dir, rel), save_controlnet_file)

        for name, rel in LORAS.items():
            def save_lora(path: str, seed: int = SEEDS[name]) -> None:
                folder, weight_name = os.path.split(path)
                os.makedirs(folder, exist_ok=True)
                StableDiffusionXLPipeline.save_lora_weights(
                    folder, unet_lora_layers=_lora_state_dict(unet, seed), weight_name=weight_name,
                    safe_serialization=True)
            timed(name, os.path.join(out_dir, rel), save_lora)

        for name, rel in KOHYA_LORAS.items():
            def save_kohya(path: str, seed: int = SEEDS[name]) -> None:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                save_file(_kohya_lora_state_dict(unet, te1, te2, seed), path, metadata={"format": "pt"})
            timed(name, os.path.join(out_dir, rel), save_kohya)

        for name, rel in TEXTUAL_INVERSIONS.items():
            def save_ti(path: str, seed: int = SEEDS[name]) -> None:
                generator = torch.Generator().manual_seed(seed)
                # scale like a token embedding of the tiny encoders (CLIP init std 0.02 is too
                # small to matter next to the other tokens; a learned embedding stands out)
                tensors = {"clip_l": torch.randn(1, TE1_HIDDEN, generator=generator),
                           "clip_g": torch.randn(1, TE2_HIDDEN, generator=generator)}
                os.makedirs(os.path.dirname(path), exist_ok=True)
                save_file(tensors, path, metadata={"token": TI_TOKEN})
            timed(name, os.path.join(out_dir, rel), save_ti)

        for name, rel in UPSCALERS.items():
            def save_upscaler(path: str, seed: int = SEEDS[name]) -> None:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                save_file(_esrgan_state_dict(seed), path, metadata={"format": "pt"})
            timed(name, os.path.join(out_dir, rel), save_upscaler)
    return paths


def _replace(path: str, make: Callable[[str], None]) -> None:
    """Write into a temp sibling, then swap in: a failed build never leaves half a model."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".building-", dir=parent)
    try:
        target = os.path.join(staging, os.path.basename(path))
        make(target)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        os.replace(target, path)
        if os.path.isfile(path):
            os.chmod(path, 0o644)  # some writers create 0600; the kit is meant to be shared
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- CLI: `sdxl-broker demo-models` -------------------------------------------------------

def _quiet_progress_bars() -> None:
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    except (ImportError, AttributeError):  # cosmetic only
        pass


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.description = (
        "Build the tiny random-weight SDXL kit (base folder and single file, refiner, VAE, "
        "ControlNets canny/depth, two LoRAs, a textual inversion for <tiny-ti>, a 4x ESRGAN upscaler) into --out. "
        "Deterministic; takes seconds; needs no model hub. Point a worker's --models-dir at it.")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to build the kit in (created if missing)")
    parser.add_argument("--check", action="store_true",
                        help="after building, load the base folder and the single file offline, run a "
                             "256x256 4-step txt2img with each and print the times (and whether the "
                             "two images are identical, as they must be)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level (default INFO)")


def check_demo_models(out_dir: str, size: int = 256, steps: int = 4) -> dict:
    """Load the kit's base both ways and generate once with each (same seed).
    Returns {load_s, generate_s, single_file_load_s, identical}."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    def image(pipe):
        return pipe(prompt="a photo of a cat", num_inference_steps=steps, height=size, width=size,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    started = time.perf_counter()
    folder = StableDiffusionXLPipeline.from_pretrained(os.path.join(out_dir, BASE), local_files_only=True)
    load_s = time.perf_counter() - started
    folder.set_progress_bar_config(disable=True)
    image(folder)  # first call pays one-off allocations; time the second
    started = time.perf_counter()
    from_folder = image(folder)
    generate_s = time.perf_counter() - started
    started = time.perf_counter()
    single = StableDiffusionXLPipeline.from_single_file(
        os.path.join(out_dir, BASE_SINGLE_FILE), config=os.path.join(out_dir, BASE), local_files_only=True)
    single_file_load_s = time.perf_counter() - started
    single.set_progress_bar_config(disable=True)
    identical = bool(np.array_equal(from_folder, image(single)))
    return {"load_s": load_s, "generate_s": generate_s, "single_file_load_s": single_file_load_s,
            "identical": identical}


def run(args: argparse.Namespace) -> int:
    from runtime.logs import configure_logging, route_library_logs

    configure_logging(args.log_level, "text")   # the NOISE filter too (transformers' torchvision lines)
    route_library_logs()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    print(f"building the tiny SDXL kit in {os.path.abspath(args.out)}", flush=True)

    def progress(name: str, seconds: float) -> None:
        print(f"  {name:<24} {seconds:6.2f} s", flush=True)

    _quiet_progress_bars()  # our own line per model says more than the libraries' bars
    try:
        paths = build_demo_models(args.out, progress=progress)
    except OSError as exc:
        print(f"error: cannot write the kit to {args.out}: {exc}", flush=True)
        return 1
    print(f"built {len(paths)} models in {time.perf_counter() - started:.1f} s", flush=True)
    if args.check:
        result = check_demo_models(args.out)
        print(f"check: folder load {result['load_s']:.2f} s, 256x256 4-step txt2img {result['generate_s']:.2f} s, "
              f"single-file load {result['single_file_load_s']:.2f} s, single file gives the same image: "
              f"{'yes' if result['identical'] else 'NO'}", flush=True)
        if not result["identical"]:
            return 1
    return 0
