"""A canonical Job field path ("strength", "controlnets[1].image", "loras[0].path") -> the path
of the same field in the form the client sent (flat, nested or legacy), so an error found after
translation (by the broker's job rules or by the worker) names the field the client wrote.

Pure data: one table per form, plus the per-job `Job.sources` for the nested form's choices
(which of `data.controlnet` / `data.controlnets[i]` a ControlNet came from, which upscale
section was used).
"""

from __future__ import annotations

import re

from protocol import constants as C

_INDEXED = re.compile(r"^(loras|controlnets|textual_inversions)\[(\d+)\](?:\.(\w+))?$")

_NESTED_HYPER = "data.hyperparameters."
_LEGACY_HYPER = "prompt_submission.hyperparameters."
_LEGACY_COND = "prompt_submission.conditioning."

# canonical -> (flat, nested, legacy)
_SCALARS: dict[str, tuple[str, str, str]] = {
    "prompt": ("prompt", "data.prompt", _LEGACY_COND + "prompt"),
    "prompt_2": ("prompt_2", "data.prompt_2", _LEGACY_COND + "prompt_2"),
    "negative_prompt": ("negative_prompt", "data.negative_prompt", _LEGACY_COND + "negative_prompt"),
    "negative_prompt_2": ("negative_prompt_2", "data.negative_prompt_2",
                          _LEGACY_COND + "negative_prompt_2"),
    "models.base": ("model_base", "data.models.base", "prompt_submission.model.base"),
    "models.refiner": ("model_refiner", "data.models.refiner", "prompt_submission.model.refiner"),
    "models.vae": ("model_vae", "data.models.vae", "prompt_submission.model.vae"),
    "width": ("width", "data.dimensions.width", _LEGACY_HYPER + "width"),
    "height": ("height", "data.dimensions.height", _LEGACY_HYPER + "height"),
    "steps": ("steps", _NESTED_HYPER + "num_inference_steps", _LEGACY_HYPER + "steps"),
    "guidance_scale": ("guidance_scale", _NESTED_HYPER + "guidance_scale",
                       _LEGACY_HYPER + "guidance_scale"),
    "seed": ("seed", _NESTED_HYPER + "seed", _LEGACY_HYPER + "seed"),
    "strength": ("strength", _NESTED_HYPER + "strength", _LEGACY_HYPER + "strength"),
    "scheduler": ("scheduler", "data.scheduler", _LEGACY_HYPER + "scheduler"),
    "use_karras_sigmas": ("use_karras_sigmas", "data.use_karras_sigmas",
                          _LEGACY_HYPER + "use_karras_sigmas"),
    "clip_skip": ("clip_skip", _NESTED_HYPER + "clip_skip", _LEGACY_HYPER + "clip_skip"),
    "refiner_switch": ("refiner_switch", _NESTED_HYPER + "refiner_switch",
                       _LEGACY_HYPER + "refiner_switch"),
    "batch_size": ("batch_size", "data.batch.size", _LEGACY_HYPER + "batch_size"),
    "init_image": ("init_image", "data.init_image", _LEGACY_COND + "init_image"),
    "mask_image": ("mask_image", "data.mask_image", _LEGACY_COND + "mask_image"),
    "device": ("device", "data.device", "prompt_submission.metadata.device"),
    "timeout_s": ("timeout", "data.metadata.timeout", "prompt_submission.metadata.timeout"),
    "output.format": ("output_format", "data.output.format", "prompt_submission.output.format"),
    "output.quality": ("output_quality", "data.output.quality", "prompt_submission.output.quality"),
    "output.save_path": ("save_path", "data.output.save_path", "prompt_submission.output.save_path"),
    "postprocess.upscale_factor": ("upscale_factor", "{upscale}.factor",
                                   "prompt_submission.postprocessing.upscale_factor"),
    "postprocess.upscale_method": ("upscale_method", "{upscale}.method",
                                   "prompt_submission.postprocessing.upscale_method"),
    "postprocess.auto_contrast": ("auto_contrast", "data.postprocessing.auto_contrast",
                                  "prompt_submission.postprocessing.auto_contrast"),
}
for _name in ("dtype", "vae_dtype", "attention_slicing", "vae_slicing", "vae_tiling", "cpu_offload"):
    _SCALARS["precision." + _name] = (_name, "data.precision." + _name,
                                      "prompt_submission.precision." + _name)
# bare names the worker has always used
_ALIASES = {"upscale_factor": "postprocess.upscale_factor",
            "upscale_method": "postprocess.upscale_method", "save_path": "output.save_path",
            "output_format": "output.format", "dtype": "precision.dtype",
            "vae_dtype": "precision.vae_dtype", "model_base": "models.base",
            "model_refiner": "models.refiner", "model_vae": "models.vae"}

_FORM_INDEX = {C.FORM_FLAT: 0, C.FORM_NESTED: 1, C.FORM_LEGACY: 2}

# per list: the flat array of each item field ("" = the item as a whole), the nested list, the
# nested name of each item field, the legacy list
_FLAT_ITEMS = {
    "loras": {"": "lora_names", "name": "lora_names", "path": "lora_paths",
              "weight": "lora_weights"},
    "controlnets": {"": "controlnet_images", "image": "controlnet_images",
                    "type": "controlnet_types", "weight": "controlnet_weights",
                    "model": "controlnet_models", "preprocess": "controlnet_preprocess"},
    "textual_inversions": {"": "textual_inversion_names", "name": "textual_inversion_names",
                           "path": "textual_inversion_paths",
                           "token": "textual_inversion_tokens"},
}
_NESTED_LISTS = {"loras": "data.lora.models", "controlnets": "data.controlnets",
                 "textual_inversions": "data.textual_inversions"}
_NESTED_ITEM_NAMES = {"controlnets": {"image": "control_image", "weight": "conditioning_scale",
                                      "preprocess": "preprocessor.enabled"}}
_LEGACY_LISTS = {"loras": _LEGACY_COND + "loras", "controlnets": _LEGACY_COND + "controlnets",
                 "textual_inversions": _LEGACY_COND + "textual_inversions"}


def client_path(form: str, canonical: str, sources: dict[str, str] | None = None) -> str:
    """The path of `canonical` in `form`; unknown names come back as they are."""
    sources = sources or {}
    canonical = _ALIASES.get(canonical, canonical)
    index = _FORM_INDEX.get(form, 0)
    if form == C.FORM_NESTED and canonical in sources:
        return sources[canonical]
    if canonical in _SCALARS:
        path = _SCALARS[canonical][index]
        return path.replace("{upscale}", sources.get("upscale", "data.postprocessing.upscale"))
    match = _INDEXED.match(canonical)
    if not match:
        return canonical
    kind, i, item = match.group(1), int(match.group(2)), match.group(3) or ""
    if form == C.FORM_FLAT:
        array = _FLAT_ITEMS[kind].get(item)
        return f"{array}[{i}]" if array else canonical
    if form == C.FORM_NESTED:
        base = sources.get(f"{kind}[{i}]", f"{_NESTED_LISTS[kind]}[{i}]")
        name = _NESTED_ITEM_NAMES.get(kind, {}).get(item, item)
        return f"{base}.{name}" if name else base
    base = f"{_LEGACY_LISTS[kind]}[{i}]"
    return f"{base}.{item}" if item else base
