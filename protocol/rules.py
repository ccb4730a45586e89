"""Validation rules that span fields: parallel arrays of equal length, a base model somewhere,
an image for every ControlNet, a factor for enabled upscaling, init_image under mask_image.

They run on the raw body next to the pydantic field checks (protocol.models), so a request
with a bad field still hears about its other problems: every problem, never just the first.
Each check tolerates any type where it expects a list or a dict (pydantic reports those).
"""

from __future__ import annotations

from typing import Any, Optional

from protocol import constants as C
from protocol.errors import FieldError


# the words every error and docs/protocol.md use for a rule (one place for each)
MASK_NEEDS_INIT = "mask_image needs init_image (inpainting edits an image)"
REFINER_SWITCH_BOUNDS = (f"must be between {C.MIN_REFINER_SWITCH:g} and {C.MAX_REFINER_SWITCH:g}, "
                         "both excluded (the share of the steps the base runs before the refiner)")
SIZE_MULTIPLE = f"must be a multiple of {C.SIZE_MULTIPLE}"
UPSCALE_FACTOR_BOUNDS = f"must be 1.0-{C.MAX_UPSCALE_FACTOR:g}"
INPUT_PATH_ESCAPES = "an image path must stay under the input root (no '..')"
MODEL_PATH_ESCAPES = "a model path must stay under the model root (no '..')"


def _at(i: int, items: Optional[list]):
    return items[i] if items is not None and i < len(items) else None


def _is_list(v) -> bool:
    return isinstance(v, list)


