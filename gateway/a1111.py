"""The AUTOMATIC1111 web UI API (`/sdapi/v1/*`) as the broker's nested `inference_request`.

Request models keep A1111's field names and defaults (what `webuiapi` and the tools built on
the A1111 API send); fields this product has no use for (restore_faces, subseeds, styles, ...)
are accepted and reported back in `info.warnings` when they would have changed the image.
LoRAs come from the prompt's `<lora:name:weight>` tags, as in A1111; ControlNet units from
`alwayson_scripts.controlnet.args`; `enable_hr` becomes the postprocessing upscaler (and a
refiner pass when `hr_checkpoint_name` names one); `refiner_checkpoint` / `refiner_switch_at`
map to the refiner directly.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from protocol import constants as C
from protocol import normalize

DEFAULT_SAMPLER = "Euler a"  # A1111's default sampler_name
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([-+]?[0-9]*\.?[0-9]+))?(?::[^>]*)?>", re.IGNORECASE)
_MODEL_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")  # "name [abcd1234]" as A1111 titles models


class _A1111(BaseModel):
    model_config = ConfigDict(extra="allow")


class GenerationParams(_A1111):
    """Fields txt2img and img2img share (A1111's StableDiffusionProcessing API models)."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = None  # deprecated spelling of sampler_name
    scheduler: Optional[str] = None  # A1111 1.9+ "schedule type": automatic, karras, ...
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: Optional[float] = None
    denoising_strength: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)


class Txt2ImgRequest(GenerationParams):
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: Optional[str] = None
    firstphase_width: int = 0
    firstphase_height: int = 0


class Img2ImgRequest(GenerationParams):
    init_images: list[str] = Field(default_factory=list)
    resize_mode: int = 0
    denoising_strength: Optional[float] = 0.75
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur: Optional[int] = None
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: Optional[float] = None
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    """A1111's TextToImageResponse / ImageToImageResponse."""

    images: list[str] = Field(default_factory=list, description="base64 PNGs (or the requested format)")
    parameters: dict[str, Any] = Field(default_factory=dict)
    info: str = Field("", description="JSON text: seed, all_seeds, sampler, model, ...")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float = 0.0
    eta_relative: float = 0.0
    state: ProgressState = Field(default_factory=ProgressState)
    current_image: Optional[str] = None
    textinfo: Optional[str] = None


# --- request -> inference_request ----------------------------------------------------------------

