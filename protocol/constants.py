"""Names and numbers that cross the wire. Constants only (Majordomo style)."""

from __future__ import annotations

# --- client-facing message types (CONTRACT.md, "Message types") -------------------------
GENERATE_FLAT = "generate_sdxl_enhanced"
GENERATE_NESTED = "inference_request"
GENERATE_LEGACY_ACTION = "generate"  # legacy bodies carry `action`, not `message_type`
MODEL_LOAD = "model_load_request"
MODEL_LOAD_LEGACY = "load_model"
STATUS = "status_request"
STATUS_LEGACY = "get_status"
INITIALIZE = "initialize"
CLEANUP = "cleanup"
CANCEL = "cancel_request"
LIST_MODELS = "list_models"     # what each worker can load, by kind
LIST_QUEUE = "list_queue"       # queued and running jobs (no prompts)
LIST_HISTORY = "list_history"   # recent finished jobs, within the reply TTL
PROGRESS = "progress"

# request message type -> reply message type
REPLY_TYPE = {
    GENERATE_FLAT: "generate_sdxl_enhanced_response",
    GENERATE_NESTED: "inference_response",
    GENERATE_LEGACY_ACTION: "generate_response",
    MODEL_LOAD: "model_load_response",
    MODEL_LOAD_LEGACY: "model_load_response",
    STATUS: "status_response",
    STATUS_LEGACY: "status_response",
    INITIALIZE: "initialize_response",
    CLEANUP: "cleanup_response",
    CANCEL: "cancel_response",
    LIST_MODELS: "list_models_response",
    LIST_QUEUE: "list_queue_response",
    LIST_HISTORY: "list_history_response",
}

# list_models kinds: every model file a worker can load is one of these
MODEL_KINDS = ("base", "refiner", "vae", "lora", "controlnet", "embedding", "upscaler")
DEFAULT_HISTORY_LIMIT = 50      # list_history: most recent first
MAX_HISTORY_LIMIT = 1000

GENERATION_TYPES = frozenset({GENERATE_FLAT, GENERATE_NESTED, GENERATE_LEGACY_ACTION})

# the form a generation request came in; decides the reply type and the legacy/nested views
FORM_FLAT = "flat"
FORM_NESTED = "nested"
FORM_LEGACY = "legacy"
FORM_REPLY_TYPE = {
    FORM_FLAT: REPLY_TYPE[GENERATE_FLAT],
    FORM_NESTED: REPLY_TYPE[GENERATE_NESTED],
    FORM_LEGACY: REPLY_TYPE[GENERATE_LEGACY_ACTION],
}

# --- error codes (CONTRACT.md, "Replies"): the one catalogue ----------------------------
MALFORMED_MESSAGE = "malformed_message"
UNKNOWN_MESSAGE_TYPE = "unknown_message_type"
VALIDATION_ERROR = "validation_error"
MODEL_NOT_FOUND = "model_not_found"
UNSUPPORTED_FEATURE = "unsupported_feature"
QUEUE_FULL = "queue_full"
TIMEOUT = "timeout"
CANCELLED = "cancelled"
WORKER_LOST = "worker_lost"
OUT_OF_MEMORY = "out_of_memory"
DUPLICATE_REQUEST_ID = "duplicate_request_id"
INTERNAL_ERROR = "internal_error"
# the broker cannot take the request right now (its journal cannot be written: a full or
# failing disk); nothing was queued, the same request may be sent again later
UNAVAILABLE = "unavailable"
FORBIDDEN = "forbidden"   # an extension: this peer may not do that (docs/protocol.md, Ownership)

ERROR_CODES = (
    MALFORMED_MESSAGE, UNKNOWN_MESSAGE_TYPE, VALIDATION_ERROR, MODEL_NOT_FOUND,
    UNSUPPORTED_FEATURE, QUEUE_FULL, TIMEOUT, CANCELLED, WORKER_LOST, OUT_OF_MEMORY,
    DUPLICATE_REQUEST_ID, INTERNAL_ERROR, UNAVAILABLE, FORBIDDEN,
)

# --- priorities -----------------------------------------------------------------------------
PRIORITY_HIGH = "high"
PRIORITY_NORMAL = "normal"
PRIORITY_LOW = "low"
PRIORITIES = (PRIORITY_HIGH, PRIORITY_NORMAL, PRIORITY_LOW)  # served in this order

# --- progress stages ----------------------------------------------------------------------
STAGES = ("queued", "loading", "denoising", "refining", "postprocessing")

