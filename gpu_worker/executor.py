"""The real executor: runs a canonical Job with diffusers on one device.

One job, in order: validate what diffusers would choke on, decode the input images, get the
models from the pipeline cache (pinned for the job), attach the job's LoRAs and textual
inversions, denoise (base, then the refiner on the latents), decode with the job's VAE, paste
the original back outside an inpainting mask, post-process and save. LoRAs stay loaded between
jobs and each job switches on exactly its own set, or none (gpu_worker/resident_loras.py);
whatever happens, the `finally` block takes the embeddings off again and resets the
memory-saving switches on the shared modules, so nothing from one job leaks into the next.

Out of memory: the cache drops everything the job does not hold and the inference is retried
once with attention/VAE slicing on and the batch split into single images; a second failure is
`out_of_memory` and the executor keeps serving. `fault_injector` is a TEST HOOK that raises an
OOM on purpose (or set SDXL_BROKER_TEST_INJECT_OOM=N for the first N inference attempts).
"""

from __future__ import annotations

import copy
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil
import torch

from gpu_worker import file_hashes, job_adapters, postprocess, resident_loras
from gpu_worker.executor_api import AbortFn, ProgressFn
from gpu_worker.images import canny_edges, decode_image, looks_like_edge_map
from gpu_worker.previews import PreviewCadence, PreviewThrottle, encode_preview
from gpu_worker.pipeline_cache import (BASE, CONTROLNET, REFINER, UPSCALER, VAE, PipelineCache, compose_pipeline,
                                       free_device_memory)
from gpu_worker.schedulers import make_scheduler, scheduler_class
from protocol import constants as C
from protocol import rule_texts as R
from protocol import rules
from protocol.errors import JobError, about_field
from protocol.job import Job

log = logging.getLogger(__name__)

CAPABILITIES = ("txt2img", "img2img", "inpaint", "lora", "controlnet", "textual_inversion",
                "refiner", "custom_vae", "upscale")
# share of device memory the cache may use when --cache-budget-mb is not given; the rest is
# activations (accelerators) or the rest of the machine (CPU, where RAM is shared)
DEFAULT_BUDGET_FRACTION = {"cpu": 0.25}
DEFAULT_ACCELERATOR_BUDGET_FRACTION = 0.7
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_OOM_ENV = "SDXL_BROKER_TEST_INJECT_OOM"
_SCHEDULER_PROTOTYPES_MAX = 64  # (scheduler, Karras, model config) combinations kept
_STEP_TIME_SMOOTHING = 0.3  # weight of the newest sample in the per-step moving average
_CLIP_WINDOW_TOKENS = 75  # a 77-token CLIP window less its start and end markers


class InjectedOOM:
    """TEST HOOK: raises torch.OutOfMemoryError on the first `count` inference attempts."""

    def __init__(self, count: int):
        self.remaining = int(count)

    def __call__(self, attempt: str) -> None:
        if self.remaining > 0:
            self.remaining -= 1
            raise torch.OutOfMemoryError(f"injected out of memory (test hook) at {attempt}")


