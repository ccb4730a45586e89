"""Loading a ControlNet from one `.safetensors` file (no diffusers folder beside it).

diffusers' `ControlNetModel.from_single_file(path, config=FOLDER)` converts the original
ControlNet (cldm) layout with its own converter (`loaders.single_file_utils.
convert_controlnet_checkpoint`) and loads diffusers-layout files as they are. Its converter
(diffusers 0.42.1) maps no `label_emb` to `add_embedding`: an SDXL ControlNet in the original
layout would keep those four tensors unset (on the meta device: "Cannot copy out of meta
tensor"). So such a file loads with real initial weights (low_cpu_mem_usage=False) and its
`label_emb.0.{0,2}` tensors are then copied into `add_embedding.linear_{1,2}`, the same renaming
diffusers applies to SDXL UNets (`DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]`).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# add_embedding parameter -> its name in the original layout (without `control_model.`)
_ADD_EMBEDDING = {"linear_1.weight": "label_emb.0.0.weight", "linear_1.bias": "label_emb.0.0.bias",
                  "linear_2.weight": "label_emb.0.2.weight", "linear_2.bias": "label_emb.0.2.bias"}


def load_controlnet_file(path: str, config: str | None, dtype):
    """A ControlNetModel from a single file; `config` is a folder with its config.json (None:
    diffusers finds one in the Hugging Face cache/hub, which the resolver allows only online)."""
    import torch
    from diffusers import ControlNetModel
    from safetensors import safe_open

    from gpu_worker import single_file_configs

    kwargs = {"config": config, "local_files_only": True} if config else {}
    with safe_open(path, framework="pt") as handle:
        keys = list(handle.keys())
        prefix = single_file_configs.CONTROLNET_LDM if any(
            k.startswith(single_file_configs.CONTROLNET_LDM) for k in keys) else ""
        label_emb = {name: handle.get_tensor(prefix + ldm) for name, ldm in _ADD_EMBEDDING.items()
                     if prefix + ldm in keys}
        original = any(k.startswith(prefix + "input_hint_block.") for k in keys)
    if not (original and label_emb):
        return ControlNetModel.from_single_file(path, dtype=dtype, **kwargs)
    model = ControlNetModel.from_single_file(path, dtype=dtype, low_cpu_mem_usage=False, **kwargs)
    if getattr(model, "add_embedding", None) is None or len(label_emb) != len(_ADD_EMBEDDING):
        raise ValueError(f"{path}: its text-time embedding (label_emb) does not fit the config")
    with torch.no_grad():
        model.add_embedding.load_state_dict({k: v.to(dtype) for k, v in label_emb.items()})
    log.debug("%s: label_emb copied into add_embedding (diffusers' converter skips it)", path)
    return model