def _get(d: Any, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _parallel(body: dict, names: tuple[str, ...], errors: list[FieldError]) -> None:
    lengths = {}
    for n in names:  # a plain loop: this runs three times per flat request
        v = body.get(n)
        if isinstance(v, list):
            lengths[n] = len(v)
    if len(lengths) > 1 and len(set(lengths.values())) > 1:
        shown = ", ".join(f"{n} ({k})" for n, k in lengths.items())
        errors.append(FieldError(",".join(lengths), f"parallel arrays differ in length: {shown}"))


def _null_items(body: dict, key: str, fallback: str, errors: list[FieldError], what: str) -> None:
    """Each item needs `key` or, when that item is null, `fallback` (e.g. a LoRA name or path)."""
    a, b = body.get(key), body.get(fallback)
    if isinstance(a, list) and None not in a and not (isinstance(b, list) and len(b) > len(a)):
        return  # every item has its key (the common case, checked without a loop)
    count = max(len(a) if _is_list(a) else 0, len(b) if _is_list(b) else 0)
    for i in range(count):
        if (_at(i, a) if _is_list(a) else None) is None and (_at(i, b) if _is_list(b) else None) is None:
            errors.append(FieldError(f"{key}[{i}]", f"each {what} needs a name or a path"))


def _mask_needs_init(mask, init, field: str, errors: list[FieldError]) -> None:
    if mask is not None and init is None:
        errors.append(FieldError(field, MASK_NEEDS_INIT))


def _usable(value, low: float, high: float, default):
    """`value` when it passes its own field check (a number within low..high; None: the
    default), else None: a bad field is reported by its own check, never twice."""
    if value is None:
        return default
    if type(value) in (int, float) and low <= value <= high:
        return value
    return None


def _steps_strength(init, steps, strength, field: str, errors: list[FieldError]) -> None:
    """The img2img rule (steps * strength >= 1) on the raw body, so a request hears about it
    together with its other problems."""
    if init is None:
        return
    steps = _usable(steps, C.MIN_STEPS, C.MAX_STEPS, C.DEFAULT_STEPS)
    strength = _usable(strength, 0.0, 1.0, C.DEFAULT_STRENGTH)
    if type(steps) is int and strength is not None and int(steps * strength) < 1:
        errors.append(FieldError(field, steps_strength_message(steps, strength)))


def _first(a, b):
    return a if a is not None else b


def cross_field_errors(message_type: str, body: dict, default_model_base: Optional[str]) -> list[FieldError]:
    errors: list[FieldError] = []
    if message_type == C.GENERATE_FLAT:
        if body.get("model_base") is None and not default_model_base:
            errors.append(FieldError("model_base", "base model is required"))
        _parallel(body, ("lora_names", "lora_paths", "lora_weights"), errors)
        _parallel(body, ("controlnet_types", "controlnet_images", "controlnet_weights",
                         "controlnet_models", "controlnet_preprocess"), errors)
        _parallel(body, ("textual_inversion_names", "textual_inversion_paths",
                         "textual_inversion_tokens"), errors)
        if _is_list(body.get("lora_weights")) and body["lora_weights"] and not (
                _is_list(body.get("lora_names")) or _is_list(body.get("lora_paths"))):
            errors.append(FieldError("lora_weights", "lora_weights given without lora_names or lora_paths"))
        _null_items(body, "lora_names", "lora_paths", errors, "LoRA")
        _null_items(body, "textual_inversion_names", "textual_inversion_paths", errors,
                    "textual inversion")
        cn_given = any(isinstance(v := body.get(n), list) and v
                       for n in ("controlnet_types", "controlnet_weights", "controlnet_models",
                                 "controlnet_preprocess"))
        if cn_given and not (_is_list(body.get("controlnet_images")) and body["controlnet_images"]):
            errors.append(FieldError("controlnet_images", "each ControlNet needs an image"))
        _mask_needs_init(body.get("mask_image"), body.get("init_image"), "mask_image", errors)
        _steps_strength(body.get("init_image"), body.get("steps"), body.get("strength"),
                        "strength", errors)
    elif message_type == C.GENERATE_NESTED:
        data = body.get("data")
        if not isinstance(data, dict):
            return errors
        if _get(data, "models", "base") is None and data.get("model_name") is None \
                and not default_model_base:
            errors.append(FieldError("data.models.base", "base model is required "
                                                         "(data.models.base or data.model_name)"))
        single = data.get("controlnet")
        if isinstance(single, dict) and single.get("enabled") is True \
                and single.get("control_image") is None:
            errors.append(FieldError("data.controlnet.control_image",
                                     "required when the ControlNet is enabled"))
        many = data.get("controlnets")
        if _is_list(many):
            for i, cn in enumerate(many):
                if isinstance(cn, dict) and cn.get("enabled") is not False \
                        and cn.get("control_image") is None:
                    errors.append(FieldError(f"data.controlnets[{i}].control_image",
                                             "each ControlNet needs an image"))
        for where in (("output", "upscale"), ("postprocessing", "upscale")):
            up = _get(data, *where)
            if isinstance(up, dict) and up.get("enabled") is True and up.get("factor") is None:
                errors.append(FieldError("data." + ".".join(where) + ".factor",
                                         "required when upscaling is enabled"))
        _mask_needs_init(data.get("mask_image"), data.get("init_image"), "data.mask_image", errors)
        hyper = data.get("hyperparameters")
        hyper = hyper if isinstance(hyper, dict) else {}
        # a flat data.strength overwrites hyperparameters.strength (the seed's normalisation)
        _steps_strength(data.get("init_image"),
                        _first(data.get("num_inference_steps"), hyper.get("num_inference_steps")),
                        _first(data.get("strength"), hyper.get("strength")),
                        "data.strength" if data.get("strength") is not None
                        else "data.hyperparameters.strength", errors)
    elif message_type == C.GENERATE_LEGACY_ACTION:
        ps = body.get("prompt_submission")
        if not isinstance(ps, dict):
            return errors
        if _get(ps, "model", "base") is None and not default_model_base:
            errors.append(FieldError("prompt_submission.model.base", "base model is required"))
        loras = _get(ps, "conditioning", "loras")
        if _is_list(loras):
            for i, lora in enumerate(loras):
                if isinstance(lora, dict) and lora.get("name") is None and lora.get("path") is None:
                    errors.append(FieldError(f"prompt_submission.conditioning.loras[{i}]",
                                             "each LoRA needs a name or a path"))
        cond = ps.get("conditioning")
        if isinstance(cond, dict):
            _mask_needs_init(cond.get("mask_image"), cond.get("init_image"),
                             "prompt_submission.conditioning.mask_image", errors)
            hyper = ps.get("hyperparameters")
            hyper = hyper if isinstance(hyper, dict) else {}
            _steps_strength(cond.get("init_image"),
                            _first(hyper.get("steps"), hyper.get("num_inference_steps")),
                            hyper.get("strength"), "prompt_submission.hyperparameters.strength",
                            errors)
    elif message_type in (C.MODEL_LOAD, C.MODEL_LOAD_LEGACY):
        if _get(body, "data", "model_name") is None and body.get("model_name") is None:
            errors.append(FieldError("data.model_name", "model_name is required"))
    elif message_type == C.CANCEL:
        if _get(body, "data", "request_id") is None and body.get("request_id") is None:
            errors.append(FieldError("request_id", "the request_id of the job to cancel is required"))
    return errors


# --- rules on the canonical job: the broker runs them before queueing (fields named as the
# client wrote them), the worker runs the same ones again before it starts (a journal or another
# broker may hand it an older job) -----------------------------------------------------------

def min_steps(strength: float) -> int:
    """Fewest steps with int(steps * strength) >= 1, as diffusers counts them."""
    if strength <= 0:
        return 0  # no step count helps; the message says to raise strength
    steps = max(1, int(1 / strength))
    while int(steps * strength) < 1:
        steps += 1
    return steps


def steps_strength_message(steps: int, strength: float) -> str:
    hint = (f"raise steps to at least {min_steps(strength)} or raise strength"
            if strength > 0 else "raise strength above 0")
    return (f"strength {strength:g} x steps {steps} leaves no denoising step "
            f"(needs steps * strength >= 1); {hint}")


def job_problems(job) -> list[tuple[str, str]]:
    """(canonical field path, message) for every rule a valid-looking job still breaks."""
    problems: list[tuple[str, str]] = []
    if job.init_image is not None and int(job.steps * job.strength) < 1:
        problems.append(("strength", steps_strength_message(job.steps, job.strength)))
    if job.mask_image is not None and job.init_image is None:
        problems.append(("mask_image", MASK_NEEDS_INIT))
    if job.models.refiner and not 0.0 < job.refiner_switch < 1.0:
        problems.append(("refiner_switch", REFINER_SWITCH_BOUNDS))
    for name in ("width", "height"):
        value = getattr(job, name)
        if value % C.SIZE_MULTIPLE:  # the 256-2048 bounds are the broker's field checks
            problems.append((name, SIZE_MULTIPLE))
    if not C.MIN_BATCH <= job.batch_size <= C.MAX_BATCH:
        problems.append(("batch_size", f"must be {C.MIN_BATCH}-{C.MAX_BATCH}"))
    factor = job.postprocess.upscale_factor
    if factor is not None and not 1.0 <= factor <= C.MAX_UPSCALE_FACTOR:
        problems.append(("postprocess.upscale_factor", UPSCALE_FACTOR_BOUNDS))
    return problems


def job_field_errors(job) -> list[FieldError]:
    """job_problems with each field named as the client's form spells it."""
    return [FieldError(job.client_path(name), message) for name, message in job_problems(job)]
