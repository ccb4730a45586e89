"""Configs for single-file SDXL checkpoints that come with none, made offline.

A single `.safetensors` in the original (LDM) layout holds weights only; diffusers'
`from_single_file` needs the diffusers configs of its architecture. When the operator names no
config folder (--single-file-config) and no hub may be asked, the product writes one from the
SDXL configs it ships (gpu_worker/sdxl_architecture.py: the published base 1.0 configs), with
every size the checkpoint's tensors determine taken from the tensors: UNet widths, depth,
attention levels and transformer depth, cross-attention and text-time sizes (base: 6 time ids,
refiner: 5), VAE widths and latent channels, both text encoders' widths, depths, vocabulary and
projection. Sizes the tensors do not show follow SDXL's conventions (64-wide attention heads,
32 normalisation groups where the widths allow). The tokenizers are CLIP's, from the
vocabulary open_clip ships (gpu_worker/clip_vocab.py). Base or refiner is told by the tensors:
a refiner has only the OpenCLIP encoder.

Nothing here loads weights: shapes come from the safetensors header. Folders are written once
per distinct architecture under a cache directory and reused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re

from gpu_worker import sdxl_architecture as published

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "conditioner.embedders.0.transformer.text_model."
OPEN_CLIP_BASE = "conditioner.embedders.1.model."
OPEN_CLIP_REFINER = "conditioner.embedders.0.model."
BASE_TIME_IDS, REFINER_TIME_IDS = 6, 5
SCHEDULER_CONFIG = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                    "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                    "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear",
                    "use_karras_sigmas": False}


class NotSDXL(ValueError):
    """The tensors are not an SDXL base or refiner in the original layout."""


def architecture(shapes: dict[str, list[int]]) -> str:
    """'base' or 'refiner' from the tensor names; NotSDXL otherwise."""
    if f"{UNET}label_emb.0.0.weight" not in shapes:
        raise NotSDXL("no SDXL UNet (model.diffusion_model.* with a text-time embedding)")
    if any(k.startswith(OPEN_CLIP_BASE) for k in shapes) and any(k.startswith(CLIP_L) for k in shapes):
        return "base"
    if any(k.startswith(OPEN_CLIP_REFINER) for k in shapes):
        return "refiner"
    raise NotSDXL("no SDXL text encoders (conditioner.embedders.*)")


def _heads(width: int) -> int:
    return width // 64 if width % 64 == 0 else max(1, width // 16)


def _groups(widths: list[int]) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in widths))


def unet_config(shapes: dict, time_ids: int, pooled_dim: int) -> dict:
    blocks = {int(m[1]) for k in shapes if (m := re.match(rf"{re.escape(UNET)}input_blocks\.(\d+)\.", k))}
    downsamplers = sorted(int(m[1]) for k in shapes
                          if (m := re.match(rf"{re.escape(UNET)}input_blocks\.(\d+)\.0\.op\.weight$", k)))
    levels = len(downsamplers) + 1
    layers = (max(blocks) - (levels - 1)) // levels
    widths, attention, depth = [], [], []
    for level in range(levels):
        first = 1 + level * (layers + 1)
        widths.append(shapes[f"{UNET}input_blocks.{first}.0.out_layers.3.weight"][0])
        transformer = {int(m[1]) for k in shapes
                       if (m := re.match(rf"{re.escape(UNET)}input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.", k))}
        attention.append(bool(transformer))
        depth.append(len(transformer) or 1)
    attn_key = next(k for k in shapes if re.match(rf"{re.escape(UNET)}.*attn2\.to_k\.weight$", k))
    proj_in = next((k for k in shapes if k.startswith(UNET) and k.endswith("proj_in.weight")), None)
    config = copy.deepcopy(published.UNET_CONFIG)
    config.update(
        block_out_channels=widths, layers_per_block=layers,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        transformer_layers_per_block=depth, attention_head_dim=[_heads(w) for w in widths],
        cross_attention_dim=shapes[attn_key][1], norm_num_groups=_groups(widths),
        use_linear_projection=proj_in is not None and len(shapes[proj_in]) == 2,
        in_channels=shapes[f"{UNET}input_blocks.0.0.weight"][1], out_channels=shapes[f"{UNET}out.2.weight"][0],
        projection_class_embeddings_input_dim=shapes[f"{UNET}label_emb.0.0.weight"][1],
        addition_time_embed_dim=(shapes[f"{UNET}label_emb.0.0.weight"][1] - pooled_dim) // time_ids)
    config["_class_name"] = "UNet2DConditionModel"
    return config


def vae_config(shapes: dict) -> dict:
    levels = sorted({int(m[1]) for k in shapes if (m := re.match(rf"{re.escape(VAE)}encoder\.down\.(\d+)\.", k))})
    widths = [shapes[f"{VAE}encoder.down.{i}.block.0.conv1.weight"][0] for i in levels]
    layers = len({m[1] for k in shapes if (m := re.match(rf"{re.escape(VAE)}encoder\.down\.0\.block\.(\d+)\.", k))})
    config = copy.deepcopy(published.VAE_CONFIG)
    config.update(block_out_channels=widths, layers_per_block=layers, norm_num_groups=_groups(widths),
                  down_block_types=["DownEncoderBlock2D"] * len(widths),
                  up_block_types=["UpDecoderBlock2D"] * len(widths),
                  in_channels=shapes[f"{VAE}encoder.conv_in.weight"][1],
                  out_channels=shapes[f"{VAE}decoder.conv_out.weight"][0],
                  latent_channels=shapes[f"{VAE}quant_conv.weight"][0] // 2)
    config["_class_name"] = "AutoencoderKL"
    return config


def _text_config(template: dict, width: int, vocab: int, positions: int, layers: int, inner: int,
                 projection: int | None) -> dict:
    config = copy.deepcopy(template)
    config.update(hidden_size=width, vocab_size=vocab, max_position_embeddings=positions, num_hidden_layers=layers,
                  intermediate_size=inner, num_attention_heads=_heads(width),
                  bos_token_id=49406, eos_token_id=49407)
    if projection:
        config["projection_dim"] = projection
    return config


def clip_l_config(shapes: dict) -> dict:
    vocab, width = shapes[f"{CLIP_L}embeddings.token_embedding.weight"]
    layers = len({m[1] for k in shapes if (m := re.match(rf"{re.escape(CLIP_L)}encoder\.layers\.(\d+)\.", k))})
    config = _text_config(published.TEXT_ENCODER_CONFIG, width, vocab,
                          shapes[f"{CLIP_L}embeddings.position_embedding.weight"][0], layers,
                          shapes[f"{CLIP_L}encoder.layers.0.mlp.fc1.weight"][0], None)
    config.update(architectures=["CLIPTextModel"], pad_token_id=1)
    return config


def open_clip_config(shapes: dict, prefix: str) -> dict:
    vocab, width = shapes[f"{prefix}token_embedding.weight"]
    layers = len({m[1] for k in shapes if (m := re.match(rf"{re.escape(prefix)}transformer\.resblocks\.(\d+)\.", k))})
    config = _text_config(published.TEXT_ENCODER_2_CONFIG, width, vocab, shapes[f"{prefix}positional_embedding"][0],
                          layers, shapes[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"][0],
                          shapes[f"{prefix}text_projection"][1])
    config.update(architectures=["CLIPTextModelWithProjection"], pad_token_id=0)
    return config


def model_index(kind: str) -> dict:
    index = {"_class_name": "StableDiffusionXLPipeline" if kind == "base" else "StableDiffusionXLImg2ImgPipeline",
             "_diffusers_version": "0.42.1", "force_zeros_for_empty_prompt": kind == "base",
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    if kind == "base":
        index.update(text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"])
    else:
        index.update(text_encoder=[None, None], tokenizer=[None, None], requires_aesthetics_score=True)
    return index


def configs_for(shapes: dict) -> tuple[str, dict[str, dict]]:
    """(kind, {relative file path: JSON}) for a checkpoint's tensor shapes."""
    kind = architecture(shapes)
    open_clip = OPEN_CLIP_BASE if kind == "base" else OPEN_CLIP_REFINER
    te2 = open_clip_config(shapes, open_clip)
    files = {"model_index.json": model_index(kind),
             "unet/config.json": unet_config(shapes, BASE_TIME_IDS if kind == "base" else REFINER_TIME_IDS,
                                             te2["projection_dim"]),
             "vae/config.json": vae_config(shapes), "text_encoder_2/config.json": te2,
             "scheduler/scheduler_config.json": SCHEDULER_CONFIG}
    if kind == "base":
        files["text_encoder/config.json"] = clip_l_config(shapes)
    return kind, files


