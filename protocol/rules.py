"""Validation rules that span fields: parallel arrays of equal length, a base model somewhere,
an image for every ControlNet, a factor for enabled upscaling, init_image under mask_image,
enough steps for the img2img strength. Their words are in protocol.rule_texts.

cross_field_errors runs on the raw body next to the pydantic field checks (protocol.models), so a
request with a bad field still hears about its other problems: every problem, never just the
first. Each check tolerates any type where it expects a list or a dict (pydantic reports those).
job_problems is the worker's check of the same rules on a canonical Job; pool_upscaler says
which upscaler name the broker checks against what the live workers report.
"""

from __future__ import annotations

from typing import Any, Optional

from protocol import constants as C
from protocol import rule_texts as R
from protocol.errors import FieldError

# the words of these rules live in protocol.rule_texts (with every other rule's); short names
# for the ones tests and callers use most
MASK_NEEDS_INIT = R.MASK_NEEDS_INIT.message
INPUT_PATH_ESCAPES = R.INPUT_PATH_ESCAPES.message
MODEL_PATH_ESCAPES = R.MODEL_PATH_ESCAPES.message


def _at(i: int, items: Optional[list]):
    return items[i] if items is not None and i < len(items) else None


def _is_list(v) -> bool:
    return isinstance(v, list)


def _nonempty_list(v) -> bool:
    return isinstance(v, list) and len(v) > 0


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
        errors.append(FieldError(",".join(lengths), R.PARALLEL_ARRAYS(lengths=shown)))


def _null_items(body: dict, key: str, fallback: str, errors: list[FieldError], rule: R.Rule) -> None:
    """Each item needs `key` or, when that item is null, `fallback` (e.g. a LoRA name or path)."""
    a, b = body.get(key), body.get(fallback)
    if isinstance(a, list) and None not in a and not (isinstance(b, list) and len(b) > len(a)):
        return  # every item has its key (the common case, checked without a loop)
    count = max(len(a) if _is_list(a) else 0, len(b) if _is_list(b) else 0)
    for i in range(count):
        if (_at(i, a) if _is_list(a) else None) is None and (_at(i, b) if _is_list(b) else None) is None:
            errors.append(FieldError(f"{key}[{i}]", rule.message))