def _strip_hash(name: Optional[str]) -> Optional[str]:
    """"tiny-sdxl [0123abcd]" -> "tiny-sdxl"; "tiny-sdxl.safetensors" -> "tiny-sdxl"."""
    if not name:
        return None
    name = _MODEL_HASH.sub("", name.strip())
    for suffix in (".safetensors", ".ckpt"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name or None


def _loras_from_prompt(prompt: str) -> tuple[str, list[dict]]:
    loras = [{"name": m.group(1).strip(), "weight": float(m.group(2)) if m.group(2) else 1.0}
             for m in _LORA_TAG.finditer(prompt)]
    return _LORA_TAG.sub("", prompt).strip(), loras


def _sampler(params: GenerationParams) -> tuple[Optional[str], Optional[bool]]:
    name = params.sampler_name or params.sampler_index or DEFAULT_SAMPLER
    karras = None
    schedule = (params.scheduler or "").strip().lower()
    if schedule == "karras":
        karras = True
    elif schedule not in ("", "automatic"):
        karras = False
    return name, karras


def _controlnet_type(module: str, model: Optional[str]) -> str:
    low = (module or "").lower()
    for kind, words in (("canny", ("canny",)), ("depth", ("depth",)), ("pose", ("openpose", "pose")),
                        ("scribble", ("scribble",)), ("normal", ("normal",)), ("seg", ("seg",)),
                        ("lineart", ("lineart",))):
        if any(word in low for word in words):
            return kind
    return normalize.infer_controlnet_type(model)


def _controlnets(scripts: dict, warnings: list[str]) -> list[dict]:
    """alwayson_scripts.controlnet (any spelling) -> nested `controlnets[]`."""
    units = []
    for key, value in (scripts or {}).items():
        if key.lower() != "controlnet" or not isinstance(value, dict):
            continue
        for unit in value.get("args") or []:
            if not isinstance(unit, dict) or unit.get("enabled") is False:
                continue
            image = unit.get("image") or unit.get("input_image")
            if isinstance(image, dict):  # {"image": b64, "mask": b64} in some versions
                image = image.get("image")
            if not image:
                warnings.append("a ControlNet unit without an image was skipped")
                continue
            module = str(unit.get("module") or "none")
            model = _strip_hash(unit.get("model")) if str(unit.get("model") or "none").lower() != "none" else None
            units.append({
                "enabled": True, "type": _controlnet_type(module, model), "control_image": image,
                "conditioning_scale": float(unit.get("weight", 1.0)), "model": model,
                # "none" means the image already is a control map
                "preprocessor": {"enabled": module.lower() not in ("none", ""),
                                 "resolution": int(unit.get("processor_res") or 512)}})
    return units


def _upscale_method(name: Optional[str]) -> str:
    low = (name or "").lower()
    return "realesrgan" if "esrgan" in low else "lanczos"


_IGNORED_IF_SET = ("restore_faces", "tiling")


def preview_every_steps(value: Any) -> Optional[int]:
    """A1111's `show_progress_every_n_steps` option as preview_every_steps: a positive number
    of steps (capped at the most a job may have); anything else (A1111's -1, "only at the
    end", or a bad value) leaves the worker's default."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
        return None
    return min(int(value), C.MAX_PREVIEW_EVERY_STEPS)


def to_inference_request(params: GenerationParams, *, request_id: str, default_model: Optional[str],
                         init_images: Optional[list[str]] = None, mask: Optional[str] = None,
                         invert_mask: bool = False, options: Optional[dict] = None) -> tuple[dict, list[str]]:
    """(nested inference_request body, warnings about A1111 fields that do not apply).
    `options`: the gateway's /sdapi/v1/options (show_progress_every_n_steps sets the preview
    cadence; override_settings wins, as for the checkpoint)."""
    warnings: list[str] = []
    prompt, loras = _loras_from_prompt(params.prompt)
    override = params.override_settings or {}
    model = _strip_hash(override.get("sd_model_checkpoint")) or default_model
    sampler, karras = _sampler(params)
    for name in _IGNORED_IF_SET:
        if getattr(params, name):
            warnings.append(f"{name} is not supported and was ignored")
    if params.subseed_strength:
        warnings.append("subseed_strength is not supported and was ignored")
    if params.styles:
        warnings.append("styles are not supported and were ignored")
    batch = max(1, params.batch_size) * max(1, params.n_iter)
    hyper: dict[str, Any] = {"num_inference_steps": params.steps, "guidance_scale": params.cfg_scale,
                             "seed": params.seed}
    data: dict[str, Any] = {
        "prompt": prompt, "negative_prompt": params.negative_prompt,
        "models": {"base": model}, "scheduler": sampler,
        "dimensions": {"width": params.width, "height": params.height},
        "batch": {"size": batch}, "output": {"format": "png", "return_images": params.send_images},
        "metadata": {"preview": True},
    }
    every = preview_every_steps(override.get("show_progress_every_n_steps",
                                             (options or {}).get("show_progress_every_n_steps")))
    if every is not None:
        data["metadata"]["preview_every_steps"] = every
    if karras is not None:
        data["use_karras_sigmas"] = karras
    if loras:
        data["lora"] = {"enabled": True, "models": loras}
    controlnets = _controlnets(params.alwayson_scripts, warnings)
    if controlnets:
        data["controlnets"] = controlnets
    refiner = _strip_hash(params.refiner_checkpoint) if params.refiner_checkpoint not in (None, "", "None") else None
    if refiner:
        data["models"]["refiner"] = refiner
        if params.refiner_switch_at is not None:
            hyper["refiner_switch"] = params.refiner_switch_at
    if isinstance(params, Txt2ImgRequest) and params.enable_hr:
        factor = params.hr_scale
        if params.hr_resize_x and params.width:
            factor = params.hr_resize_x / params.width
        data["postprocessing"] = {"upscale": {"enabled": True, "factor": factor,
                                              "method": _upscale_method(params.hr_upscaler)}}
        hr_model = params.hr_checkpoint_name
        if hr_model and hr_model.lower() not in ("use same checkpoint", "none") and not refiner:
            data["models"]["refiner"] = _strip_hash(hr_model)  # the second pass as a refiner
        warnings.append("enable_hr: the image is upscaled after generation "
                        f"(x{factor:g}, {_upscale_method(params.hr_upscaler)})"
                        + (" and refined by the hr checkpoint" if data["models"].get("refiner") else ""))
    if init_images:
        data["init_image"] = init_images[0]
        if len(init_images) > 1:
            warnings.append("only the first of init_images is used")
        if params.denoising_strength is not None:
            hyper["strength"] = params.denoising_strength
    if mask:
        data["mask_image"] = invert(mask) if invert_mask else mask
    data["hyperparameters"] = hyper
    body = {"message_type": C.GENERATE_NESTED, "request_id": request_id, "stream": True,
            "preview": True, "data": data}
    return body, warnings


def invert(image_b64: str) -> str:
    """inpainting_mask_invert=1: the mask with black and white swapped, as base64 PNG."""
    from PIL import Image, ImageOps

    raw = image_b64.split(",", 1)[1] if image_b64.startswith("data:") else image_b64
    with Image.open(io.BytesIO(base64.b64decode(raw))) as image:
        inverted = ImageOps.invert(image.convert("L"))
    buffer = io.BytesIO()
    inverted.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --- final reply -> A1111 response ------------------------------------------------------------

def to_response(params: GenerationParams, body: dict, reply: dict, warnings: list[str]) -> dict:
    data = reply.get("data") or {}
    images = data.get("generated_images") or []
    encoded = []
    for item in images:
        image = item.get("image")
        if isinstance(image, (bytes, bytearray)):
            image = base64.b64encode(image).decode("ascii")
        if image:
            encoded.append(image)
    seeds = [item.get("seed") for item in images]
    nested = body["data"]
    metrics = data.get("processing_metrics") or {}
    info = {
        "prompt": params.prompt, "negative_prompt": params.negative_prompt,
        "all_prompts": [params.prompt] * len(images),
        "seed": seeds[0] if seeds else params.seed, "all_seeds": seeds,
        "subseed": params.subseed, "all_subseeds": [params.subseed] * len(images),
        "width": images[0].get("width") if images else params.width,
        "height": images[0].get("height") if images else params.height,
        "sampler_name": nested.get("scheduler"), "cfg_scale": params.cfg_scale,
        "steps": params.steps, "batch_size": nested["batch"]["size"],
        "sd_model_name": nested["models"]["base"], "denoising_strength": params.denoising_strength,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "infotexts": [item.get("infotext", "") for item in images],
        "request_id": reply.get("request_id"), "paths": [item.get("path") for item in images],
        "worker_id": metrics.get("worker_id"), "device_name": metrics.get("device_name"),
        "features_used": list(data.get("features_used") or []),
        "warnings": [*warnings, *(reply.get("warnings") or [])],
    }
    parameters = params.model_dump(mode="json")
    for key in ("init_images", "mask"):
        parameters.pop(key, None)  # A1111 sends them back; they would double the response
    return {"images": encoded, "parameters": parameters, "info": json.dumps(info)}


def progress_response(job, *, skip_current_image: bool = False, queued: int = 0) -> dict:
    """/sdapi/v1/progress for the most recent A1111 job (or an idle answer)."""
    if job is None:
        return ProgressResponse().model_dump()
    p = job.progress or {}
    step, total = int(p.get("step") or 0), int(p.get("total_steps") or 0)
    stage = p.get("stage", "queued")
    done = job.final is not None
    fraction = 1.0 if done else (step / total if total and stage in ("denoising", "refining") else 0.0)
    if stage == "postprocessing" and not done:
        fraction = 0.99
    image = None
    if job.preview is not None and not skip_current_image:
        image = base64.b64encode(job.preview).decode("ascii")
    return ProgressResponse(
        progress=fraction, eta_relative=float(p.get("eta_s") or 0.0),
        state=ProgressState(job=job.request_id if not done else "", job_count=0 if done else 1 + queued,
                            job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_s)),
                            sampling_step=step, sampling_steps=total,
                            interrupted=bool(done and job.final.get("error_code") == C.CANCELLED)),
        current_image=image, textinfo=stage if not done else None).model_dump()