def write_config_folder(shapes: dict, cache_dir: str, write: bool = True) -> str:
    """A diffusers config folder (no weights) for these shapes under cache_dir, written once.
    write=False only names it (cheap: resolution may run on a worker's IO thread; building the
    tokenizers takes seconds, so the load writes it)."""
    from gpu_worker.clip_vocab import clip_tokenizer

    kind, files = configs_for(shapes)
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, f"sdxl-{kind}-{digest}")
    if not write or os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    staging = f"{folder}.{os.getpid()}.tmp"
    for relative, content in files.items():
        path = os.path.join(staging, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(content, fh, indent=1)
    if kind == "base":
        clip_tokenizer().save_pretrained(os.path.join(staging, "tokenizer"))
    clip_tokenizer(pad_token="!").save_pretrained(os.path.join(staging, "tokenizer_2"))
    try:
        os.replace(staging, folder)
    except OSError:  # another worker wrote it first
        import shutil
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def write_vae_config(shapes: dict, cache_dir: str) -> str:
    """A folder with config.json for a single-file VAE (keys with or without first_stage_model.)."""
    if not any(k.startswith(VAE) for k in shapes):
        shapes = {VAE + k: v for k, v in shapes.items()}
    config = vae_config(shapes)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, f"sdxl-vae-{digest}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=1)
    return folder


# --- single-file ControlNets ----------------------------------------------------------------------
# Two layouts circulate: the original ControlNet (cldm) one (`control_model.` + the UNet's
# input_blocks/middle_block names, `input_hint_block`, `zero_convs`, `middle_block_out`) and,
# for most SDXL ControlNets people download, diffusers' own keys in one file
# (`controlnet_cond_embedding.*`, `down_blocks.*`). Either way the config is read from the
# tensors; what they do not show (attention heads, normalisation groups, the text-time
# embedding width) comes from the base UNet the ControlNet runs with when its widths match it
# (a ControlNet is a copy of its base's encoder), else from SDXL's conventions.
CONTROLNET_LDM = "control_model."
CONTROLNET_DIFFUSERS = "controlnet_cond_embedding.conv_in.weight"
SDXL_TIME_EMBED_DIM = 256   # SDXL's addition_time_embed_dim (2816 = 1280 pooled + 6 x 256)


class NotControlNet(ValueError):
    """The tensors are not a ControlNet in either layout."""


def controlnet_layout(shapes: dict) -> str:
    """'original' or 'diffusers'; NotControlNet otherwise."""
    if any(k.startswith(CONTROLNET_LDM + "input_hint_block.") for k in shapes) or "input_hint_block.0.weight" in shapes:
        return "original"
    if CONTROLNET_DIFFUSERS in shapes:
        return "diffusers"
    raise NotControlNet("neither control_model.input_hint_block.* (original ControlNet layout) nor "
                        "controlnet_cond_embedding.* (diffusers layout) is in the file")


def _numbers(shapes: dict, pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in shapes if (m := re.match(pattern, k))})


