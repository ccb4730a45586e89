"""Diffusers state dicts -> the original (LDM / "A1111") single-file SDXL key layout.

Users mostly hold SDXL as one `.safetensors` file in the original Stability layout
(`model.diffusion_model.*`, `first_stage_model.*`, `conditioner.embedders.{0,1}.*`). The demo
kit writes its base model that way too, so the single-file code path is exercised for real.
These functions are the inverse of diffusers' `loaders.single_file_utils` converters; the demo
kit's tests check the round trip by loading the file with `from_single_file` and comparing
weights and images.
"""

from __future__ import annotations

import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_G_PREFIX = "conditioner.embedders.1.model."  # base; the refiner uses embedders.0
OPEN_CLIP_G_REFINER_PREFIX = "conditioner.embedders.0.model."

_UNET_FIXED = {
    "time_embedding.linear_1.weight": "time_embed.0.weight",
    "time_embedding.linear_1.bias": "time_embed.0.bias",
    "time_embedding.linear_2.weight": "time_embed.2.weight",
    "time_embedding.linear_2.bias": "time_embed.2.bias",
    "conv_in.weight": "input_blocks.0.0.weight",
    "conv_in.bias": "input_blocks.0.0.bias",
    "conv_norm_out.weight": "out.0.weight",
    "conv_norm_out.bias": "out.0.bias",
    "conv_out.weight": "out.2.weight",
    "conv_out.bias": "out.2.bias",
    "add_embedding.linear_1.weight": "label_emb.0.0.weight",
    "add_embedding.linear_1.bias": "label_emb.0.0.bias",
    "add_embedding.linear_2.weight": "label_emb.0.2.weight",
    "add_embedding.linear_2.bias": "label_emb.0.2.bias",
}
_UNET_RESNET_NAMES = (
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"),
)
_VAE_FIXED = {
    "encoder.conv_norm_out.weight": "encoder.norm_out.weight",
    "encoder.conv_norm_out.bias": "encoder.norm_out.bias",
    "decoder.conv_norm_out.weight": "decoder.norm_out.weight",
    "decoder.conv_norm_out.bias": "decoder.norm_out.bias",
}
_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_resnet(rest: str) -> str:
    for diffusers_name, ldm_name in _UNET_RESNET_NAMES:
        if rest.startswith(diffusers_name + "."):
            return ldm_name + rest[len(diffusers_name):]
    raise ValueError(f"unexpected UNet resnet parameter {rest!r}")


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel weights -> `input_blocks/middle_block/output_blocks` keys."""
    layers = config["layers_per_block"]
    up_has_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in _UNET_FIXED:
            out[_UNET_FIXED[key]] = value
            continue
        if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = block * (layers + 1) + j + 1
            new = f"input_blocks.{index}.0.{_rename_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_rename_resnet(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = block * (layers + 1) + j
            new = f"output_blocks.{index}.0.{_rename_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
            block = int(m[1])
            slot = 2 if up_has_attention[block] else 1  # the upsampler follows the attention if any
            new = f"output_blocks.{block * (layers + 1) + layers}.{slot}.conv.{m[2]}"
        else:
            raise ValueError(f"no LDM name for UNet parameter {key!r}")
        out[new] = value
    return out


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """AutoencoderKL weights -> `encoder.down.i.block.j` / `decoder.up.i` keys (up blocks reversed)."""
    num_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in _VAE_FIXED:
            out[_VAE_FIXED[key]] = value
            continue
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION_NAMES[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and value.ndim == 2:
                value = value[:, :, None, None]  # the original layout stores 1x1 convolutions
        elif re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", key):
            new = key
        else:
            raise ValueError(f"no LDM name for VAE parameter {key!r}")
        out[new] = value.contiguous()
    return out


def clip_l_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights -> `transformer.text_model.*` (HF names, as SDXL files keep them)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("text_projection"):
            continue
        out[key if key.startswith("text_model.") else "text_model." + key] = value
    return out


def open_clip_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection weights -> OpenCLIP names (`transformer.resblocks.N`, fused qkv)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    fixed = {
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for key, value in state_dict.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()  # OpenCLIP multiplies x @ proj
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", key):
            fused.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key):
            rest = (m[2].replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
                    .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj")
                    .replace("self_attn.out_proj", "attn.out_proj"))
            out[f"transformer.resblocks.{m[1]}.{rest}"] = value
        elif key.endswith("position_ids"):
            continue
        else:
            raise ValueError(f"no OpenCLIP name for text encoder parameter {key!r}")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0).contiguous()
    return out


def sdxl_to_single_file(unet, vae, text_encoder, text_encoder_2) -> dict[str, torch.Tensor]:
    """One SDXL base pipeline's weights as one original-layout state dict."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in unet_to_ldm(unet.state_dict(), dict(unet.config)).items():
        tensors[UNET_PREFIX + key] = value
    for key, value in vae_to_ldm(vae.state_dict(), dict(vae.config)).items():
        tensors[VAE_PREFIX + key] = value
    for key, value in clip_l_to_ldm(text_encoder.state_dict()).items():
        tensors[CLIP_L_PREFIX + key] = value
    for key, value in open_clip_to_ldm(text_encoder_2.state_dict()).items():
        tensors[OPEN_CLIP_G_PREFIX + key] = value
    return {k: v.detach().contiguous().clone() for k, v in tensors.items()}


def sdxl_refiner_to_single_file(unet, vae, text_encoder_2) -> dict[str, torch.Tensor]:
    """One SDXL refiner's weights as one original-layout state dict: its only text encoder,
    OpenCLIP, is embedders.0 (as in sd_xl_refiner_1.0.safetensors)."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in unet_to_ldm(unet.state_dict(), dict(unet.config)).items():
        tensors[UNET_PREFIX + key] = value
    for key, value in vae_to_ldm(vae.state_dict(), dict(vae.config)).items():
        tensors[VAE_PREFIX + key] = value
    for key, value in open_clip_to_ldm(text_encoder_2.state_dict()).items():
        tensors[OPEN_CLIP_G_REFINER_PREFIX + key] = value
    return {k: v.detach().contiguous().clone() for k, v in tensors.items()}


CONTROLNET_PREFIX = "control_model."  # lllyasviel's ControlNet (cldm) checkpoints, SD 1.5 and SDXL


def controlnet_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """ControlNetModel weights -> the original ControlNet (cldm) layout under `control_model.`:
    the UNet-encoder half named as the UNet's (`time_embed`, `label_emb`, `input_blocks`,
    `middle_block`), `input_hint_block.{0,2,...,14}` (the condition embedding: conv_in, its
    blocks, conv_out), `zero_convs.N.0` and `middle_block_out.0`. diffusers' own converter
    (`loaders.single_file_utils.convert_controlnet_checkpoint`) is its inverse."""
    unet_part: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(weight|bias)", key):
            index = 0 if m[1] == "conv_in" else 14 if m[1] == "conv_out" else 2 * (int(m[2]) + 1)
            out[f"input_hint_block.{index}.{m[3]}"] = value
        elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(weight|bias)", key):
            out[f"zero_convs.{m[1]}.0.{m[2]}"] = value
        elif m := re.fullmatch(r"controlnet_mid_block\.(weight|bias)", key):
            out[f"middle_block_out.0.{m[1]}"] = value
        else:
            unet_part[key] = value
    # the encoder half has no up blocks: unet_to_ldm reads up_block_types only for those
    out.update(unet_to_ldm(unet_part, {**config, "up_block_types": ()}))
    return {CONTROLNET_PREFIX + k: v.detach().contiguous().clone() for k, v in out.items()}
