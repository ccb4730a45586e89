"""Translation between the client forms and the canonical Job.

Forms -> Job: `flat_to_job`, `nested_to_job`, `legacy_to_job` take a model already validated
by protocol.models (field rules) and checked by protocol.rules (rules spanning fields).
Job -> forms: `job_to_legacy` (the first seed's `prompt_submission`, only what the client set),
`job_to_nested` (the Phase 6 C# transformer's shape with its defaults), `job_to_flat`.
"""

from __future__ import annotations

import operator
import uuid
from typing import Any, Optional

from protocol import constants as C
from protocol import models as M
from protocol import normalize
from protocol.job import ControlNetSpec, Job

# Job fields the legacy view's `hyperparameters` carries, in this order, when the client set them
LEGACY_HYPERPARAMETERS = ("width", "height", "steps", "guidance_scale", "seed", "strength",
                          "scheduler", "use_karras_sigmas", "clip_skip", "refiner_switch",
                          "batch_size")
_OUTPUT_FIELDS = ("format", "quality", "save_path", "return_images")
_POSTPROCESS_FIELDS = ("auto_contrast", "upscale_factor", "upscale_method")
_PRECISION_FIELDS = ("dtype", "vae_dtype", "attention_slicing", "vae_slicing", "vae_tiling",
                     "cpu_offload")

_SECTIONS = ("output", "postprocess", "precision")
# "section.field" as Job.explicit spells it, built once rather than per request
_EXPLICIT_NAMES = {section: {name: f"{section}.{name}" for name in names} for section, names in (
    ("output", _OUTPUT_FIELDS), ("postprocess", _POSTPROCESS_FIELDS),
    ("precision", _PRECISION_FIELDS))}


# absent sections read as empty ones; built once (frozen) because a model per request costs
_EMPTY = {cls: cls() for cls in (M.NestedHyperparameters, M.NestedDimensions, M.NestedModels,
                                 M.NestedMetadata, M.NestedOutput, M.NestedPostprocessing,
                                 M.LegacyModel, M.LegacyHyperparameters, M.LegacyMetadata)}


def new_request_id() -> str:
    return uuid.uuid4().hex


class _JobBuilder:
    """Collects Job fields and records which ones the client set (Job.explicit)."""

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}
        self.sections: dict[str, dict[str, Any]] = {"output": {}, "postprocess": {},
                                                    "precision": {}}  # _SECTIONS, as a literal
        self.explicit: set[str] = set()

    def set(self, name: str, value: Any) -> None:
        if value is not None:
            self.fields[name] = value
            self.explicit.add(name)

    # plain loops rather than comprehensions here: on Python 3.11 a comprehension is a call,
    # and these run several times per request
    def update(self, values: dict[str, Any]) -> None:
        """set() for many fields at once (one dict, fewer calls: this runs per request)."""
        fields, explicit = self.fields, self.explicit
        for name, value in values.items():
            if value is not None:
                fields[name] = value
                explicit.add(name)

    def update_in(self, section: str, values: dict[str, Any]) -> None:
        target, spelled = self.sections[section], _EXPLICIT_NAMES[section]
        for name, value in values.items():
            if value is not None:
                target[name] = value
                self.explicit.add(spelled[name])

    def copy(self, values: dict[str, Any], names: tuple[str, ...]) -> None:
        """update() for fields a request model names as the Job does; `values` is the model's
        __dict__ (its validated fields), read in a plain loop."""
        fields, explicit = self.fields, self.explicit
        for name in names:
            value = values[name]
            if value is not None:
                fields[name] = value
                explicit.add(name)

    def copy_in(self, section: str, values: dict[str, Any], names: tuple[str, ...]) -> None:
        """update_in() for fields a request model names as the Job section does; `values` is
        the model's __dict__ (its validated fields), read in a plain loop."""
        target, spelled = self.sections[section], _EXPLICIT_NAMES[section]
        for name in names:
            value = values[name]
            if value is not None:
                target[name] = value
                self.explicit.add(spelled[name])

    def set_scheduler(self, name: Optional[str], karras: Optional[bool]) -> None:
        if name is not None:
            cls, alias_karras = normalize.resolve_scheduler(name)
            self.set("scheduler", cls)
            if karras is None and alias_karras is not None:
                karras = alias_karras  # "DPM++ 2M Karras" means Karras sigmas unless told otherwise
        self.set("use_karras_sigmas", karras)

    def build(self, *, form: str, request_id: str, prompt: str, base: str,
              refiner: Optional[str], vae: Optional[str], worker_type: Optional[str] = None) -> Job:
        f = self.fields
        f["request_id"] = request_id
        f["form"] = form
        f["prompt"] = prompt
        f["models"] = {"base": base, "refiner": refiner, "vae": vae}
        for name in _SECTIONS:
            if self.sections[name]:
                f[name] = self.sections[name]
        if worker_type is None:
            post = self.sections["postprocess"]
            factor = post.get("upscale_factor")
            worker_type = normalize.resolve_worker_type(
                loras=bool(f.get("loras")), controlnets=bool(f.get("controlnets")),
                refiner=bool(refiner), vae=bool(vae),
                postprocessing=bool(post.get("auto_contrast")) or (factor not in (None, 1, 1.0)),
                batch_size=f.get("batch_size", 1),
                textual_inversions=bool(f.get("textual_inversions")),
                init_image=f.get("init_image") is not None,
                width=f.get("width", C.DEFAULT_SIZE), height=f.get("height", C.DEFAULT_SIZE))
        else:
            self.explicit.add("worker_type")
        f["worker_type"] = worker_type
        f["explicit"] = frozenset(self.explicit)
        # one validation of plain dicts (pydantic's core) is cheaper than a model per LoRA
        return Job.model_validate(f)


