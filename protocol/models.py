"""pydantic v2 models of what clients send: the three generation forms and the management
messages. They check types and bounds field by field (every problem, with its path); rules that
span fields (parallel arrays, a base model somewhere) live in protocol.translate, which also
turns a validated model into the canonical Job. The JSON Schemas in protocol/schemas/ come from
these classes (protocol.schema_gen).

Optional fields default to None so the translation can tell "sent" from "not sent" (the legacy
view reproduces only what was sent) and so C# nulls mean "use the default".
Unknown fields are kept (extra="allow") and reported as warnings, never errors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PlainValidator,
                      StringConstraints, ValidationInfo, WithJsonSchema)

from protocol import constants as C
from protocol import json_patterns as JP
from protocol import normalize
from protocol import rule_texts as R


class Edge(BaseModel):
    """Base of every request model."""

    # strict: an integer field takes JSON integers only (not "512", 512.0 or true), a number
    # field takes integers and floats, a boolean only true/false; what the schemas promise
    model_config = ConfigDict(extra="allow", protected_namespaces=(), allow_inf_nan=False,
                              frozen=True, strict=True)


# --- field types ----------------------------------------------------------------------------

def _prompt(value: str) -> str:
    if not value.strip():
        raise ValueError(R.PROMPT.message)
    return value


def _model_ref(value: str, info: ValidationInfo) -> str:
    """No '..' out of the model root, no pickle suffix (unless allowed), not blank: one call, as
    a request carries several model references and every call costs on the broker's hot path."""
    if ".." in value and normalize.leaves_root(value):
        raise ValueError(R.MODEL_PATH_ESCAPES.message)
    if value.lower().endswith(C.PICKLE_SUFFIXES) and not (info.context or {}).get("allow_pickle"):
        raise ValueError(R.PICKLE.message)
    if value[0].isspace() and not value.strip():  # min_length=1 already refused ""
        raise ValueError(R.NOT_BLANK.message)
    return value


def _scheduler(value: str) -> str:
    normalize.resolve_scheduler(value)  # raises ValueError naming the valid ones
    return value


def _controlnet_type(value: str) -> str:
    return normalize.controlnet_type(value, None)


def _save_path(value: str) -> str:
    problem = normalize.save_path_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _choice(options: tuple[str, ...], rule: R.Rule, aliases: dict[str, str] | None = None):
    def check(value: str) -> str:
        if value in options:  # spelled as listed: most requests
            return value
        low = value.strip().lower()
        low = (aliases or {}).get(low, low)
        if low not in options:
            raise ValueError(rule.message)
        return low
    return check


def _image(value: Any) -> Union[bytes, str]:
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if not isinstance(value, (bytes, str)):
        raise ValueError(R.IMAGE.message)
    if not value:
        raise ValueError(R.IMAGE_EMPTY.message)
    if isinstance(value, str) and ".." in value and normalize.leaves_root(value):
        raise ValueError(R.INPUT_PATH_ESCAPES.message)  # base64 and data URIs hold no '.'
    return value


# each bounded type carries its rule (protocol.rule_texts) as a marker: protocol.parse words a
# bound error with the rule's message, never pydantic's
Text = Annotated[str, StringConstraints(max_length=C.MAX_PROMPT_CHARS), R.TEXT]
Prompt = Annotated[str, StringConstraints(max_length=C.MAX_PROMPT_CHARS), AfterValidator(_prompt),
                   WithJsonSchema({"type": "string", "maxLength": C.MAX_PROMPT_CHARS,
                                   "pattern": JP.NOT_BLANK}), R.PROMPT]
Name = Annotated[str, StringConstraints(min_length=1, max_length=C.MAX_NAME_CHARS), R.NAME]
Id = Annotated[str, StringConstraints(min_length=1, max_length=C.MAX_ID_CHARS), R.ID]
ModelRef = Annotated[str, StringConstraints(min_length=1, max_length=C.MAX_NAME_CHARS),
                     AfterValidator(_model_ref), WithJsonSchema(JP.model_ref()), R.NAME]
Image = Annotated[Union[bytes, str], PlainValidator(_image),
                  WithJsonSchema(JP.image())]
