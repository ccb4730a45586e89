"""pydantic models of what the broker sends back (CONTRACT.md "Replies"). The broker builds
replies as plain dicts (protocol.replies, for speed); these classes exist to describe them:
the JSON Schemas in protocol/schemas/ are generated from them, and tests validate real replies
against them."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from protocol import constants as C

ErrorCode = Literal[C.ERROR_CODES]  # type: ignore[valid-type]
Stage = Literal[C.STAGES]  # type: ignore[valid-type]
ImageData = Annotated[Union[bytes, str], WithJsonSchema(
    {"type": "string", "description": "the encoded image: base64 in JSON, binary in msgpack"})]


class Reply(BaseModel):
    # replies may gain fields; clients should ignore what they do not know
    model_config = ConfigDict(extra="allow")


class ErrorItem(Reply):
    field: str
    message: str


class GeneratedImage(Reply):
    index: int
    seed: int
    width: int
    height: int
    format: str
    path: Optional[str] = None
    sha256: Optional[str] = None
    image: Optional[ImageData] = None  # only when the request set return_images


class ProcessingMetrics(Reply):
    total_time: float
    queue_time: float
    inference_time: float
    preprocessing_time: float
    postprocessing_time: float
    device_name: str
    worker_id: str
    memory_used_mb: float
    model_info: dict[str, Any] = {}


class GenerationData(Reply):
    generated_images: list[GeneratedImage]
    processing_metrics: ProcessingMetrics
    features_used: list[str]


class BrokerStatus(Reply):
    uptime_s: float
    queue_depth: int
    inflight: int
    completed: int
    failed: int


class WorkerMemory(Reply):
    total_mb: float
    used_mb: float
    free_mb: float


class WorkerStatus(Reply):
    worker_id: str
    host: str
    pid: int
    device: str
    device_type: str
    state: Literal["idle", "busy", "loading", "lost"]
    memory: WorkerMemory
    models_loaded: list[Union[str, dict[str, Any]]]
    jobs_done: int
    last_heartbeat_s: float


class StatusData(Reply):
    broker: BrokerStatus
    workers: list[WorkerStatus]


class FinalReply(Reply):
    """Every request gets exactly one of these."""

    message_type: str
    request_id: Optional[str]
    final: Literal[True]
    success: bool
    error: Optional[str]
    error_code: Optional[ErrorCode]
    errors: list[ErrorItem]
    warnings: list[str]
    execution_time: float
    timestamp: float
    data: Any = None


class GenerationReply(FinalReply):
    """generate_sdxl_enhanced_response / inference_response / generate_response."""

    data: Optional[GenerationData] = None


class StatusReply(FinalReply):
    message_type: Literal["status_response"]
    data: Optional[StatusData] = None


class ProgressMessage(Reply):
    """Opt-in (stream: true), DEALER peers only; never final."""

    message_type: Literal["progress"]
    request_id: str
    final: Literal[False]
    stage: Stage
    step: int
    total_steps: int
    queue_position: Optional[int] = None
    worker_id: Optional[str] = None
    eta_s: Optional[float] = None  # seconds left, from measured step times
    preview: Optional[str] = Field(None, description="JPEG of the current latents (base64 in "
                                                     "JSON, binary in msgpack); preview: true only")


# --- listings (list_models, list_queue, list_history) ------------------------------------------
ModelKind = Literal[C.MODEL_KINDS]  # type: ignore[valid-type]


class ModelFile(Reply):
    """One model a worker can load: its name as a request names it, its size on disk."""
    name: str
    size_mb: float
    loaded: bool


class WorkerModels(Reply):
    worker_id: str
    device: str
    models: dict[ModelKind, list[ModelFile]]   # every kind present, possibly empty


class PoolModel(Reply):
    """One model across the pool: which workers can load it and which hold it now."""
    name: str
    size_mb: float
    workers: list[str]
    loaded_on: list[str]


class ListModelsData(Reply):
    models: dict[ModelKind, list[PoolModel]]
    workers: list[WorkerModels]
    schedulers: list[str]


class ListModelsReply(FinalReply):
    message_type: Literal["list_models_response"]
    data: Optional[ListModelsData] = None


class QueuedJob(Reply):
    request_id: str
    priority: Literal[C.PRIORITIES]  # type: ignore[valid-type]
    state: Literal["queued", "running"]
    position: Optional[int]          # 0-based serving order while queued, None when running
    worker_id: Optional[str]         # the worker running it
    stage: str                       # queued, dispatched (on a worker, not started), loading, denoising, refining, postprocessing
    age_s: float                     # since the broker accepted it
    attempt: int
    step: int                        # running: the worker's last reported step of total_steps
    total_steps: int                 # (0 until it reports one, and while queued)
    prompt: Optional[str] = None     # data.include_prompts only: the prompt's first 200 characters


class ListQueueData(Reply):
    jobs: list[QueuedJob]            # running first, then queued in serving order
    queued: int
    running: int


class ListQueueReply(FinalReply):
    message_type: Literal["list_queue_response"]
    data: Optional[ListQueueData] = None


class FinishedJob(Reply):
    request_id: str
    outcome: Literal["completed", "failed", "cancelled"]
    error_code: Optional[ErrorCode]
    finished_at: float               # Unix time
    total_time: Optional[float]
    queue_time: Optional[float]
    inference_time: Optional[float]
    worker_id: Optional[str]
    images: list[str]                # paths the worker saved them under


class ListHistoryData(Reply):
    jobs: list[FinishedJob]          # most recent first
    reply_ttl_s: float


class ListHistoryReply(FinalReply):
    message_type: Literal["list_history_response"]
    data: Optional[ListHistoryData] = None