def _padded(items, count: int):
    """items with None appended up to count (a parallel array the client sent shorter or not
    at all)."""
    return items if len(items) >= count else [*items, *([None] * (count - len(items)))]


_DELIVERY_FIELDS = ("stream", "preview", "preview_size", "preview_every_steps", "preview_interval_ms")
_delivery_values = operator.itemgetter(*_DELIVERY_FIELDS)  # one C call per source, per request
_NOT_GIVEN = (None,) * len(_DELIVERY_FIELDS)


def _delivery(*sources) -> dict[str, Any]:
    """Job.stream / preview / preview_size / preview cadence from a form's delivery fields,
    each from the first of `sources` (the top level, then the form's metadata) that sets it:
    `stream: "preview"` or `preview: true` asks for previews, and previews imply progress."""
    values = _delivery_values(sources[0].__dict__)
    for source in sources[1:]:
        if values == _NOT_GIVEN:  # the usual case: the next source decides them all
            values = _delivery_values(source.__dict__)
        elif None in values:
            values = tuple(v if v is not None else o
                           for v, o in zip(values, _delivery_values(source.__dict__)))
    given = dict(zip(_DELIVERY_FIELDS, values))
    if given["preview"] is True or given["stream"] == C.STREAM_PREVIEW:
        given["stream"] = given["preview"] = True
    return given


# --- forms -> Job ------------------------------------------------------------------------------

# flat fields that keep their name in the Job
_FLAT_SAME_NAME = ("prompt_2", "negative_prompt", "negative_prompt_2", "width", "height", "steps",
                   "guidance_scale", "seed", "strength", "clip_skip", "refiner_switch",
                   "batch_size", "init_image", "mask_image", "device", "priority", "literal_prompt")
# flat field -> (Job section, field in it)
_FLAT_IN_SECTIONS = (("output_format", "output", "format"), ("output_quality", "output", "quality"),
                     ("save_path", "output", "save_path"),
                     ("return_images", "output", "return_images"),
                     ("auto_contrast", "postprocess", "auto_contrast"),
                     ("upscale_factor", "postprocess", "upscale_factor"),
                     ("upscale_method", "postprocess", "upscale_method"),
                     *((name, "precision", name) for name in _PRECISION_FIELDS))