Size = Annotated[int, Field(ge=C.MIN_SIZE, le=C.MAX_SIZE, multiple_of=C.SIZE_MULTIPLE), R.SIZE]
Steps = Annotated[int, Field(ge=C.MIN_STEPS, le=C.MAX_STEPS), R.STEPS]
Guidance = Annotated[float, Field(ge=C.MIN_GUIDANCE, le=C.MAX_GUIDANCE), R.GUIDANCE]
Seed = Annotated[int, Field(ge=-1, le=C.MAX_SEED), R.SEED]
Strength = Annotated[float, Field(ge=0.0, le=1.0), R.STRENGTH]
RefinerSwitch = Annotated[float, Field(gt=C.MIN_REFINER_SWITCH, lt=C.MAX_REFINER_SWITCH),
                          R.REFINER_SWITCH]
ClipSkip = Annotated[int, Field(ge=0, le=C.MAX_CLIP_SKIP), R.CLIP_SKIP]
LoraWeight = Annotated[float, Field(ge=C.MIN_LORA_WEIGHT, le=C.MAX_LORA_WEIGHT), R.LORA_WEIGHT]
ControlScale = Annotated[float, Field(ge=C.MIN_CONTROLNET_SCALE, le=C.MAX_CONTROLNET_SCALE),
                         R.CONTROL_SCALE]
Batch = Annotated[int, Field(ge=C.MIN_BATCH, le=C.MAX_BATCH), R.BATCH]
Quality = Annotated[int, Field(ge=C.MIN_QUALITY, le=C.MAX_QUALITY), R.QUALITY]
UpscaleFactor = Annotated[float, Field(ge=1.0, le=C.MAX_UPSCALE_FACTOR), R.UPSCALE_FACTOR]
Resolution = Annotated[int, Field(ge=64, le=C.MAX_SIZE), R.PREPROCESS_RESOLUTION]
TimeoutS = Annotated[float, Field(gt=0.0, le=C.MAX_TIMEOUT_S), R.TIMEOUT]
SchedulerName = Annotated[str, AfterValidator(_scheduler),
                          WithJsonSchema(JP.choice(normalize.scheduler_spellings(),
                                                   "a scheduler: diffusers class, C# or A1111 name, "
                                                   "any case"))]
ControlNetType = Annotated[str, AfterValidator(_controlnet_type),
                           WithJsonSchema(JP.controlnet_type())]
SavePath = Annotated[str, StringConstraints(max_length=C.MAX_NAME_CHARS), AfterValidator(_save_path),
                     WithJsonSchema(JP.save_path()), R.NAME]
def _upscale_method(value: str, info: ValidationInfo) -> str:
    """lanczos or the default model upscaler's aliases (case-insensitive), else the name or path
    of an upscaler model file, with the rules of every model reference."""
    low = value.strip().lower()
    if low in C.UPSCALE_METHODS or low in C.UPSCALE_METHOD_ALIASES:
        return low
    return _model_ref(value, info)


UpscaleMethod = Annotated[str, StringConstraints(min_length=1, max_length=C.MAX_NAME_CHARS),
                          AfterValidator(_upscale_method), WithJsonSchema(JP.upscale_method()),
                          R.NAME]
_FORMAT_ALIASES = {"jpg": "jpeg"}
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                  "bf16": "bfloat16"}
_WORKER_TYPES = (C.WORKER_BASIC, C.WORKER_ENHANCED)
OutputFormat = Annotated[str, AfterValidator(_choice(C.OUTPUT_FORMATS, R.OUTPUT_FORMAT,
                                                     _FORMAT_ALIASES)),
                         WithJsonSchema(JP.choice([*C.OUTPUT_FORMATS, *_FORMAT_ALIASES],
                                                  "png, jpeg (jpg) or webp, any case"))]
Dtype = Annotated[str, AfterValidator(_choice(C.DTYPES, R.DTYPE, _DTYPE_ALIASES)),
                  WithJsonSchema(JP.choice([*C.DTYPES, *_DTYPE_ALIASES],
                                           "auto, float16, bfloat16, float32 (fp16, half, bf16, "
                                           "fp32, float accepted), any case"))]
Priority = Annotated[str, AfterValidator(_choice(C.PRIORITIES, R.PRIORITY)),
                     WithJsonSchema(JP.choice(C.PRIORITIES, "high, normal or low, any case"))]
WorkerType = Annotated[str, AfterValidator(_choice(_WORKER_TYPES, R.WORKER_TYPE)),
                       WithJsonSchema(JP.choice(_WORKER_TYPES, "the seed's worker types, any case"))]
