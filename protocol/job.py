"""The one canonical, immutable job that every generation form becomes.

The broker routes it, the journal stores it, workers run it. It travels between processes as
a plain dict (`to_wire` / `from_wire`, msgpack-friendly: images stay bytes or str).
Field names follow the flat C# form where one exists; units are in names (`timeout_s`).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from protocol import constants as C

# An image input: a path under the input root, a base64 string / data URI, or raw bytes
# (msgpack binary). Decoding happens on the worker, which owns the input root.
ImageRef = Union[bytes, str]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSpec(_Frozen):
    base: str
    refiner: Optional[str] = None
    vae: Optional[str] = None


class LoraSpec(_Frozen):
    name: str
    path: Optional[str] = None  # None: resolve `name` under the models dir
    weight: float = 1.0


class ControlNetSpec(_Frozen):
    type: str = "canny"
    image: ImageRef
    weight: float = 1.0  # conditioning scale 0..2
    model: Optional[str] = None  # None: the worker picks its model for `type`
    # True/None: make the control map from the image where the worker has a preprocessor for
    # `type` (canny edges) and the image is not a control map already; False: the image is the
    # map. None (not sent) differs from True only in that a skipped step is not warned about.
    preprocess: Optional[bool] = None
    preprocess_resolution: int = C.DEFAULT_CONTROLNET_RESOLUTION  # the seed's preprocessor.resolution


class TextualInversionSpec(_Frozen):
    name: str
    path: Optional[str] = None
    token: Optional[str] = None  # None: "<name>"


class OutputSpec(_Frozen):
    format: Literal["png", "jpeg", "webp"] = C.DEFAULT_FORMAT
    quality: int = C.DEFAULT_QUALITY
    save_path: str = C.DEFAULT_SAVE_PATH  # relative to the output root
    return_images: bool = False


class PostprocessSpec(_Frozen):
    auto_contrast: bool = False
    upscale_factor: Optional[float] = None  # None or 1: no upscaling
    upscale_method: str = "lanczos"


class PrecisionSpec(_Frozen):
    dtype: str = C.DEFAULT_DTYPE
    vae_dtype: str = C.DEFAULT_VAE_DTYPE
    # None: the worker picks what is fastest on its device (off where torch's scaled-dot-product
    # attention exists, on for DirectML); True/False: as the request asked
    attention_slicing: Optional[bool] = None
    vae_slicing: Optional[bool] = None
    vae_tiling: bool = False
    cpu_offload: bool = False


class Job(_Frozen):
    request_id: str
    form: Literal["flat", "nested", "legacy"] = C.FORM_FLAT  # decides the reply message type

    prompt: str
    prompt_2: Optional[str] = None
    negative_prompt: str = ""
    negative_prompt_2: Optional[str] = None

    models: ModelSpec
    width: int = C.DEFAULT_SIZE
    height: int = C.DEFAULT_SIZE
    steps: int = C.DEFAULT_STEPS
    guidance_scale: float = C.DEFAULT_GUIDANCE
    seed: int = C.DEFAULT_SEED  # -1: the worker draws one and reports it
    strength: float = C.DEFAULT_STRENGTH
    scheduler: str = C.DEFAULT_SCHEDULER  # a diffusers class name from C.SCHEDULERS
    use_karras_sigmas: bool = False
    clip_skip: Optional[int] = None
    literal_prompt: bool = False  # True: prompts go to the encoders as typed (no A1111 syntax)
    refiner_switch: float = C.DEFAULT_REFINER_SWITCH  # fraction of steps the base runs

    loras: tuple[LoraSpec, ...] = ()
    controlnets: tuple[ControlNetSpec, ...] = ()
    textual_inversions: tuple[TextualInversionSpec, ...] = ()
    init_image: Optional[ImageRef] = None
    mask_image: Optional[ImageRef] = None

    batch_size: int = 1
    output: OutputSpec = OutputSpec()
    postprocess: PostprocessSpec = PostprocessSpec()
    precision: PrecisionSpec = PrecisionSpec()

    device: Optional[str] = None  # a device hint: "cuda:1", "cpu", ...
    worker_type: str = C.WORKER_BASIC
    priority: Literal["high", "normal", "low"] = C.PRIORITY_NORMAL
    timeout_s: float = C.DEFAULT_TIMEOUT_S
    tags: tuple[str, ...] = ()
    stream: bool = False  # progress messages wanted
    preview: bool = False  # progress events carry a preview image of the latents (implies stream)
    preview_size: int = C.DEFAULT_PREVIEW_SIZE  # longest side of a preview, pixels
    # preview cadence; None: the worker's --preview-every-steps / --preview-interval-ms
    preview_every_steps: Optional[int] = None
    preview_interval_ms: Optional[int] = None

    # Field names the client set explicitly; lets the legacy view emit exactly what was sent
    # (the first seed's examples omit hyperparameters that were not given).
    # Names are Job fields ("steps", "timeout_s") or "section.field" ("output.quality",
    # "postprocess.upscale_factor", "precision.dtype"); filled by protocol.translate.
    explicit: frozenset[str] = Field(default_factory=frozenset)
    # Where a field came from when the form alone does not say (nested: "controlnets[1]" ->
    # "data.controlnets[0]"), so errors name the client's field (protocol.field_paths).
    sources: tuple[tuple[str, str], ...] = ()

    def client_path(self, canonical: str) -> str:
        """`canonical` ("strength", "controlnets[0].image") as the client's form spells it."""
        from protocol.field_paths import client_path
        return client_path(self.form, canonical, dict(self.sources))

    # --- derived views used for routing ---------------------------------------------------
    @property
    def mode(self) -> str:
        if self.mask_image is not None:
            return "inpaint"
        if self.init_image is not None:
            return "img2img"
        return "txt2img"

    @property
    def features(self) -> frozenset[str]:
        """What a worker must support to run this job (routing hard filter)."""
        f = {self.mode}
        if self.loras:
            f.add("lora")
        if self.controlnets:
            f.add("controlnet")
        if self.textual_inversions:
            f.add("textual_inversion")
        if self.models.refiner:
            f.add("refiner")
        if self.models.vae:
            f.add("custom_vae")
        if self.postprocess.upscale_factor and self.postprocess.upscale_factor != 1:
            f.add("upscale")
        return frozenset(f)

    @property
    def needed_models(self) -> tuple[str, ...]:
        """Every model the job needs warm, in load order: base, refiner, VAE, ControlNets (by
        model name, or `controlnet-<type>` when the worker picks the model for the type)."""
        names = [self.models.base]
        if self.models.refiner:
            names.append(self.models.refiner)
        if self.models.vae:
            names.append(self.models.vae)
        names += [cn.model or f"controlnet-{cn.type}" for cn in self.controlnets]
        return tuple(names)

    # --- the wire between broker and worker -----------------------------------------------
    def to_wire(self) -> dict:
        d = self.model_dump(mode="python")
        d["explicit"] = sorted(self.explicit)
        return d

    @classmethod
    def from_wire(cls, d: dict) -> "Job":
        return cls.model_validate(d)