def _quiet_library_progress_bars() -> None:
    """Load progress bars would flood the worker's log (one per component per load)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _keep_scheduler_config(pipe) -> None:
    """Remember the scheduler config the model shipped with; every job starts from it."""
    pipe.sdxl_broker_scheduler_config = dict(pipe.scheduler.config)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


@dataclass
class _JobState:
    """What one run accumulates: pins to release, features, warnings, timing, peak memory."""
    pinned: list = field(default_factory=list)
    features: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    ti_tokens: list = field(default_factory=list)  # embeddings to unload after the job
    prompts: Any = None  # gpu_worker.executor.PromptPlan
    aborted: bool = False
    memory_peak_mb: float = 0.0
    offloaded: bool = False  # model CPU offload hooks are on the shared modules
    steps_run: dict = field(default_factory=dict)  # stage -> denoising steps actually run
    karras_applied: bool = False  # Karras sigmas really used (ignored with a warning otherwise)
    previews: PreviewThrottle = field(default_factory=PreviewThrottle)  # when a preview is due

    def feature(self, name: str) -> None:
        if name not in self.features:
            self.features.append(name)


@dataclass
class PromptPlan:
    """A job's prompts as the encoders get them: <lora:> tags taken out, A1111 weighting parsed.
    `weighted` (syntax, or a prompt past one CLIP window) routes them through compel."""
    prompt: str
    prompt_2: str | None
    negative_prompt: str
    negative_prompt_2: str | None
    loras: tuple = ()
    weighted: bool = False
    literal: bool = False

    @classmethod
    def build(cls, job: Job, literal: bool) -> "PromptPlan":
        from gpu_worker import prompt_syntax
        from protocol.job import LoraSpec

        if literal:
            return cls(job.prompt, job.prompt_2, job.negative_prompt, job.negative_prompt_2, literal=True)
        texts, tags = [], []
        for text in (job.prompt, job.prompt_2, job.negative_prompt, job.negative_prompt_2):
            cleaned, found = prompt_syntax.extract_loras(text) if text is not None else (None, [])
            texts.append(cleaned)
            tags.extend(found)
        named = {spec.name for spec in job.loras}
        loras = []
        for tag in tags:
            if not C.MIN_LORA_WEIGHT <= tag.weight <= C.MAX_LORA_WEIGHT:
                raise JobError(C.VALIDATION_ERROR, f"<lora:{tag.name}:{tag.weight:g}> in the prompt: weight outside "
                               f"{C.MIN_LORA_WEIGHT:g}..{C.MAX_LORA_WEIGHT:g}", {"field": "prompt"})
            if tag.name not in named:  # a LoRA named twice is applied once (the request's wins)
                named.add(tag.name)
                loras.append(LoraSpec(name=tag.name, weight=tag.weight))
        weighted = any(prompt_syntax.has_syntax(t) for t in texts)
        return cls(texts[0], texts[1], texts[2] or "", texts[3], tuple(loras), weighted)

    def route_long_prompts(self, pipe) -> bool:
        """A prompt past one CLIP window goes through compel too (in 77-token chunks) instead of
        being cut at 77 tokens. Returns True when that switched this plan to compel."""
        if self.weighted or self.literal:
            return False
        from gpu_worker.prompt_encoding import token_count

        tokenizer = pipe.tokenizer_2 or pipe.tokenizer
        texts = (self.prompt, self.prompt_2, self.negative_prompt, self.negative_prompt_2)
        self.weighted = any(text and token_count(tokenizer, text) > _CLIP_WINDOW_TOKENS for text in texts)
        return self.weighted

    def _fragments(self, text: str | None, fallback: str) -> list:
        from gpu_worker.prompt_syntax import parse_weights
        return parse_weights(text if text is not None else fallback)

    def embeddings(self, pipe, refiner: bool) -> dict:
        from gpu_worker.prompt_encoding import sdxl_embeddings

        if refiner:  # only the second encoder, fed prompt_2 (else prompt)
            positive = [self._fragments(self.prompt_2, self.prompt)]
            negative = [self._fragments(self.negative_prompt_2, self.negative_prompt)]
        else:
            positive = [self._fragments(self.prompt, ""), self._fragments(self.prompt_2, self.prompt)]
            negative = [self._fragments(self.negative_prompt, ""),
                        self._fragments(self.negative_prompt_2, self.negative_prompt)]
        zeros = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
        return sdxl_embeddings(pipe, positive, negative, zero_empty_negative=zeros)

    def refiner_kwargs(self, refiner, count: int) -> dict:
        """One prompt per latent: with a single prompt the refiner repeats the whole batch of
        latents per prompt and its embeddings no longer match (batch 2 -> 4 vs 2)."""
        if not self.weighted:
            return {"prompt": [self.prompt_2 or self.prompt] * count,
                    "negative_prompt": [self.negative_prompt_2 or self.negative_prompt] * count}
        return {name: tensor.repeat(count, *([1] * (tensor.dim() - 1)))
                for name, tensor in self.embeddings(refiner, refiner=True).items()}


class DiffusersExecutor:
    """gpu_worker.executor_api.Executor on real diffusers pipelines."""

    def __init__(self, device: str = "cpu", *, models_dir: str, output_dir: str, input_dir: str,
                 cache_budget_mb: float | None = None, allow_pickle: bool = False,
                 worker_id: str = "", fault_injector: Callable[[str], None] | None = None,
                 upscaler: str | None = None, single_file_config: str | None = None,
                 literal_prompts: bool = False, preview_cadence: PreviewCadence | None = None):
        from gpu_worker import devices
        from gpu_worker.model_resolver import ModelResolver
        from gpu_worker.upscalers import Upscalers

        self.device = device
        self.device_type = device.split(":")[0]
        self.worker_id = worker_id
        self._preview_cadence = preview_cadence or PreviewCadence()
        self.models_dir, self.output_dir, self.input_dir = models_dir, output_dir, input_dir
        self._devices = devices
        self._torch_device = devices.torch_device(device)
        self._memory_total_mb = float(devices.memory_stats(device).get("total_mb", 0.0))
        self._device_name = self._display_name(devices, device)
        if cache_budget_mb is None:
            fraction = DEFAULT_BUDGET_FRACTION.get(self.device_type, DEFAULT_ACCELERATOR_BUDGET_FRACTION)
            cache_budget_mb = self._memory_total_mb * fraction
        self.cache = PipelineCache(cache_budget_mb)
        self.resolver = ModelResolver(models_dir, allow_pickle=allow_pickle,
                                      single_file_config=single_file_config)
        self.upscalers = Upscalers(self.resolver, default=upscaler)  # upscale_method -> model file
        self.literal_prompts = literal_prompts  # server switch: no A1111 prompt syntax at all
        if fault_injector is None and os.environ.get(_OOM_ENV):
            fault_injector = InjectedOOM(int(os.environ[_OOM_ENV]))
            log.warning("TEST HOOK %s active: the first %s inference attempts raise OOM",
                        _OOM_ENV, os.environ[_OOM_ENV])
        self._fault_injector = fault_injector
        self._stats_lock = threading.Lock()
        self._step_time_s: dict[str, float] = {}
        self._scheduler_prototypes: dict[tuple, tuple[Any, list[str]]] = {}  # see _job_scheduler
        os.makedirs(output_dir, exist_ok=True)
        _quiet_library_progress_bars()
        # import the pipeline classes now (diffusers loads them lazily, ~1-3 s on this CPU):
        # READY then means ready, and the first job does not pay for the import
        import diffusers

        diffusers.StableDiffusionXLPipeline, diffusers.StableDiffusionXLImg2ImgPipeline  # noqa: B018
        log.info("diffusers executor on %s (%s), cache budget %.0f MB", device, self._device_name,
                 cache_budget_mb)

    @staticmethod
    def _display_name(devices, device: str) -> str:
        try:
            for info in devices.discover_devices():
                if info.name == device:
                    return info.display_name
        except Exception:  # discovery is informative only; never fail the worker over it
            log.debug("device discovery failed", exc_info=True)
        return device

    # --- Executor API ------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"device": self.device, "device_type": self.device_type, "device_name": self._device_name,
                "memory_total_mb": self._memory_total_mb, "capabilities": list(CAPABILITIES),
                "worker_types": [C.WORKER_BASIC, C.WORKER_ENHANCED], "simulated": False}

    def telemetry(self) -> dict:
        cache = self.cache.snapshot()
        with self._stats_lock:
            step_times = dict(self._step_time_s)
        return {"memory": self._devices.memory_stats(self.device),
                "rss_mb": psutil.Process().memory_info().rss / 2**20,
                "cache_budget_mb": cache["cache_budget_mb"], "cache_used_mb": cache["cache_used_mb"],
                "models_loaded": cache["models_loaded"], "models_loading": cache["models_loading"],
                "step_time_s": step_times, "load_time_s": cache["load_time_s"],
                "cache_hits": cache["cache_hits"], "cache_misses": cache["cache_misses"],
                "cache_evictions": cache["cache_evictions"], "loras_cached": cache["attached"],
                "upscalers": self.upscalers.request_names()}

    def list_models(self) -> dict:
        """{kind: [{name, size_mb, loaded}]}: every model file this worker can load."""
        from gpu_worker.model_catalogue import catalogue

        return catalogue(self.resolver, self.upscalers, self.cache.snapshot()["models_loaded"])

    def load_model(self, name: str) -> dict:
        dtype, _ = self._dtype("float16" if self.device_type != "cpu" else "float32", [])
        started = time.perf_counter()
        key, _pipe, hit = self._base(name, dtype, pin=False)
        return {"model": name, "load_time_s": 0.0 if hit else time.perf_counter() - started,
                "cached": hit, "device": self.device}

    def cleanup(self, models: list[str] | None = None) -> dict:
        wanted = set(models or [])
        unloaded = self.cache.evict(lambda entry: not wanted or entry.name in wanted, reason="cleanup")
        free_device_memory()
        return {"unloaded": unloaded, "memory": self._devices.memory_stats(self.device)}

    def run(self, job: Job, progress: ProgressFn, should_abort: AbortFn) -> dict:
        started = time.perf_counter()
        state = _JobState(previews=self._preview_cadence.throttle_for(job))
        self._reset_peak_memory()
        pipe = None
        try:
            self._validate(job)
            dtype, _ = self._dtype(job.precision.dtype, state.warnings)
            vae_dtype, _ = self._dtype(job.precision.vae_dtype, state.warnings, field_name="vae_dtype")
            progress("loading", 0, 0)
            prep_started = time.perf_counter()
            inputs = self._decode_inputs(job, state)
            state.prompts = self._prompt_plan(job, state)
            pipe, refiner, vae, model_info = self._assemble(job, dtype, vae_dtype, inputs, state)
            self._attach_adapters(job, pipe, state, model_info)
            self._apply_memory_switches(job, pipe, state)
            preprocessing_time = time.perf_counter() - prep_started
            if should_abort():
                raise JobError(C.CANCELLED, "cancelled before denoising started")

            seeds = self._seeds(job)
            infer_started = time.perf_counter()
            images = self._infer_with_oom_retry(job, pipe, refiner, vae, inputs, seeds, progress,
                                                should_abort, state)
            inference_time = time.perf_counter() - infer_started
            model_info["prompt_weighting"] = state.prompts.weighted  # compel built the embeddings

            post_started = time.perf_counter()
            progress("postprocessing", 0, len(images))
            generated = self._finish(job, images, seeds, inputs, model_info, state)
            postprocessing_time = time.perf_counter() - post_started
        except JobError as exc:
            exc.name_fields(job.client_path)  # errors[{field, message}] in the client's form
            raise
        except Exception as exc:
            if _is_oom(exc):
                raise JobError(C.OUT_OF_MEMORY, f"out of memory: {exc}") from None
            log.exception("job %s failed", job.request_id)
            raise JobError(C.INTERNAL_ERROR, f"{exc.__class__.__name__}: {exc}") from None
        finally:
            self._detach_adapters(pipe, job, state)
            self.cache.release(state.pinned)
        return self._job_result(generated, state, model_info, started, preprocessing_time,
                                inference_time, postprocessing_time)

    def _job_result(self, generated: list, state: "_JobState", model_info: dict, started: float,
                    preprocessing_time: float, inference_time: float, postprocessing_time: float,
                    batch: dict | None = None) -> dict:
        """A finished job's reply data (a lone job's, or one job's of a batched call, whose
        `batch` says which call it shared)."""
        used_mb = self._current_memory_mb()
        metrics = {
            "total_time": time.perf_counter() - started, "queue_time": 0.0,
            "inference_time": inference_time, "preprocessing_time": preprocessing_time,
            "postprocessing_time": postprocessing_time, "device_name": self._device_name,
            "worker_id": self.worker_id, "memory_used_mb": used_mb,
            "memory_peak_mb": max(state.memory_peak_mb, self._peak_memory_mb(), used_mb),
            "model_info": model_info,
        }
        if batch is not None:
            metrics["batch"] = batch
        return {"generated_images": generated, "processing_metrics": metrics,
                "features_used": state.features, "warnings": state.warnings}

    def run_batch(self, members: list) -> list:
        """Compatible jobs in one diffusers call (gpu_worker/batched_call.py)."""
        from gpu_worker.batched_call import run_batch
        return run_batch(self, members)

    # --- validation --------------------------------------------------------------------------
    def _validate(self, job: Job) -> None:
        """The broker's job rules (protocol.rules) once more, so a job from an older broker or a
        journal cannot reach diffusers with what it would fail on cryptically."""
        with about_field("scheduler"):
            scheduler_class(job.scheduler)
        problems = rules.job_problems(job)
        if problems:
            raise JobError(C.VALIDATION_ERROR, "; ".join(f"{name}: {message}" for name, message in problems),
                           {"errors": [{"field": name, "message": message} for name, message in problems]})

    def _dtype(self, name: str, warnings: list, field_name: str = "dtype") -> tuple[torch.dtype, str]:
        if name not in _DTYPES and name != "auto":
            raise JobError(C.VALIDATION_ERROR, f"{field_name}: {R.DTYPE.message}",
                           {"errors": [{"field": field_name, "message": R.DTYPE.message}]})
        if name == "auto":   # the default: what runs well here, nothing to warn about
            name = "float32" if self.device_type == "cpu" else "float16"
        elif name == "float16" and self.device_type == "cpu":
            # asked for explicitly: fp16 on CPU works but is about 9x slower than fp32
            # (DIFFUSERS-FACTS.md), so run fp32 and say so
            warnings.append(f"{field_name} float16 is slow on CPU: running float32 instead")
            name = "float32"
        return _DTYPES[name], name

    # --- inputs -------------------------------------------------------------------------------
    def _decode_inputs(self, job: Job, state: _JobState) -> dict:
        size = (job.width, job.height)
        inputs: dict[str, Any] = {"init": None, "mask": None, "controls": []}
        if job.init_image is not None:
            inputs["init"] = decode_image(job.init_image, input_dir=self.input_dir,
                                          field="init_image").resize(size)
        if job.mask_image is not None:
            if job.init_image is None:
                raise JobError(C.VALIDATION_ERROR, "mask_image needs an init_image to inpaint",
                               {"field": "mask_image"})
            inputs["mask"] = decode_image(job.mask_image, input_dir=self.input_dir,
                                          field="mask_image", mode="L").resize(size)
        for index, spec in enumerate(job.controlnets):
            field_name = f"controlnets[{index}].image"
            image = decode_image(spec.image, input_dir=self.input_dir, field=field_name).resize(size)
            inputs["controls"].append(self._control_map(index, spec, image, state))
        return inputs

    @staticmethod
    def _control_map(index: int, spec, image, state: _JobState):
        """The control map for one ControlNet: canny edges made from a picture; a ready map (any
        type without a preprocessor here, an edge map sent as canny, preprocess=false) as given.
        Only a step the client asked for explicitly and did not get is warned about."""
        if spec.preprocess is False:
            return image
        if spec.type != "canny":
            if spec.preprocess:
                state.warnings.append(f"controlnets[{index}]: no {spec.type} preprocessor on this worker; "
                                      "the image is used as the control map as given")
            return image
        if looks_like_edge_map(image):
            if spec.preprocess:
                state.warnings.append(f"controlnets[{index}]: the image is already an edge map; "
                                      "not edge-detected again")
            return image
        state.feature("canny_preprocess")
        return canny_edges(image)

    # --- models ------------------------------------------------------------------------------
    def _load(self, key: tuple, name: str, kind: str, load: Callable[[], Any], state: _JobState | None,
              pin: bool = True):
        value, hit = self.cache.get_or_load(key, name, kind, load, pin=pin)
        if pin and state is not None:
            state.pinned.append(key)
        return value, hit

    def _base(self, name: str, dtype: torch.dtype, state: _JobState | None = None, pin: bool = True):
        resolved = self.resolver.base(name)
        key = (BASE, resolved.path, str(dtype))

        def load():
            from diffusers import StableDiffusionXLPipeline
            if resolved.single_file:
                pipe = StableDiffusionXLPipeline.from_single_file(
                    resolved.path, dtype=dtype, **self._single_file_kwargs(resolved))
            else:
                pipe = StableDiffusionXLPipeline.from_pretrained(resolved.path, dtype=dtype,
                                                                 local_files_only=True)
            pipe.set_progress_bar_config(disable=True)
            _keep_scheduler_config(pipe)
            return pipe.to(self._torch_device)
        pipe, hit = self._load(key, name, BASE, load, state, pin)
        return key, pipe, hit

    @staticmethod
    def _single_file_kwargs(resolved) -> dict:
        """from_single_file's config arguments: the resolver's config folder (offline), or none
        (the Hugging Face cache/hub, which the resolver allows only without HF_HUB_OFFLINE)."""
        from gpu_worker.model_resolver import ensure_config_folder

        config = getattr(resolved, "config_path", None)
        if config:
            ensure_config_folder(resolved.path, config)  # shipped configs: written on first load
        return {"config": config, "local_files_only": True} if config else {}

    def _controlnet(self, resolved, config: str | None, dtype):
        """A ControlNet folder, or a single file with the config folder the resolver found for
        it (None: the Hugging Face cache/hub)."""
        from diffusers import ControlNetModel

        if resolved.single_file:
            from gpu_worker.controlnet_files import load_controlnet_file

            return load_controlnet_file(resolved.path, config, dtype).to(self._torch_device)
        return ControlNetModel.from_pretrained(resolved.path, dtype=dtype,
                                               local_files_only=True).to(self._torch_device)

    def _assemble(self, job: Job, dtype, vae_dtype, inputs: dict, state: _JobState):
        from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline

        with about_field("models.base"):
            _key, base, _hit = self._base(job.models.base, dtype, state)
        model_info = {"base": job.models.base, "refiner": None, "vae": None, "loras": [],
                      "controlnets": [], "textual_inversions": [], "scheduler": job.scheduler,
                      "dtype": str(dtype).replace("torch.", ""), "vae_dtype": str(vae_dtype).replace("torch.", "")}
        state.feature(job.mode)

        vae = base.vae if base.vae.dtype == vae_dtype else None
        if job.models.vae or vae is None:
            vae_name = job.models.vae or f"{job.models.base}/vae"
            if job.models.vae:
                with about_field("models.vae"):
                    resolved = self.resolver.vae(job.models.vae)
                path = resolved.path

                def load_vae():
                    if resolved.single_file:
                        config, subfolder = self.resolver.vae_config(path)
                        extra = {"config": config, "local_files_only": True} if config else {}
                        if subfolder:
                            extra["subfolder"] = subfolder
                        return AutoencoderKL.from_single_file(path, dtype=vae_dtype, **extra).to(self._torch_device)
                    return AutoencoderKL.from_pretrained(path, dtype=vae_dtype,
                                                         local_files_only=True).to(self._torch_device)
                state.feature("custom_vae")
                model_info["vae"] = job.models.vae
            else:  # the base's own VAE in another dtype: a copy, the cached one stays as it is
                path = self.resolver.base(job.models.base).path

                def load_vae():
                    import copy
                    return copy.deepcopy(base.vae).to(dtype=vae_dtype)
            with about_field("models.vae"):
                vae, _ = self._load((VAE, path, str(vae_dtype)), vae_name, VAE, load_vae, state)

        controlnets = []
        for index, spec in enumerate(job.controlnets):
            with about_field(f"controlnets[{index}].{'model' if spec.model else 'type'}"):
                resolved = self.resolver.controlnet(spec.model or spec.type)
                # a single file's config depends on the base it runs with: part of the key
                config = self.resolver.controlnet_config(resolved.path, dict(base.unet.config)) \
                    if resolved.single_file else None
                model, _ = self._load(
                    (CONTROLNET, resolved.path, str(dtype), *((config,) if resolved.single_file else ())),
                    resolved.name, CONTROLNET,
                    lambda resolved=resolved, config=config: self._controlnet(resolved, config, dtype), state)
            controlnets.append(model)
            model_info["controlnets"].append({"name": resolved.name, "type": spec.type, "weight": spec.weight})
        if controlnets:
            state.feature("controlnet" if len(controlnets) == 1 else "multi_controlnet")

        pipeline_class = self._pipeline_class(job.mode, bool(controlnets))
        parents = [key for key in state.pinned if key[0] in (BASE, VAE, CONTROLNET)]
        custom_vae = None if vae is base.vae else vae

        def build():
            composed = compose_pipeline(base, pipeline_class, vae=custom_vae, controlnets=controlnets, dtype=dtype)
            composed.set_progress_bar_config(disable=True)
            return composed
        pipe = self.cache.derived((pipeline_class.__name__, *parents), parents, build)

        refiner = None
        if job.models.refiner:
            with about_field("models.refiner"):
                resolved = self.resolver.refiner(job.models.refiner)

            def load_refiner():
                if resolved.single_file:
                    loaded = StableDiffusionXLImg2ImgPipeline.from_single_file(
                        resolved.path, dtype=dtype, **self._single_file_kwargs(resolved))
                else:
                    loaded = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                        resolved.path, dtype=dtype, local_files_only=True)
                loaded.set_progress_bar_config(disable=True)
                _keep_scheduler_config(loaded)
                return loaded.to(self._torch_device)
            refiner, _ = self._load((REFINER, resolved.path, str(dtype)), job.models.refiner, REFINER,
                                    load_refiner, state)
            state.feature("refiner")
            model_info["refiner"] = job.models.refiner

        # from the config saved at load time: `pipe` may be the cached base itself, whose
        # scheduler the previous job replaced (its Karras setting must not carry over)
        pipe.scheduler, warnings = self._job_scheduler(job.scheduler, base.sdxl_broker_scheduler_config,
                                                       job.use_karras_sigmas)
        state.warnings.extend(warnings)
        if refiner is not None:
            refiner.scheduler, _ = self._job_scheduler(job.scheduler, refiner.sdxl_broker_scheduler_config,
                                                       job.use_karras_sigmas)
        if job.use_karras_sigmas and not warnings:
            state.karras_applied = True
            state.feature("karras_sigmas")
            model_info["scheduler"] = f"{job.scheduler} (Karras)"
        return pipe, refiner, vae, model_info

    def _job_scheduler(self, name: str, config: dict, use_karras_sigmas: bool) -> tuple[Any, list[str]]:
        """A scheduler of the job's own: a copy of one built once per (name, Karras, config).
        Building some costs a lot (KDPM2 ~1 s on this CPU: 1000-step tables in __init__); the
        copy costs milliseconds and has the freshly built state, so no job's run reaches the
        next one."""
        key = (name, bool(use_karras_sigmas), repr(sorted(config.items())))
        built = self._scheduler_prototypes.get(key)
        if built is None:
            if len(self._scheduler_prototypes) >= _SCHEDULER_PROTOTYPES_MAX:
                self._scheduler_prototypes.clear()
            built = self._scheduler_prototypes[key] = make_scheduler(name, config, use_karras_sigmas)
        prototype, warnings = built
        return copy.deepcopy(prototype), list(warnings)

    @staticmethod
    def _pipeline_class(mode: str, with_controlnet: bool):
        import diffusers
        names = {("txt2img", False): "StableDiffusionXLPipeline",
                 ("img2img", False): "StableDiffusionXLImg2ImgPipeline",
                 ("inpaint", False): "StableDiffusionXLInpaintPipeline",
                 ("txt2img", True): "StableDiffusionXLControlNetPipeline",
                 ("img2img", True): "StableDiffusionXLControlNetImg2ImgPipeline",
                 ("inpaint", True): "StableDiffusionXLControlNetInpaintPipeline"}
        return getattr(diffusers, names[(mode, with_controlnet)])

    # --- prompts: A1111 syntax, <lora:> tags, long prompts (gpu_worker/prompt_syntax.py) ------
    def _prompt_plan(self, job: Job, state: _JobState | None) -> "PromptPlan":
        literal = job.literal_prompt or self.literal_prompts
        plan = PromptPlan.build(job, literal)
        if state is not None:
            if plan.loras:
                state.feature("prompt_lora")
            if plan.weighted:
                state.feature("prompt_weighting")
                if job.clip_skip:
                    state.warnings.append("clip_skip is not applied to weighted or long prompts "
                                          "(compel takes the penultimate layer); send literal_prompt to use it")
        return plan

    # --- LoRA and textual inversion lifecycle (gpu_worker/job_adapters.py) -------------------
    def _attach_adapters(self, job: Job, pipe, state: _JobState, model_info: dict) -> None:
        def load_cached(key: tuple, name: str, kind: str, load: Callable[[], Any]):
            return self._load(key, name, kind, load, state)[0]
        job_adapters.attach(job, pipe, self.resolver, load_cached, state, model_info,
                            extra_loras=state.prompts.loras if state.prompts else ())
        # LoRA adapters stay on the base's modules between jobs: they count with the base
        for key in state.pinned:
            if key[0] == BASE:
                loras = resident_loras.resident(pipe)
                self.cache.set_attached(key, loras.size_mb(), loras.names())

    def _detach_adapters(self, pipe, job: Job, state: _JobState) -> None:
        """Take the job's LoRAs and embeddings off the shared modules, whatever happened."""
        if pipe is None:
            return
        try:
            job_adapters.detach(job, pipe, state.ti_tokens)
        except Exception:
            # a half-detached base would leak into later jobs: drop it from the cache instead
            log.exception("could not detach adapters; evicting the base model")
            self.cache.evict(lambda entry: entry.kind == BASE, include_pinned=True, reason="adapter reset failed")
        finally:
            state.ti_tokens.clear()
            if state.offloaded:
                pipe.remove_all_hooks()
                pipe.to(self._torch_device)
                state.offloaded = False
            if getattr(pipe, "vae", None) is not None:
                pipe.vae.disable_slicing()
                pipe.vae.disable_tiling()

    def _apply_memory_switches(self, job: Job, pipe, state: _JobState, force: bool = False) -> None:
        precision = job.precision
        # unset: what is fastest here (slicing only saves memory, and costs time wherever
        # torch's fused scaled-dot-product attention runs: 1.32x at 512x512 on CPU, issue 17)
        slice_by_default = self._slicing_is_default()
        attention = precision.attention_slicing
        if force or (slice_by_default if attention is None else attention):
            pipe.enable_attention_slicing()
            state.feature("attention_slicing")
        else:
            pipe.disable_attention_slicing()
        vae_slicing = precision.vae_slicing
        if force or (slice_by_default if vae_slicing is None else vae_slicing):
            pipe.vae.enable_slicing()
            state.feature("vae_slicing")
        if precision.vae_tiling:
            pipe.vae.enable_tiling()
            state.feature("vae_tiling")
        if precision.cpu_offload and not force:
            if self.device_type == "cpu":
                # accelerate's offload needs an accelerator (DIFFUSERS-FACTS.md)
                state.warnings.append("cpu_offload is for accelerators only; ignored on this CPU worker")
            elif not state.offloaded:
                # Not exercised on the CPU-only development machine. The hooks sit on the shared
                # cached modules, so the finally block of run() removes them and moves the
                # modules back onto the device.
                pipe.enable_model_cpu_offload(device=self._torch_device)
                state.offloaded = True
                state.feature("cpu_offload")

    def _slicing_is_default(self) -> bool:
        """Attention/VAE slicing when a request does not say: on for DirectML (no fused
        attention there; the seed's setting), off where torch has scaled_dot_product_attention."""
        if self.device_type == "directml":
            return True
        import torch.nn.functional as F

        return not hasattr(F, "scaled_dot_product_attention")

    # --- inference ---------------------------------------------------------------------------
    @staticmethod
    def _seeds(job: Job) -> list[int]:
        # every reported seed fits a C# long and is a valid `seed` to send back: image i of a
        # batch is made from seed + i, wrapping past 2^63-1 to 0
        base = job.seed if job.seed >= 0 else secrets.randbelow(2**32)
        return [(base + index) % (C.MAX_SEED + 1) for index in range(job.batch_size)]

    def _infer_with_oom_retry(self, job, pipe, refiner, vae, inputs, seeds, progress, should_abort, state):
        try:
            return self._infer(job, pipe, refiner, vae, inputs, seeds, progress, should_abort, state, "attempt 1")
        except Exception as exc:
            if not _is_oom(exc):
                raise
            log.warning("job %s: out of memory (%s); evicting the cache and retrying once with "
                        "slicing on and the batch split", job.request_id, exc)
        evicted = self.cache.evict(reason="out of memory")  # all but what this job holds
        free_device_memory()
        state.warnings.append(f"out of memory on the first attempt: evicted {len(evicted)} cached models "
                              "and retried with attention/VAE slicing and one image at a time")
        self._apply_memory_switches(job, pipe, state, force=True)
        images = []
        try:
            for index, seed in enumerate(seeds):
                images.extend(self._infer(job, pipe, refiner, vae, inputs, [seed], progress, should_abort,
                                          state, f"retry image {index}"))
        except Exception as exc:
            if not _is_oom(exc):
                raise
            free_device_memory()
            raise JobError(C.OUT_OF_MEMORY, f"out of memory again after evicting the cache and lowering "
                                            f"memory use: {exc}") from None
        state.feature("oom_retry")
        return images

    def _infer(self, job, pipe, refiner, vae, inputs, seeds, progress, should_abort, state, attempt,
               batch_prompts: dict | None = None, batch_refiner_prompts: dict | None = None):
        """One pipeline call for `seeds` (one image each). A batched call of several jobs
        (gpu_worker/batched_call.py) passes each image's prompt embeddings in `batch_prompts`
        and the refiner's prompts in `batch_refiner_prompts` instead of `job`'s prompts."""
        if self._fault_injector is not None:
            self._fault_injector(attempt)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        # a batched call's step times would be read as one image's by routing: not recorded
        step_key = None if batch_prompts else f"{job.models.base}@{job.width}x{job.height}"
        kwargs = self._call_kwargs(job, pipe, inputs, len(seeds), generators, state)
        if batch_prompts:
            for name in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "clip_skip",
                         "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                         "negative_pooled_prompt_embeds"):
                kwargs.pop(name, None)
            kwargs.update(batch_prompts, num_images_per_prompt=1)
        # the refiner takes over the base's latents at refiner_switch; pipelines without
        # denoising_end (SDXL ControlNet img2img) run to the end, and the refiner then re-noises and
        # refines the last (1 - refiner_switch) of the schedule, img2img style (SDXL's other
        # documented way to use a refiner)
        hand_over = refiner is not None and "denoising_end" in self._parameters(pipe)
        if hand_over:
            kwargs["denoising_end"] = job.refiner_switch
        elif refiner is not None:
            state.feature("refiner_after_base")
            if not any("refiner ran after" in w for w in state.warnings):
                state.warnings.append(f"refiner ran after the finished {type(pipe).__name__} image "
                                      f"(strength {1 - job.refiner_switch:g}): that pipeline cannot hand "
                                      "over its latents mid-way")
        with torch.inference_mode():
            refiner_steps = round(job.steps * (1 - job.refiner_switch)) if refiner is not None else 0
            latents = pipe(**kwargs, callback_on_step_end=self._step_callback(
                "denoising", progress, should_abort, state, step_key, job, refiner_steps)).images
            if state.aborted:
                raise JobError(C.CANCELLED, "cancelled during denoising")
            if refiner is not None:
                # one prompt per latent: with a single prompt the refiner repeats the whole batch
                # of latents per prompt and its embeddings no longer match (batch 2 -> 4 vs 2)
                count = len(latents)
                latents = refiner(
                    **(batch_refiner_prompts or state.prompts.refiner_kwargs(refiner, count)),
                    image=latents, num_inference_steps=job.steps,
                    **({"denoising_start": job.refiner_switch} if hand_over
                       else {"strength": 1 - job.refiner_switch}),
                    guidance_scale=job.guidance_scale, generator=generators, output_type="latent",
                    callback_on_step_end=self._step_callback("refining", progress, should_abort, state,
                                                             step_key and f"{job.models.refiner}@{job.width}x{job.height}",
                                                             job),
                ).images
                if state.aborted:
                    raise JobError(C.CANCELLED, "cancelled during refining")
                if not state.steps_run.get("refining") and "refiner ran no step" not in " ".join(state.warnings):
                    state.warnings.append(f"refiner ran no step: refiner_switch {job.refiner_switch} with "
                                          f"{job.steps} steps leaves none after the hand-off")
            return self._decode_latents(vae, pipe, latents)

    @staticmethod
    def _parameters(pipe) -> set[str]:
        import inspect
        return set(inspect.signature(pipe.__call__).parameters)

    def _call_kwargs(self, job: Job, pipe, inputs: dict, count: int, generators,
                     state: _JobState | None = None) -> dict:
        plan: PromptPlan = self._prompt_plan(job, None) if state is None else state.prompts
        if plan.route_long_prompts(pipe) and state is not None:
            state.feature("long_prompt")
        kwargs: dict[str, Any] = {
            "num_inference_steps": job.steps,
            "guidance_scale": job.guidance_scale, "num_images_per_prompt": count, "generator": generators,
            "output_type": "latent",
        }
        if plan.weighted:  # compel's embeddings (after the LoRAs: they act on the encoders too)
            kwargs.update(plan.embeddings(pipe, refiner=False))
        else:
            kwargs.update(prompt=plan.prompt, prompt_2=plan.prompt_2, negative_prompt=plan.negative_prompt or None,
                          negative_prompt_2=plan.negative_prompt_2, clip_skip=job.clip_skip or None)
        accepted = self._parameters(pipe)
        if "height" in accepted:  # inpainting would default to the UNet's native size otherwise
            kwargs["height"], kwargs["width"] = job.height, job.width
        if inputs["init"] is not None:
            kwargs["image"], kwargs["strength"] = inputs["init"], job.strength
        if inputs["mask"] is not None:
            kwargs["mask_image"] = inputs["mask"]
        if inputs["controls"]:
            controls = inputs["controls"] if len(inputs["controls"]) > 1 else inputs["controls"][0]
            scales = [float(spec.weight) for spec in job.controlnets]
            kwargs["control_image" if "control_image" in accepted else "image"] = controls
            kwargs["controlnet_conditioning_scale"] = scales if len(scales) > 1 else scales[0]
        return kwargs

    def _step_callback(self, stage: str, progress: ProgressFn, should_abort: AbortFn, state: _JobState,
                       step_key: str, job: Job, later_steps: int = 0):
        """diffusers' callback_on_step_end: step timing, progress (with eta_s from the measured
        step time, and a latent preview when the job asked and one is due), abort."""
        last = [time.perf_counter()]

        def on_step_end(pipe, step: int, _timestep, callback_kwargs: dict) -> dict:
            now = time.perf_counter()
            step_s = now - last[0]   # a batched call (no step_key): its own last step's time
            if step_key:
                self._record_step_time(step_key, step_s)
            last[0] = now
            state.steps_run[stage] = state.steps_run.get(stage, 0) + 1
            state.memory_peak_mb = max(state.memory_peak_mb, self._current_memory_mb())
            total = int(getattr(pipe, "num_timesteps", 0) or 0)
            extra = {}
            if job.stream:
                if step_key:
                    with self._stats_lock:
                        step_s = self._step_time_s.get(step_key, 0.0)
                extra["eta_s"] = round(max(0, total - step - 1 + later_steps) * step_s, 3)
                latents = callback_kwargs.get("latents")
                if job.preview and latents is not None and state.previews.due(step + 1):
                    try:
                        extra["preview"] = encode_preview(latents, job.preview_size)
                    except Exception as exc:  # a preview is a nicety: never fail the job for it
                        log.warning("job %s: no preview: %s", job.request_id, exc)
            progress(stage, step + 1, total, **extra)
            if should_abort():
                pipe._interrupt = True  # stops the loop; the image it still returns is discarded
                state.aborted = True
            return callback_kwargs
        return on_step_end

    def _record_step_time(self, key: str, seconds: float) -> None:
        with self._stats_lock:
            old = self._step_time_s.get(key)
            self._step_time_s[key] = seconds if old is None else (
                (1 - _STEP_TIME_SMOOTHING) * old + _STEP_TIME_SMOOTHING * seconds)

    @staticmethod
    def _decode_latents(vae, pipe, latents) -> list:
        """Decode with the job's VAE in its own dtype (the pipeline decodes only in its dtype)."""
        latents = latents.to(device=vae.device, dtype=vae.dtype)
        config = vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, config.latent_channels, 1, 1)
            mean_t = torch.tensor(mean).view(shape).to(latents)
            std_t = torch.tensor(std).view(shape).to(latents)
            latents = latents * std_t / config.scaling_factor + mean_t
        else:
            latents = latents / config.scaling_factor
        decoded = vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(decoded.float(), output_type="pil")

    # --- after the pipeline ------------------------------------------------------------------
    def _finish(self, job: Job, images: list, seeds: list[int], inputs: dict, model_info: dict,
                state: _JobState) -> list[dict]:
        from PIL import Image

        generated = []
        for index, (image, seed) in enumerate(zip(images, seeds)):
            if inputs["mask"] is not None:
                # A1111-style: outside the mask the result is the original pixels
                image = Image.composite(image, inputs["init"], inputs["mask"])
            if job.postprocess.auto_contrast:
                image = postprocess.auto_contrast(image)
                state.feature("auto_contrast")
            factor = job.postprocess.upscale_factor
            if factor and factor != 1:
                method = job.postprocess.upscale_method
                image = postprocess.upscale(image, factor, method,
                                            lambda small: self._model_upscale(method, small, state, model_info))
                state.feature("upscale_lanczos" if method.lower() == "lanczos" else "upscale_realesrgan")
            parameters = self._infotext(job, seed, image, inputs, model_info, state)
            saved = postprocess.finish_image(
                image, output_dir=self.output_dir, save_path=job.output.save_path, fmt=job.output.format,
                quality=job.output.quality, stem=postprocess.file_stem(job.request_id, index, seed),
                parameters=parameters)
            entry = {"index": index, "seed": seed, "width": saved.width, "height": saved.height,
                     "format": saved.format, "path": saved.path, "sha256": saved.sha256}
            if job.output.return_images:
                entry["image"] = saved.data
            generated.append(entry)
        if len(seeds) > 1:
            state.feature("batch")
        return generated

    def _model_upscale(self, method: str, image, state: _JobState, model_info: dict):
        """Run the upscaler `method` names (spandrel, tiled), cached like any other model."""
        from gpu_worker import upscalers

        name, path = self.upscalers.resolve(method)
        descriptor, _ = self._load((UPSCALER, path), name, UPSCALER,
                                   lambda: upscalers.load(path).to(self._torch_device), state)
        model_info["upscaler"] = name
        return upscalers.run_tiled(descriptor, image)

    def _weighting_infotext(self, job: Job, state: _JobState) -> str | None:
        """What became of the prompt syntax: compel weighting, or taken literally on request."""
        if job.literal_prompt or self.literal_prompts:
            return "off (literal prompt)"
        return "compel" if state.prompts is not None and state.prompts.weighted else None

    @staticmethod
    def _upscale_infotext(job: Job, model_info: dict) -> dict:
        factor = job.postprocess.upscale_factor
        if not factor or factor == 1:
            return {}
        return {"Postprocess upscale by": f"{factor:g}",
                "Postprocess upscaler": model_info.get("upscaler") or "Lanczos"}

    def _infotext(self, job: Job, seed: int, image, inputs: dict, model_info: dict,
                  state: _JobState) -> str:
        """A1111's parameters text, with the A1111 short hashes of the files used (cached)."""
        prompt = job.prompt
        for lora in model_info["loras"]:  # A1111 records LoRA weights as prompt tags
            if f"<lora:{lora['name']}:" not in prompt:
                prompt += f" <lora:{lora['name']}:{lora['weight']:g}>"
        vae_hash = (file_hashes.model_short_hash(self.resolver.vae(job.models.vae).path)
                    if job.models.vae else None)
        model_hash = file_hashes.model_short_hash(self.resolver.base(job.models.base).path)
        # the same hashes once more as civitai's JSON `Hashes`, which most readers parse
        hashes = {"model": model_hash, "vae": vae_hash,
                  **{f"lora:{l['name']}": l.get("hash") for l in model_info["loras"]}}
        return postprocess.a1111_parameters(
            prompt=prompt, negative_prompt=job.negative_prompt, steps=job.steps,
            scheduler=job.scheduler, use_karras_sigmas=state.karras_applied,  # only what was applied
            guidance_scale=job.guidance_scale, seed=seed, width=image.width, height=image.height,
            model=job.models.base, model_hash=model_hash,
            extra={"VAE hash": vae_hash, "VAE": job.models.vae,
                   "Denoising strength": job.strength if inputs["init"] else None,
                   "Clip skip": job.clip_skip,
                   "Refiner": job.models.refiner if state.steps_run.get("refining") else None,
                   **self._upscale_infotext(job, model_info),
                   "Lora hashes": ", ".join(f"{l['name']}: {l['hash']}" for l in model_info["loras"] if l.get("hash")),
                   "Prompt weighting": self._weighting_infotext(job, state),
                   "Hashes": {key: value for key, value in hashes.items() if value},
                   "Version": "sdxl-broker"})

    # --- memory -------------------------------------------------------------------------------
    def _is_cuda(self) -> bool:
        return self.device_type == "cuda" and torch.cuda.is_available()

    def _reset_peak_memory(self) -> None:
        if self._is_cuda():
            torch.cuda.reset_peak_memory_stats(self._torch_device)

    def _current_memory_mb(self) -> float:
        """Accelerators: what torch holds on the device; CPU: this process's resident memory."""
        if self._is_cuda():
            return torch.cuda.memory_allocated(self._torch_device) / 2**20
        return psutil.Process().memory_info().rss / 2**20

    def _peak_memory_mb(self) -> float:
        if self._is_cuda():
            return torch.cuda.max_memory_allocated(self._torch_device) / 2**20
        return self._current_memory_mb()