# progress wanted: true/false, or "preview" for progress with preview images
def _stream(value: Any) -> Union[bool, str]:
    if isinstance(value, bool) or value == C.STREAM_PREVIEW:
        return value
    raise ValueError(R.STREAM.message)


Stream = Annotated[Union[bool, str], PlainValidator(_stream),
                   WithJsonSchema({"anyOf": [{"type": "boolean"}, {"const": C.STREAM_PREVIEW}]})]
PreviewSize = Annotated[int, Field(ge=C.MIN_PREVIEW_SIZE, le=C.MAX_PREVIEW_SIZE), R.PREVIEW_SIZE]
PreviewEverySteps = Annotated[int, Field(ge=1, le=C.MAX_PREVIEW_EVERY_STEPS), R.PREVIEW_EVERY_STEPS]
PreviewIntervalMs = Annotated[int, Field(ge=0, le=C.MAX_PREVIEW_INTERVAL_MS), R.PREVIEW_INTERVAL_MS]
Tags = Annotated[list[Annotated[str, StringConstraints(max_length=200), R.TAGS]],
                 Field(max_length=C.MAX_TAGS), R.TAGS]


def _items(item_type):
    return Annotated[list[item_type], Field(max_length=C.MAX_LIST_ITEMS), R.LIST_ITEMS]


# --- flat: generate_sdxl_enhanced -------------------------------------------------------------

class FlatGenerateRequest(Edge):
    """The flat C# form: every field at the top level (CONTRACT.md)."""

    message_type: Literal["generate_sdxl_enhanced"] = C.GENERATE_FLAT
    session_id: Optional[Id] = None
    request_id: Optional[Id] = None
    prompt: Prompt
    prompt_2: Optional[Text] = None
    negative_prompt: Optional[Text] = None
    negative_prompt_2: Optional[Text] = None
    width: Optional[Size] = None
    height: Optional[Size] = None
    steps: Optional[Steps] = None
    guidance_scale: Optional[Guidance] = None
    seed: Optional[Seed] = None
    scheduler: Optional[SchedulerName] = None
    use_karras_sigmas: Optional[bool] = None
    clip_skip: Optional[ClipSkip] = None
    literal_prompt: Optional[bool] = None  # extension: no A1111 weighting / <lora:> tags
    model_base: Optional[ModelRef] = None
    model_refiner: Optional[ModelRef] = None
    model_vae: Optional[ModelRef] = None
    refiner_switch: Optional[RefinerSwitch] = None
    lora_names: Optional[_items(Optional[Name])] = None  # null item: the path's stem
    lora_paths: Optional[_items(Optional[ModelRef])] = None  # null item: resolve the name
    lora_weights: Optional[_items(LoraWeight)] = None
    controlnet_types: Optional[_items(Optional[ControlNetType])] = None
    controlnet_images: Optional[_items(Image)] = None
    controlnet_weights: Optional[_items(ControlScale)] = None
    controlnet_models: Optional[_items(Optional[ModelRef])] = None
    controlnet_preprocess: Optional[_items(Optional[bool])] = None  # extension: false = a ready map
    textual_inversion_names: Optional[_items(Optional[Name])] = None
    textual_inversion_paths: Optional[_items(Optional[ModelRef])] = None
    textual_inversion_tokens: Optional[_items(Optional[Name])] = None
    init_image: Optional[Image] = None
    strength: Optional[Strength] = None
    mask_image: Optional[Image] = None
    batch_size: Optional[Batch] = None
    output_format: Optional[OutputFormat] = None
    output_quality: Optional[Quality] = None
    save_path: Optional[SavePath] = None
    return_images: Optional[bool] = None
    upscale_factor: Optional[UpscaleFactor] = None
    upscale_method: Optional[UpscaleMethod] = None
    auto_contrast: Optional[bool] = None
    dtype: Optional[Dtype] = None
    vae_dtype: Optional[Dtype] = None
    attention_slicing: Optional[bool] = None
    vae_slicing: Optional[bool] = None
    vae_tiling: Optional[bool] = None
    cpu_offload: Optional[bool] = None
    device: Optional[Name] = None
    priority: Optional[Priority] = None
    timeout: Optional[TimeoutS] = None
    tags: Optional[Tags] = None
    stream: Optional[Stream] = None
    preview: Optional[bool] = None  # progress events carry a preview image (implies stream)
    preview_size: Optional[PreviewSize] = None
    preview_every_steps: Optional[PreviewEverySteps] = None  # previews at most every N steps
    preview_interval_ms: Optional[PreviewIntervalMs] = None  # ... and M ms apart