def flat_to_job(m: M.FlatGenerateRequest, *, request_id: str,
                default_model_base: Optional[str] = None) -> Job:
    """`request_id`: decided by protocol.parse, the one place that does."""
    b = _JobBuilder()
    fields, explicit, sections = b.fields, b.explicit, b.sections
    given = m.__dict__  # the validated field values (pydantic keeps them in __dict__)
    b.copy(given, _FLAT_SAME_NAME)
    b.update(_delivery(m))
    b.set_scheduler(m.scheduler, m.use_karras_sigmas)
    b.set("timeout_s", m.timeout)
    b.set("tags", tuple(m.tags) if m.tags is not None else None)

    # parallel arrays, read side by side (the rules made them equally long)
    names, paths = m.lora_names or (), m.lora_paths or ()
    count = max(len(names), len(paths))
    if count:
        names, paths = _padded(names, count), _padded(paths, count)
        weights = _padded(m.lora_weights or (), count)
        fields["loras"] = [
            {"name": names[i] or normalize.lora_name_from_path(paths[i]), "path": paths[i],
             "weight": 1.0 if weights[i] is None else weights[i]} for i in range(count)]
    images = m.controlnet_images
    if images:
        count = len(images)
        kinds = _padded(m.controlnet_types or (), count)
        weights = _padded(m.controlnet_weights or (), count)
        models = _padded(m.controlnet_models or (), count)
        preprocess = _padded(m.controlnet_preprocess or (), count)
        fields["controlnets"] = [
            {"type": normalize.controlnet_type(kinds[i], models[i]), "image": images[i],
             "weight": 1.0 if weights[i] is None else weights[i], "model": models[i],
             "preprocess": preprocess[i]}
            for i in range(count)]
    names, paths = m.textual_inversion_names or (), m.textual_inversion_paths or ()
    count = max(len(names), len(paths))
    if count:
        names, paths = _padded(names, count), _padded(paths, count)
        tokens = _padded(m.textual_inversion_tokens or (), count)
        fields["textual_inversions"] = [
            {"name": names[i] or normalize.lora_name_from_path(paths[i]), "path": paths[i],
             "token": tokens[i]} for i in range(count)]

    for flat_name, section, name in _FLAT_IN_SECTIONS:
        value = given[flat_name]
        if value is not None:
            sections[section][name] = value
            explicit.add(_EXPLICIT_NAMES[section][name])
    return b.build(form=C.FORM_FLAT, request_id=request_id, prompt=m.prompt,
                   base=m.model_base or default_model_base, refiner=m.model_refiner,
                   vae=m.model_vae)


def _nested_controlnet(cn: M.NestedControlNet) -> dict:
    pre = cn.preprocessor
    enabled = pre.enabled if pre is not None else None
    resolution = pre.resolution if pre is not None else None
    return {"type": cn.type or normalize.infer_controlnet_type(cn.model), "image": cn.control_image,
            "weight": 1.0 if cn.conditioning_scale is None else cn.conditioning_scale,
            "model": cn.model, "preprocess": enabled,
            "preprocess_resolution": (C.DEFAULT_CONTROLNET_RESOLUTION if resolution is None
                                      else resolution)}