# --- worker types (Phase 6 seed's WorkerTypeResolver) ------------------------------------
WORKER_BASIC = "sdxl_worker"
WORKER_ENHANCED = "enhanced_sdxl_worker"

# --- codecs ---------------------------------------------------------------------------------
CODEC_JSON = "json"
CODEC_MSGPACK = "msgpack"

# --- defaults and bounds (Phase 6 seed; CONTRACT.md "Message types") ----------------------
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
DEFAULT_SEED = -1
DEFAULT_STRENGTH = 0.8
DEFAULT_SIZE = 1024
DEFAULT_FORMAT = "png"
DEFAULT_QUALITY = 95
DEFAULT_SAVE_PATH = "outputs/"
DEFAULT_SCHEDULER = "DPMSolverMultistepScheduler"
DEFAULT_DTYPE = "auto"   # float16 on accelerators, float32 on CPU (the worker decides)
DEFAULT_VAE_DTYPE = "float32"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_REFINER_SWITCH = 0.8
DEFAULT_MAX_MESSAGE_MB = 64

MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 256, 2048, 8
MIN_STEPS, MAX_STEPS = 1, 150
MIN_GUIDANCE, MAX_GUIDANCE = 1.0, 30.0
MIN_LORA_WEIGHT, MAX_LORA_WEIGHT = -2.0, 2.0
MIN_BATCH, MAX_BATCH = 1, 9
MIN_QUALITY, MAX_QUALITY = 1, 100
MIN_CONTROLNET_SCALE, MAX_CONTROLNET_SCALE = 0.0, 2.0

# the ten diffusers scheduler classes the Phase 6 seed lists
SCHEDULERS = (
    "DPMSolverMultistepScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
    "UniPCMultistepScheduler",
)
# A1111 samplers no class + Karras flag can express: a Job's `scheduler` may hold one of these
# names instead of a class; gpu_worker/schedulers.py maps each to a diffusers class + config
SAMPLER_SCHEDULERS = ("DPM++ 2M SDE", "DPM++ 3M SDE", "DPM++ 2S a", "LCM")
CONTROLNET_TYPES = ("canny", "depth", "pose", "scribble", "normal", "seg", "lineart")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
DTYPES = ("auto", "float16", "bfloat16", "float32")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")

# --- request size limits (protocol.models): generous, but a 1 MB prompt is a mistake ----------
MAX_PROMPT_CHARS = 10_000
MAX_NAME_CHARS = 1024  # model names, paths, devices, tokens
MAX_ID_CHARS = 256  # request_id / session_id
MAX_SEED = 2**63 - 1  # a C# long; -1 means "draw one"
MAX_CLIP_SKIP = 10
MAX_UPSCALE_FACTOR = 4.0  # what the worker's upscalers do (Real-ESRGAN models are x2/x4)
MAX_TIMEOUT_S = 86_400.0
MAX_TAGS = 64
MAX_LIST_ITEMS = 32  # LoRAs, ControlNets, textual inversions, workers, models per request
DEFAULT_UPSCALE_METHOD = "lanczos"
# upscale_method: built in, or the worker's default model upscaler; any other value names an
# upscaler model file (gpu_worker/upscalers.py), which only the worker can find
UPSCALE_METHODS = ("lanczos", "realesrgan")
UPSCALE_METHOD_ALIASES = ("real-esrgan", "esrgan")
# refiner_switch: the share of the steps the base runs; 0 and 1 would leave one model no step
MIN_REFINER_SWITCH, MAX_REFINER_SWITCH = 0.0, 1.0  # both excluded
DEFAULT_CONTROLNET_RESOLUTION = 512  # the seed's preprocessor.resolution

# --- progress previews (preview: true, or stream: "preview") ------------------------------
STREAM_PREVIEW = "preview"  # the `stream` value that asks for progress with previews
DEFAULT_PREVIEW_SIZE = 256  # longest side of a preview image, pixels
MIN_PREVIEW_SIZE, MAX_PREVIEW_SIZE = 32, 1024
# cadence: a preview at most every N steps and at most one per M ms (the first step always
# gets one); a request's preview_every_steps / preview_interval_ms, else the worker's settings
DEFAULT_PREVIEW_EVERY_STEPS = 1
DEFAULT_PREVIEW_INTERVAL_MS = 250
MAX_PREVIEW_EVERY_STEPS = MAX_STEPS  # more than a job's steps would mean: the first step only
MAX_PREVIEW_INTERVAL_MS = 60_000