# --- nested: inference_request (the Phase 6 seed's EnhancedRequestTransformer) ----------------

class NestedHyperparameters(Edge):
    num_inference_steps: Optional[Steps] = None
    guidance_scale: Optional[Guidance] = None
    seed: Optional[Seed] = None
    strength: Optional[Strength] = None
    clip_skip: Optional[ClipSkip] = None  # extension
    refiner_switch: Optional[RefinerSwitch] = None  # extension


class NestedDimensions(Edge):
    width: Optional[Size] = None
    height: Optional[Size] = None


class NestedModels(Edge):
    base: Optional[ModelRef] = None
    refiner: Optional[ModelRef] = None
    vae: Optional[ModelRef] = None


class NestedLoraModel(Edge):
    name: Name
    path: Optional[ModelRef] = None  # extension: a file instead of a name under the models dir
    weight: Optional[LoraWeight] = None


class NestedLora(Edge):
    enabled: Optional[bool] = None  # missing: enabled when models are given
    models: Optional[_items(NestedLoraModel)] = None


class NestedPreprocessor(Edge):
    enabled: Optional[bool] = None
    resolution: Optional[Resolution] = None


class NestedControlNet(Edge):
    enabled: Optional[bool] = None
    type: Optional[ControlNetType] = None
    conditioning_scale: Optional[ControlScale] = None
    control_image: Optional[Image] = None
    model: Optional[ModelRef] = None  # extension: a ControlNet model instead of one per type
    preprocessor: Optional[NestedPreprocessor] = None


class NestedUpscale(Edge):
    enabled: Optional[bool] = None
    factor: Optional[UpscaleFactor] = None
    method: Optional[UpscaleMethod] = None


class NestedOutput(Edge):
    format: Optional[OutputFormat] = None
    quality: Optional[Quality] = None
    save_path: Optional[SavePath] = None
    upscale: Optional[NestedUpscale] = None
    return_images: Optional[bool] = None  # extension


class NestedBatch(Edge):
    size: Optional[Batch] = None
    parallel: Optional[bool] = None  # accepted; images of a batch run as one pipeline call


class NestedPrecision(Edge):
    dtype: Optional[Dtype] = None
    vae_dtype: Optional[Dtype] = None
    cpu_offload: Optional[bool] = None
    attention_slicing: Optional[bool] = None
    vae_slicing: Optional[bool] = None
    vae_tiling: Optional[bool] = None  # extension


class NestedMetadata(Edge):
    request_id: Optional[Id] = None
    priority: Optional[Priority] = None
    timeout: Optional[TimeoutS] = None
    tags: Optional[Tags] = None
    stream: Optional[Stream] = None  # extension: progress messages wanted
    preview: Optional[bool] = None  # extension: progress with preview images
    preview_size: Optional[PreviewSize] = None
    preview_every_steps: Optional[PreviewEverySteps] = None  # previews at most every N steps
    preview_interval_ms: Optional[PreviewIntervalMs] = None  # ... and M ms apart


class TextualInversionItem(Edge):
    name: Name
    path: Optional[ModelRef] = None
    token: Optional[Name] = None


class NestedPostprocessing(Edge):
    auto_contrast: Optional[bool] = None
    upscale: Optional[NestedUpscale] = None


class NestedData(Edge):
    worker_type: Optional[WorkerType] = None
    prompt: Prompt
    negative_prompt: Optional[Text] = None
    prompt_2: Optional[Text] = None  # extension
    literal_prompt: Optional[bool] = None  # extension: no A1111 weighting / <lora:> tags
    negative_prompt_2: Optional[Text] = None  # extension
    model_name: Optional[ModelRef] = None
    hyperparameters: Optional[NestedHyperparameters] = None
    dimensions: Optional[NestedDimensions] = None
    scheduler: Optional[SchedulerName] = None
    use_karras_sigmas: Optional[bool] = None  # extension
    models: Optional[NestedModels] = None
    lora: Optional[NestedLora] = None
    controlnet: Optional[NestedControlNet] = None
    output: Optional[NestedOutput] = None
    batch: Optional[NestedBatch] = None
    precision: Optional[NestedPrecision] = None
    metadata: Optional[NestedMetadata] = None
    # the contract's extensions
    init_image: Optional[Image] = None
    mask_image: Optional[Image] = None
    textual_inversions: Optional[_items(TextualInversionItem)] = None
    controlnets: Optional[_items(NestedControlNet)] = None
    postprocessing: Optional[NestedPostprocessing] = None
    device: Optional[Name] = None
    # legacy flat fields, moved into their sections as the seed's _normalize_request_format does
    num_inference_steps: Optional[Steps] = None
    guidance_scale: Optional[Guidance] = None
    seed: Optional[Seed] = None
    strength: Optional[Strength] = None
    width: Optional[Size] = None
    height: Optional[Size] = None