def nested_to_job(m: M.NestedGenerateRequest, *, request_id: str,
                  default_model_base: Optional[str] = None,
                  warnings: Optional[list[str]] = None) -> Job:
    d = m.data
    warnings = warnings if warnings is not None else []
    b = _JobBuilder()
    hyper = d.hyperparameters or _EMPTY[M.NestedHyperparameters]
    dims = d.dimensions or _EMPTY[M.NestedDimensions]
    models = d.models or _EMPTY[M.NestedModels]
    meta = d.metadata or _EMPTY[M.NestedMetadata]
    # the seed's _normalize_request_format: legacy flat fields overwrite their nested places
    # (inline `a if a is not None else b`: a call per field shows in the per-request cost)
    b.update({
        "steps": (d.num_inference_steps if d.num_inference_steps is not None
                  else hyper.num_inference_steps),
        "guidance_scale": (d.guidance_scale if d.guidance_scale is not None
                           else hyper.guidance_scale),
        "seed": d.seed if d.seed is not None else hyper.seed,
        "strength": d.strength if d.strength is not None else hyper.strength,
        "width": d.width if d.width is not None else dims.width,
        "height": d.height if d.height is not None else dims.height,
        "clip_skip": hyper.clip_skip, "refiner_switch": hyper.refiner_switch,
        "negative_prompt": d.negative_prompt, "prompt_2": d.prompt_2, "literal_prompt": d.literal_prompt,
        "negative_prompt_2": d.negative_prompt_2, "init_image": d.init_image,
        "mask_image": d.mask_image, "device": d.device,
        "batch_size": d.batch.size if d.batch is not None else None,
        "priority": meta.priority, "timeout_s": meta.timeout,
        "tags": tuple(meta.tags) if meta.tags is not None else None})
    b.update(_delivery(m, meta))
    b.set_scheduler(d.scheduler, d.use_karras_sigmas)

    if d.lora is not None and d.lora.models:
        if d.lora.enabled is False:
            warnings.append("data.lora.models ignored because data.lora.enabled is false")
        else:
            b.fields["loras"] = [{"name": x.name, "path": x.path,
                                  "weight": 1.0 if x.weight is None else x.weight}
                                 for x in d.lora.models]
    controlnets = []
    sources: list[tuple[str, str]] = []  # where a field came from, for error paths
    single = d.controlnet
    if single is not None:
        enabled = single.enabled if single.enabled is not None else single.control_image is not None
        if enabled:
            controlnets.append(_nested_controlnet(single))
            sources.append(("controlnets[0]", "data.controlnet"))
        elif single.control_image is not None:
            warnings.append("data.controlnet ignored because data.controlnet.enabled is false")
    for i, cn in enumerate(d.controlnets or ()):
        if cn.enabled is False:
            warnings.append(f"data.controlnets[{i}] ignored because its enabled is false")
        else:
            if len(controlnets) != i:  # only then does the job's index differ from the list's
                sources.append((f"controlnets[{len(controlnets)}]", f"data.controlnets[{i}]"))
            controlnets.append(_nested_controlnet(cn))
    if controlnets:
        b.fields["controlnets"] = controlnets
    if d.textual_inversions:
        b.fields["textual_inversions"] = [{"name": t.name, "path": t.path, "token": t.token}
                                          for t in d.textual_inversions]

    out = d.output or _EMPTY[M.NestedOutput]
    b.copy_in("output", out.__dict__, _OUTPUT_FIELDS)
    post = d.postprocessing or _EMPTY[M.NestedPostprocessing]
    upscale = post.upscale or out.upscale  # the contract's postprocessing.upscale wins
    if upscale is not None and post.upscale is None:
        sources.append(("upscale", "data.output.upscale"))
    if models.base is None and d.model_name is not None:
        sources.append(("models.base", "data.model_name"))
    if sources:
        b.fields["sources"] = tuple(sources)
    factor = method = None
    if upscale is not None:
        enabled = upscale.enabled if upscale.enabled is not None else upscale.factor is not None
        factor = upscale.factor if enabled else None
        method = upscale.method
    b.update_in("postprocess", {"auto_contrast": post.auto_contrast, "upscale_factor": factor,
                                "upscale_method": method})
    if d.precision is not None:
        b.copy_in("precision", d.precision.__dict__, _PRECISION_FIELDS)
    return b.build(form=C.FORM_NESTED, request_id=request_id,
                   prompt=d.prompt, base=models.base or d.model_name or default_model_base,
                   refiner=models.refiner, vae=models.vae, worker_type=d.worker_type)