def _mask_needs_init(mask, init, field: str, errors: list[FieldError]) -> None:
    if mask is not None and init is None:
        errors.append(FieldError(field, R.MASK_NEEDS_INIT.message))


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
            errors.append(FieldError("model_base", R.BASE_REQUIRED.message))
        _parallel(body, ("lora_names", "lora_paths", "lora_weights"), errors)
        _parallel(body, ("controlnet_types", "controlnet_images", "controlnet_weights",
                         "controlnet_models", "controlnet_preprocess"), errors)
        _parallel(body, ("textual_inversion_names", "textual_inversion_paths",
                         "textual_inversion_tokens"), errors)
        if _is_list(body.get("lora_weights")) and body["lora_weights"] and not (
                _is_list(body.get("lora_names")) or _is_list(body.get("lora_paths"))):
            errors.append(FieldError("lora_weights", R.LORA_WEIGHTS_ALONE.message))
        _null_items(body, "lora_names", "lora_paths", errors, R.LORA_NAME_OR_PATH)
        _null_items(body, "textual_inversion_names", "textual_inversion_paths", errors,
                    R.TI_NAME_OR_PATH)
        images = body.get("controlnet_images")
        if not (_is_list(images) and images) and (  # an `or` chain: no generator per request
                _nonempty_list(body.get("controlnet_types"))
                or _nonempty_list(body.get("controlnet_weights"))
                or _nonempty_list(body.get("controlnet_models"))
                or _nonempty_list(body.get("controlnet_preprocess"))):
            errors.append(FieldError("controlnet_images", R.CONTROLNET_IMAGE.message))
        init = body.get("init_image")
        if init is None:
            _mask_needs_init(body.get("mask_image"), init, "mask_image", errors)
        else:
            _steps_strength(init, body.get("steps"), body.get("strength"), "strength", errors)
    elif message_type == C.GENERATE_NESTED:
        data = body.get("data")
        if not isinstance(data, dict):
            return errors
        models = data.get("models")
        if (models.get("base") if isinstance(models, dict) else None) is None \
                and data.get("model_name") is None and not default_model_base:
            errors.append(FieldError("data.models.base", R.BASE_REQUIRED.message))
        single = data.get("controlnet")
        if isinstance(single, dict) and single.get("enabled") is True \
                and single.get("control_image") is None:
            errors.append(FieldError("data.controlnet.control_image", R.CONTROLNET_IMAGE.message))
        many = data.get("controlnets")
        if _is_list(many):
            for i, cn in enumerate(many):
                if isinstance(cn, dict) and cn.get("enabled") is not False \
                        and cn.get("control_image") is None:
                    errors.append(FieldError(f"data.controlnets[{i}].control_image",
                                             R.CONTROLNET_IMAGE.message))
        for section in ("output", "postprocessing"):
            part = data.get(section)
            up = part.get("upscale") if isinstance(part, dict) else None
            if isinstance(up, dict) and up.get("enabled") is True and up.get("factor") is None:
                errors.append(FieldError(f"data.{section}.upscale.factor",
                                         R.UPSCALE_NEEDS_FACTOR.message))
        init = data.get("init_image")
        if init is None:
            _mask_needs_init(data.get("mask_image"), init, "data.mask_image", errors)
        else:
            hyper = data.get("hyperparameters")
            hyper = hyper if isinstance(hyper, dict) else {}
            # a flat data.strength overwrites hyperparameters.strength (the seed's normalisation)
            _steps_strength(init,
                            _first(data.get("num_inference_steps"), hyper.get("num_inference_steps")),
                            _first(data.get("strength"), hyper.get("strength")),
                            "data.strength" if data.get("strength") is not None
                            else "data.hyperparameters.strength", errors)
    elif message_type == C.GENERATE_LEGACY_ACTION:
        ps = body.get("prompt_submission")
        if not isinstance(ps, dict):
            return errors
        if _get(ps, "model", "base") is None and not default_model_base:
            errors.append(FieldError("prompt_submission.model.base", R.BASE_REQUIRED.message))
        loras = _get(ps, "conditioning", "loras")
        if _is_list(loras):
            for i, lora in enumerate(loras):
                if isinstance(lora, dict) and lora.get("name") is None and lora.get("path") is None:
                    errors.append(FieldError(f"prompt_submission.conditioning.loras[{i}]",
                                             R.LORA_NAME_OR_PATH.message))
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
            errors.append(FieldError("data.model_name", R.MODEL_NAME_REQUIRED.message))
    elif message_type == C.CANCEL:
        if _get(body, "data", "request_id") is None and body.get("request_id") is None:
            errors.append(FieldError("request_id", R.CANCEL_TARGET_REQUIRED.message))
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
    return R.STEPS_STRENGTH(strength=f"{strength:g}", steps=steps, hint=hint)


def job_problems(job) -> list[tuple[str, str]]:
    """(canonical field path, message) for every rule a valid-looking job still breaks."""
    problems: list[tuple[str, str]] = []
    if job.init_image is not None and int(job.steps * job.strength) < 1:
        problems.append(("strength", steps_strength_message(job.steps, job.strength)))
    if job.mask_image is not None and job.init_image is None:
        problems.append(("mask_image", R.MASK_NEEDS_INIT.message))
    if job.models.refiner and not C.MIN_REFINER_SWITCH < job.refiner_switch < C.MAX_REFINER_SWITCH:
        problems.append(("refiner_switch", R.REFINER_SWITCH.message))
    for name in ("width", "height"):
        value = getattr(job, name)
        if value % C.SIZE_MULTIPLE:  # the 256-2048 bounds are the broker's field checks
            problems.append((name, R.SIZE.message))  # (worker tests run 128x128 jobs directly)
    if not C.MIN_BATCH <= job.batch_size <= C.MAX_BATCH:
        problems.append(("batch_size", R.BATCH.message))
    factor = job.postprocess.upscale_factor
    if factor is not None and not 1.0 <= factor <= C.MAX_UPSCALE_FACTOR:
        problems.append(("postprocess.upscale_factor", R.UPSCALE_FACTOR.message))
    return problems


def pool_upscaler(job) -> Optional[str]:
    """The upscaler name a job needs some live worker to report (Telemetry.upscalers), or None
    when it needs none or only the worker can tell: no upscaling, `lanczos` (built in), or a
    path (a folder or a weight suffix: a file on the worker's disk). The default's aliases
    become "realesrgan"."""
    factor = job.postprocess.upscale_factor
    if not factor or factor == 1:
        return None
    method = (job.postprocess.upscale_method or C.DEFAULT_UPSCALE_METHOD).strip()
    low = method.lower()
    if low in C.UPSCALE_METHODS or low in C.UPSCALE_METHOD_ALIASES:
        return None if low == C.DEFAULT_UPSCALE_METHOD else C.UPSCALE_METHODS[1]
    if "/" in method or "\\" in method or low.endswith((".safetensors", ".pth")):
        return None
    return method