class NestedGenerateRequest(Edge):
    message_type: Literal["inference_request"] = C.GENERATE_NESTED
    request_id: Optional[Id] = None
    stream: Optional[Stream] = None  # progress wanted (or data.metadata.stream)
    preview: Optional[bool] = None  # progress with previews (or data.metadata.preview)
    preview_size: Optional[PreviewSize] = None
    preview_every_steps: Optional[PreviewEverySteps] = None  # previews at most every N steps
    preview_interval_ms: Optional[PreviewIntervalMs] = None  # ... and M ms apart
    data: NestedData


# --- legacy: action "generate" with prompt_submission ----------------------------------------

class LegacyModel(Edge):
    base: Optional[ModelRef] = None
    refiner: Optional[ModelRef] = None
    vae: Optional[ModelRef] = None


class LegacyLora(Edge):
    name: Optional[Name] = None  # missing: the path's file stem
    path: Optional[ModelRef] = None
    weight: Optional[LoraWeight] = None


class LegacyControlNet(Edge):
    type: Optional[ControlNetType] = None
    image: Image
    weight: Optional[ControlScale] = None
    model: Optional[ModelRef] = None
    preprocess: Optional[bool] = None  # extension: false = the image is a ready control map


class LegacyConditioning(Edge):
    prompt: Prompt
    negative_prompt: Optional[Text] = None
    prompt_2: Optional[Text] = None
    literal_prompt: Optional[bool] = None  # extension: no A1111 weighting / <lora:> tags
    negative_prompt_2: Optional[Text] = None
    loras: Optional[_items(LegacyLora)] = None
    controlnets: Optional[_items(LegacyControlNet)] = None
    textual_inversions: Optional[_items(TextualInversionItem)] = None
    init_image: Optional[Image] = None
    mask_image: Optional[Image] = None


class LegacyHyperparameters(Edge):
    width: Optional[Size] = None
    height: Optional[Size] = None
    steps: Optional[Steps] = None
    num_inference_steps: Optional[Steps] = None  # the nested form's name, accepted too
    guidance_scale: Optional[Guidance] = None
    seed: Optional[Seed] = None
    strength: Optional[Strength] = None
    scheduler: Optional[SchedulerName] = None
    use_karras_sigmas: Optional[bool] = None
    clip_skip: Optional[ClipSkip] = None
    refiner_switch: Optional[RefinerSwitch] = None
    batch_size: Optional[Batch] = None


class LegacyOutput(Edge):
    format: Optional[OutputFormat] = None
    quality: Optional[Quality] = None
    save_path: Optional[SavePath] = None
    return_images: Optional[bool] = None


class LegacyPostprocessing(Edge):
    auto_contrast: Optional[bool] = None
    upscale_factor: Optional[UpscaleFactor] = None
    upscale_method: Optional[UpscaleMethod] = None


class LegacyMetadata(Edge):
    priority: Optional[Priority] = None
    timeout: Optional[TimeoutS] = None
    tags: Optional[Tags] = None
    stream: Optional[Stream] = None
    preview: Optional[bool] = None
    preview_size: Optional[PreviewSize] = None
    preview_every_steps: Optional[PreviewEverySteps] = None  # previews at most every N steps
    preview_interval_ms: Optional[PreviewIntervalMs] = None  # ... and M ms apart
    device: Optional[Name] = None


class PromptSubmission(Edge):
    model: Optional[LegacyModel] = None
    conditioning: LegacyConditioning
    hyperparameters: Optional[LegacyHyperparameters] = None
    # extensions so nothing a job holds is lost in the legacy view
    output: Optional[LegacyOutput] = None
    postprocessing: Optional[LegacyPostprocessing] = None
    precision: Optional[NestedPrecision] = None
    metadata: Optional[LegacyMetadata] = None