def legacy_to_job(m: M.LegacyGenerateRequest, *, request_id: str,
                  default_model_base: Optional[str] = None) -> Job:
    ps = m.prompt_submission
    cond = ps.conditioning
    model = ps.model or _EMPTY[M.LegacyModel]
    hyper = ps.hyperparameters or _EMPTY[M.LegacyHyperparameters]
    b = _JobBuilder()
    b.copy(cond.__dict__, ("negative_prompt", "prompt_2", "negative_prompt_2", "init_image",
                           "mask_image", "literal_prompt"))
    b.set("steps", hyper.steps if hyper.steps is not None else hyper.num_inference_steps)
    b.copy(hyper.__dict__, ("width", "height", "guidance_scale", "seed", "strength", "clip_skip",
                            "refiner_switch", "batch_size"))
    b.set_scheduler(hyper.scheduler, hyper.use_karras_sigmas)
    if cond.loras:
        b.fields["loras"] = [{"name": x.name or normalize.lora_name_from_path(x.path),
                              "path": x.path, "weight": 1.0 if x.weight is None else x.weight}
                             for x in cond.loras]
    if cond.controlnets:
        b.fields["controlnets"] = [{"type": x.type or normalize.infer_controlnet_type(x.model),
                                    "image": x.image,
                                    "weight": 1.0 if x.weight is None else x.weight,
                                    "model": x.model, "preprocess": x.preprocess}
                                   for x in cond.controlnets]
    if cond.textual_inversions:
        b.fields["textual_inversions"] = [{"name": t.name, "path": t.path, "token": t.token}
                                          for t in cond.textual_inversions]
    if ps.output is not None:
        b.copy_in("output", ps.output.__dict__, _OUTPUT_FIELDS)
    if ps.postprocessing is not None:
        b.copy_in("postprocess", ps.postprocessing.__dict__, _POSTPROCESS_FIELDS)
    if ps.precision is not None:
        b.copy_in("precision", ps.precision.__dict__, _PRECISION_FIELDS)
    meta = ps.metadata or _EMPTY[M.LegacyMetadata]
    b.set("priority", meta.priority)
    b.set("timeout_s", meta.timeout)
    b.set("tags", tuple(meta.tags) if meta.tags is not None else None)
    b.set("device", meta.device)
    b.update(_delivery(m, meta))
    return b.build(form=C.FORM_LEGACY, request_id=request_id, prompt=cond.prompt,
                   base=model.base or default_model_base, refiner=model.refiner, vae=model.vae)


# --- Job -> forms ------------------------------------------------------------------------------

def _number(value: float):
    """300.0 -> 300, as C# writes an integral double it got from an int."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def job_to_legacy(job: Job) -> dict:
    """The first seed's legacy body: only what the client set (its examples omit the rest)."""
    ex = job.explicit
    model = {"base": job.models.base}
    if job.models.refiner is not None:
        model["refiner"] = job.models.refiner
    if job.models.vae is not None:
        model["vae"] = job.models.vae
    cond: dict[str, Any] = {"prompt": job.prompt}
    for name in ("negative_prompt", "prompt_2", "negative_prompt_2", "literal_prompt"):
        if name in ex:
            cond[name] = getattr(job, name)
    if job.loras:
        cond["loras"] = [_drop_none({"name": x.name, "path": x.path, "weight": x.weight})
                         for x in job.loras]
    if job.controlnets:
        cond["controlnets"] = [_legacy_controlnet(x) for x in job.controlnets]
    if job.textual_inversions:
        cond["textual_inversions"] = [_drop_none({"name": t.name, "path": t.path, "token": t.token})
                                      for t in job.textual_inversions]
    for name in ("init_image", "mask_image"):
        if getattr(job, name) is not None:
            cond[name] = getattr(job, name)
    submission: dict[str, Any] = {"model": model, "conditioning": cond}
    hyper = {name: getattr(job, name) for name in LEGACY_HYPERPARAMETERS if name in ex}
    if hyper:
        submission["hyperparameters"] = hyper
    for key, section, names in (("output", "output", _OUTPUT_FIELDS),
                                ("postprocessing", "postprocess", _POSTPROCESS_FIELDS),
                                ("precision", "precision", _PRECISION_FIELDS)):
        part = {n: getattr(getattr(job, section), n) for n in names if f"{section}.{n}" in ex}
        if part:
            submission[key] = part
    meta = {key: value for key, name, value in (
        ("priority", "priority", job.priority), ("timeout", "timeout_s", _number(job.timeout_s)),
        ("tags", "tags", list(job.tags)), ("stream", "stream", job.stream),
        ("preview", "preview", job.preview), ("preview_size", "preview_size", job.preview_size),
        ("preview_every_steps", "preview_every_steps", job.preview_every_steps),
        ("preview_interval_ms", "preview_interval_ms", job.preview_interval_ms),
        ("device", "device", job.device)) if name in ex}
    if meta:
        submission["metadata"] = meta
    return {"action": C.GENERATE_LEGACY_ACTION, "session_id": job.request_id,
            "prompt_submission": submission}