def _controlnet_sizes_original(shapes: dict) -> dict:
    p = CONTROLNET_LDM if any(k.startswith(CONTROLNET_LDM) for k in shapes) else ""
    ep = re.escape(p)
    blocks = _numbers(shapes, rf"{ep}input_blocks\.(\d+)\.")
    levels = len(_numbers(shapes, rf"{ep}input_blocks\.(\d+)\.0\.op\.weight$")) + 1
    layers = (max(blocks) - (levels - 1)) // levels
    widths, depth = [], []
    for level in range(levels):
        first = 1 + level * (layers + 1)
        widths.append(shapes[f"{p}input_blocks.{first}.0.out_layers.3.weight"][0])
        depth.append(len(_numbers(shapes, rf"{ep}input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")))
    hint = _numbers(shapes, rf"{ep}input_hint_block\.(\d+)\.weight$")   # conv_in, blocks..., conv_out
    embedding = [shapes[f"{p}input_hint_block.{hint[0]}.weight"][0]] + [
        shapes[f"{p}input_hint_block.{i}.weight"][0] for i in hint[2:-1:2]]
    label = shapes.get(f"{p}label_emb.0.0.weight")
    return {"prefix": p, "widths": widths, "layers": layers, "depth": depth,
            "in_channels": shapes[f"{p}input_blocks.0.0.weight"][1],
            "conditioning_channels": shapes[f"{p}input_hint_block.{hint[0]}.weight"][1],
            "embedding": embedding, "projection": label[1] if label else None}