class LegacyGenerateRequest(Edge):
    action: Literal["generate"] = C.GENERATE_LEGACY_ACTION
    message_type: Optional[Literal["generate"]] = None
    session_id: Optional[Id] = None
    request_id: Optional[Id] = None
    stream: Optional[Stream] = None  # progress wanted
    preview: Optional[bool] = None  # progress with previews
    preview_size: Optional[PreviewSize] = None
    preview_every_steps: Optional[PreviewEverySteps] = None  # previews at most every N steps
    preview_interval_ms: Optional[PreviewIntervalMs] = None  # ... and M ms apart
    prompt_submission: PromptSubmission


# --- management messages ---------------------------------------------------------------------

class _Management(Edge):
    request_id: Optional[Id] = None
    session_id: Optional[Id] = None
    action: Optional[str] = None


class ModelLoadData(Edge):
    model_name: Optional[ModelRef] = None
    device: Optional[Name] = None


class ModelLoadRequest(_Management):
    """`data.model_name` (required) and optional `data.device`; the legacy `load_model` action
    may put them at the top level."""

    message_type: Optional[Literal["model_load_request", "load_model"]] = None
    data: Optional[ModelLoadData] = None
    model_name: Optional[ModelRef] = None
    device: Optional[Name] = None


class StatusRequest(_Management):
    message_type: Optional[Literal["status_request", "get_status"]] = None
    data: Optional[dict[str, Any]] = None


class InitializeRequest(_Management):
    message_type: Optional[Literal["initialize"]] = None
    data: Optional[dict[str, Any]] = None


class CleanupData(Edge):
    workers: Optional[_items(Name)] = None  # None: every worker
    models: Optional[_items(Name)] = None  # None: every model


class CleanupRequest(_Management):
    message_type: Optional[Literal["cleanup"]] = None
    data: Optional[CleanupData] = None
    workers: Optional[_items(Name)] = None
    models: Optional[_items(Name)] = None


class CancelData(Edge):
    request_id: Optional[Id] = None


class CancelRequest(_Management):
    """The id of the job to cancel: `data.request_id`, else the top-level `request_id`."""

    message_type: Optional[Literal["cancel_request"]] = None
    data: Optional[CancelData] = None


class ListModelsRequest(_Management):
    """Every model file each worker can load, by kind, with sizes and whether loaded."""

    message_type: Optional[Literal["list_models"]] = None
    data: Optional[dict[str, Any]] = None


class ListQueueData(Edge):
    include_prompts: Optional[bool] = None  # each row's prompt (first 200 chars): an operator's view


class ListQueueRequest(_Management):
    """Queued and running jobs: request id, priority, position, worker, stage, step, age
    (and, with `data.include_prompts`, the start of each prompt)."""

    message_type: Optional[Literal["list_queue"]] = None
    data: Optional[ListQueueData] = None


class ListHistoryData(Edge):
    limit: Optional[Annotated[int, Field(ge=1, le=C.MAX_HISTORY_LIMIT), R.HISTORY_LIMIT]] = None


class ListHistoryRequest(_Management):
    """Recent finished jobs (most recent first, `data.limit`, default 50), within the reply TTL."""

    message_type: Optional[Literal["list_history"]] = None
    data: Optional[ListHistoryData] = None


# request message type -> model (legacy `action` values included)
REQUEST_MODELS: dict[str, type[Edge]] = {
    C.GENERATE_FLAT: FlatGenerateRequest,
    C.GENERATE_NESTED: NestedGenerateRequest,
    C.GENERATE_LEGACY_ACTION: LegacyGenerateRequest,
    C.MODEL_LOAD: ModelLoadRequest,
    C.MODEL_LOAD_LEGACY: ModelLoadRequest,
    C.STATUS: StatusRequest,
    C.STATUS_LEGACY: StatusRequest,
    C.INITIALIZE: InitializeRequest,
    C.CLEANUP: CleanupRequest,
    C.CANCEL: CancelRequest,
    C.LIST_MODELS: ListModelsRequest,
    C.LIST_QUEUE: ListQueueRequest,
    C.LIST_HISTORY: ListHistoryRequest,
}