def _legacy_controlnet(x: ControlNetSpec) -> dict:
    out = {"type": x.type, "image": x.image, "weight": x.weight}  # the seed writes weight 1.0
    if x.model is not None:
        out["model"] = x.model
    if x.preprocess is not None:
        out["preprocess"] = x.preprocess
    return out


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _nested_controlnet_out(x: ControlNetSpec) -> dict:
    preprocessor: dict[str, Any] = {"resolution": x.preprocess_resolution}
    if x.preprocess is not None:  # not sent stays not sent (None and true differ in warnings)
        preprocessor = {"enabled": x.preprocess, **preprocessor}
    out = {"enabled": True, "type": x.type, "conditioning_scale": x.weight,
           "control_image": x.image, "preprocessor": preprocessor}
    if x.model is not None:
        out["model"] = x.model
    return out


def job_to_nested(job: Job) -> dict:
    """The Phase 6 seed's EnhancedRequestTransformer shape, its defaults filled in; the
    contract's extensions appear only when they hold something."""
    out, post, prec = job.output, job.postprocess, job.precision
    if post.upscale_factor is not None:
        upscale = {"enabled": True, "factor": post.upscale_factor, "method": post.upscale_method}
    else:
        upscale = {"enabled": False}
        if post.upscale_method != C.DEFAULT_UPSCALE_METHOD:
            upscale["method"] = post.upscale_method
    hyper = {"num_inference_steps": job.steps, "guidance_scale": job.guidance_scale,
             "seed": job.seed, "strength": job.strength}
    if job.clip_skip is not None:
        hyper["clip_skip"] = job.clip_skip
    if job.refiner_switch != C.DEFAULT_REFINER_SWITCH:
        hyper["refiner_switch"] = job.refiner_switch
    if job.controlnets:
        controlnet = _nested_controlnet_out(job.controlnets[0])
    else:
        controlnet = {"enabled": False}
    precision = {"dtype": prec.dtype, "vae_dtype": prec.vae_dtype, "cpu_offload": prec.cpu_offload}
    for name in ("attention_slicing", "vae_slicing"):   # None: the worker's device default
        if getattr(prec, name) is not None:
            precision[name] = getattr(prec, name)
    if prec.vae_tiling:
        precision["vae_tiling"] = True
    output = {"format": out.format, "quality": out.quality, "save_path": out.save_path,
              "upscale": upscale}
    if out.return_images:
        output["return_images"] = True
    metadata = {"request_id": job.request_id, "priority": job.priority,
                "timeout": _number(job.timeout_s), "tags": list(job.tags)}
    if job.stream:
        metadata["stream"] = True
    if job.preview:
        metadata["preview"] = True
    for name in ("preview_size", "preview_every_steps", "preview_interval_ms"):
        if name in job.explicit:
            metadata[name] = getattr(job, name)
    data: dict[str, Any] = {
        "worker_type": job.worker_type,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "model_name": job.models.base,
        "hyperparameters": hyper,
        "dimensions": {"width": job.width, "height": job.height},
        "scheduler": job.scheduler,
        "models": {"base": job.models.base, "refiner": job.models.refiner, "vae": job.models.vae},
        "lora": ({"enabled": True,
                  "models": [_drop_none({"name": x.name, "weight": x.weight, "path": x.path})
                             for x in job.loras]}
                 if job.loras else {"enabled": False, "models": []}),
        "controlnet": controlnet,
        "output": output,
        "batch": {"size": job.batch_size, "parallel": False},
        "precision": precision,
        "metadata": metadata,
    }
    if job.use_karras_sigmas:
        data["use_karras_sigmas"] = True
    if job.literal_prompt:
        data["literal_prompt"] = True
    for name in ("prompt_2", "negative_prompt_2", "init_image", "mask_image", "device"):
        if getattr(job, name) is not None:
            data[name] = getattr(job, name)
    if len(job.controlnets) > 1:
        data["controlnets"] = [_nested_controlnet_out(x) for x in job.controlnets[1:]]
    if job.textual_inversions:
        data["textual_inversions"] = [_drop_none({"name": t.name, "path": t.path, "token": t.token})
                                      for t in job.textual_inversions]
    if post.auto_contrast:
        data["postprocessing"] = {"auto_contrast": True}
    return {"message_type": C.GENERATE_NESTED, "request_id": job.request_id, "data": data}