def _controlnet_sizes_diffusers(shapes: dict) -> dict:
    levels = _numbers(shapes, r"down_blocks\.(\d+)\.")
    widths = [shapes[f"down_blocks.{i}.resnets.0.conv2.weight"][0] for i in levels]
    depth = [len(_numbers(shapes, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")) for i in levels]
    blocks = _numbers(shapes, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight$")
    embedding = [shapes["controlnet_cond_embedding.conv_in.weight"][0]] + [
        shapes[f"controlnet_cond_embedding.blocks.{i}.weight"][0] for i in blocks[1::2]]
    label = shapes.get("add_embedding.linear_1.weight")
    return {"prefix": "", "widths": widths, "layers": len(_numbers(shapes, r"down_blocks\.0\.resnets\.(\d+)\.")),
            "depth": depth, "in_channels": shapes["conv_in.weight"][1],
            "conditioning_channels": shapes["controlnet_cond_embedding.conv_in.weight"][1],
            "embedding": embedding, "projection": label[1] if label else None}


def controlnet_config(shapes: dict, base_unet_config: dict | None = None) -> dict:
    """A ControlNetModel config for a single file's tensors (either layout); sizes the tensors
    do not show from `base_unet_config` when its widths are the ControlNet's."""
    layout = controlnet_layout(shapes)
    sizes = _controlnet_sizes_original(shapes) if layout == "original" else _controlnet_sizes_diffusers(shapes)
    widths = sizes["widths"]
    attn_key = next(k for k in shapes if k.endswith("attn2.to_k.weight"))
    proj_in = next((k for k in shapes if k.endswith("proj_in.weight")), None)
    base = dict(base_unet_config or {})
    same_base = list(base.get("block_out_channels") or ()) == widths
    projection = sizes["projection"]
    if same_base and base.get("projection_class_embeddings_input_dim") == projection:
        time_embed_dim = base.get("addition_time_embed_dim")
    else:
        time_embed_dim = SDXL_TIME_EMBED_DIM
    return {
        "_class_name": "ControlNetModel",
        "in_channels": sizes["in_channels"], "conditioning_channels": sizes["conditioning_channels"],
        "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in sizes["depth"]],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
        "block_out_channels": widths, "layers_per_block": sizes["layers"],
        "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
        "norm_num_groups": base["norm_num_groups"] if same_base and "norm_num_groups" in base else _groups(widths),
        "norm_eps": 1e-5, "cross_attention_dim": shapes[attn_key][1],
        "transformer_layers_per_block": [d or 1 for d in sizes["depth"]],
        "attention_head_dim": base["attention_head_dim"] if same_base and "attention_head_dim" in base
        else [_heads(w) for w in widths],
        "use_linear_projection": proj_in is not None and len(shapes[proj_in]) == 2,
        "addition_embed_type": "text_time" if projection else None,
        "addition_time_embed_dim": time_embed_dim if projection else None,
        "projection_class_embeddings_input_dim": projection,
        "upcast_attention": False, "resnet_time_scale_shift": "default",
        "controlnet_conditioning_channel_order": "rgb",
        "conditioning_embedding_out_channels": sizes["embedding"], "global_pool_conditions": False,
    }


def write_controlnet_config(shapes: dict, cache_dir: str, base_unet_config: dict | None = None) -> str:
    """A folder with config.json for a single-file ControlNet, written once per config."""
    config = controlnet_config(shapes, base_unet_config)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, f"sdxl-controlnet-{digest}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        os.makedirs(folder, exist_ok=True)
        staging = os.path.join(folder, f"config.json.{os.getpid()}.tmp")
        with open(staging, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=1)
        os.replace(staging, os.path.join(folder, "config.json"))
    return folder