def job_to_flat(job: Job, *, full: bool = False) -> dict:
    """The flat C# form. By default only what the client set (so flat -> job -> flat keeps the
    body); `full=True` writes every field."""
    ex = job.explicit

    def want(name: str) -> bool:
        return full or name in ex

    body: dict[str, Any] = {"message_type": C.GENERATE_FLAT, "request_id": job.request_id,
                            "prompt": job.prompt, "model_base": job.models.base}
    if job.models.refiner is not None:
        body["model_refiner"] = job.models.refiner
    if job.models.vae is not None:
        body["model_vae"] = job.models.vae
    for name in ("prompt_2", "negative_prompt", "negative_prompt_2", "width", "height", "steps",
                 "guidance_scale", "seed", "strength", "scheduler", "use_karras_sigmas",
                 "clip_skip", "refiner_switch", "batch_size", "init_image", "mask_image",
                 "device", "priority", "stream", "preview", "preview_size", "preview_every_steps",
                 "preview_interval_ms", "literal_prompt"):
        if want(name) and (getattr(job, name) is not None):
            body[name] = getattr(job, name)
    if want("timeout_s"):
        body["timeout"] = _number(job.timeout_s)
    if want("tags"):
        body["tags"] = list(job.tags)
    if job.loras:
        body["lora_names"] = [x.name for x in job.loras]
        if any(x.path is not None for x in job.loras):
            body["lora_paths"] = [x.path for x in job.loras]
        body["lora_weights"] = [x.weight for x in job.loras]
    if job.controlnets:
        body["controlnet_types"] = [x.type for x in job.controlnets]
        body["controlnet_images"] = [x.image for x in job.controlnets]
        body["controlnet_weights"] = [x.weight for x in job.controlnets]
        if any(x.model is not None for x in job.controlnets):
            body["controlnet_models"] = [x.model for x in job.controlnets]
        if any(x.preprocess is not None for x in job.controlnets):
            body["controlnet_preprocess"] = [x.preprocess for x in job.controlnets]
    if job.textual_inversions:
        body["textual_inversion_names"] = [t.name for t in job.textual_inversions]
        if any(t.path is not None for t in job.textual_inversions):
            body["textual_inversion_paths"] = [t.path for t in job.textual_inversions]
        if any(t.token is not None for t in job.textual_inversions):
            body["textual_inversion_tokens"] = [t.token for t in job.textual_inversions]
    for flat_name, section, name in (
            ("output_format", "output", "format"), ("output_quality", "output", "quality"),
            ("save_path", "output", "save_path"), ("return_images", "output", "return_images"),
            ("auto_contrast", "postprocess", "auto_contrast"),
            ("upscale_factor", "postprocess", "upscale_factor"),
            ("upscale_method", "postprocess", "upscale_method"),
            *((n, "precision", n) for n in _PRECISION_FIELDS)):
        value = getattr(getattr(job, section), name)
        if want(f"{section}.{name}") and value is not None:
            body[flat_name] = value
    return body
