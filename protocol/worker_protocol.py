"""The broker <-> worker protocol on the backend ROUTER (the product's own; docs/worker-protocol.md).

Every message is one msgpack map frame after the ROUTER's identity frame:
`{"t": <type>, "v": PROTOCOL_VERSION, ...fields}`. Each message type is a tagged msgspec
Struct below (the tag is the wire `t`), so a frame decodes straight into a typed, bounds-checked
object: a missing field takes its default, a wrong type or an out-of-range value makes the
whole frame a WorkerProtocolError (never a KeyError deep inside a handler); fields this version
does not know are ignored, so a newer peer may add optional fields.

Worker -> broker (decode_from_worker): Ready, WorkerHeartbeat, JobProgress, JobResult,
JobFailed, ManageReply, Disconnect.
Broker -> worker (decode_from_broker): BrokerHeartbeat, RunJob, AbortJob, Manage, Disconnect.
Both sides encode with encode(message). Adding a message type: a Struct here with its tag,
added to the union of the side that receives it, and a handler in that side's table
(broker/core.py for the broker, gpu_worker/transport.py for the worker).
"""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

import msgspec
from msgspec import Meta, Struct, field

from protocol import constants as C

PROTOCOL_VERSION = 1

# wire type tags (the `t` field); kept as names for logs and tests
READY = "READY"
HEARTBEAT = "HEARTBEAT"     # both ways, with other fields each way
PROGRESS = "PROGRESS"
RESULT = "RESULT"
ERROR = "ERROR"
MANAGE_REPLY = "MANAGE_REPLY"
DISCONNECT = "DISCONNECT"   # both ways
JOB = "JOB"
ABORT = "ABORT"
MANAGE = "MANAGE"

MANAGE_LOAD_MODEL = "load_model"
MANAGE_CLEANUP = "cleanup"
MANAGE_LIST_MODELS = "list_models"   # answered at once by the worker's IO thread

# The broker hands a worker at most this many jobs at once: one running plus one prefetched,
# so a worker never idles between jobs, yet everything else stays in the broker's queue where
# it can still be routed to whichever worker frees up first.
MAX_JOBS_PER_WORKER = 2


class WorkerProtocolError(ValueError):
    """A backend frame that is not a valid worker-protocol message."""


class WorkerVersionError(WorkerProtocolError):
    """A frame from a peer speaking another protocol version that this one cannot decode."""

    def __init__(self, message: str, kind: str, version: Any, worker_id: str | None):
        super().__init__(message)
        self.kind, self.version, self.worker_id = kind, version, worker_id


# --- bounded field types -------------------------------------------------------------------
Count = Annotated[int, Meta(ge=0)]
Seconds = Annotated[float, Meta(ge=0)]
MegaBytes = Annotated[float, Meta(ge=0)]
RequestId = Annotated[str, Meta(max_length=C.MAX_ID_CHARS)]
PreviewBytes = Annotated[bytes, Meta(max_length=4 * 1024 * 1024)]  # a preview is a few KB
Name = Annotated[str, Meta(max_length=C.MAX_NAME_CHARS)]
Text = Annotated[str, Meta(max_length=64 * 1024)]   # error messages, reasons
DispatchId = Annotated[int, Meta(ge=0)]
Names = Annotated[list[Name], Meta(max_length=10_000)]
BatchImages = Annotated[int, Meta(ge=1, le=1000)]


# --- telemetry (what a worker reports in READY and every HEARTBEAT) --------------------------
class DeviceMemory(Struct, kw_only=True):
    total_mb: MegaBytes = 0.0
    used_mb: MegaBytes = 0.0
    free_mb: Optional[MegaBytes] = None    # None: total - used


class LoadedModel(Struct, kw_only=True):
    name: Name
    kind: Name = ""
    size_mb: MegaBytes = 0.0


class Telemetry(Struct, kw_only=True, omit_defaults=True):
    """Executor.telemetry() on the wire (gpu_worker/executor_api.py). `models_loaded` is in the
    cache's LRU order, least recently used first: smart routing reads it to predict evictions.
    Fields at their default are left out of the frame (heartbeats are the bulk of the traffic)."""
    memory: DeviceMemory = field(default_factory=DeviceMemory)
    rss_mb: Optional[MegaBytes] = None
    cache_budget_mb: Optional[MegaBytes] = None
    cache_used_mb: Optional[MegaBytes] = None
    models_loaded: list[LoadedModel] = field(default_factory=list)
    models_loading: Names = field(default_factory=list)
    step_time_s: dict[Name, Seconds] = field(default_factory=dict)    # "model@WxH" -> s/step
    load_time_s: dict[Name, Seconds] = field(default_factory=dict)    # model -> s
    model_sizes_mb: dict[Name, MegaBytes] = field(default_factory=dict)
    loras_cached: Names = field(default_factory=list)
    controlnets_cached: Names = field(default_factory=list)
    cache_hits: Count = 0
    cache_misses: Count = 0
    cache_evictions: Count = 0
    simulated: bool = False
    cpu_threads: Optional[Count] = None        # the worker's torch/OpenMP/MKL threads
    cpu_affinity: Optional[Annotated[list[Count], Meta(max_length=100_000)]] = None  # its cores
    # what `upscale_method` may name on this worker without a path: its upscaler files' stems,
    # plus "realesrgan" when its default resolves; None: not reported (the broker then leaves
    # the name to the worker). Re-sent with every heartbeat, so a file added later counts.
    upscalers: Optional[Names] = None

    @classmethod
    def from_dict(cls, telemetry: dict) -> "Telemetry":
        """An executor's telemetry() dict, checked; unknown keys (an executor's own counters)
        are left out of the wire."""
        try:
            return msgspec.convert(telemetry, cls)
        except msgspec.ValidationError as exc:
            raise WorkerProtocolError(f"bad telemetry: {exc}") from None


# --- messages ------------------------------------------------------------------------------
class Message(Struct, tag_field="t", kw_only=True):
    v: int = PROTOCOL_VERSION


class Ready(Message, tag=READY):
    """worker -> broker: register (again, after a reconnect) with what it can run and holds."""
    worker_id: Name
    host: Name = ""
    pid: Count = 0
    device: Name = "cpu"
    device_type: Name = "cpu"
    device_name: Name = ""
    memory_total_mb: MegaBytes = 0.0
    capabilities: Names = field(default_factory=list)
    worker_types: Names = field(default_factory=list)
    simulated: bool = False
    telemetry: Telemetry = field(default_factory=Telemetry)
    # dynamic batching: images this worker runs in one call (--max-batch; 1: it does not batch)
    max_batch: BatchImages = 1


class WorkerHeartbeat(Message, tag=HEARTBEAT):
    """worker -> broker, every heartbeat interval."""
    telemetry: Telemetry = field(default_factory=Telemetry)
    busy: bool = False
    current_job: Optional[RequestId] = None   # the request_id it runs
    current_step: Count = 0                    # ... and the step it reached
    jobs_done: Count = 0
    jobs_failed: Count = 0


class JobProgress(Message, tag=PROGRESS):
    """worker -> broker, only for jobs with `stream`."""
    request_id: RequestId
    dispatch_id: DispatchId
    stage: Name
    step: Count = 0
    total_steps: Count = 0
    eta_s: Optional[Seconds] = None        # seconds left, from measured step times
    preview: Optional[PreviewBytes] = None  # JPEG of the latents, jobs with `preview` only


class JobResult(Message, tag=RESULT):
    request_id: RequestId
    dispatch_id: DispatchId
    data: dict[str, Any] = field(default_factory=dict)
    warnings: Annotated[list[Text], Meta(max_length=10_000)] = field(default_factory=list)
    execution_time: Seconds = 0.0


class JobFailed(Message, tag=ERROR):
    request_id: RequestId
    dispatch_id: DispatchId
    code: Name            # an ERROR_CODES entry; the broker maps others to internal_error
    message: Text = ""
    details: dict[str, Any] = field(default_factory=dict)


class ManageReply(Message, tag=MANAGE_REPLY):
    op_id: Count
    success: bool
    data: Optional[dict[str, Any]] = None
    code: Optional[Name] = None
    error: Optional[Text] = None


class Disconnect(Message, tag=DISCONNECT):
    """Both ways. From the broker, `fatal` says: do not come back."""
    reason: Text = ""
    fatal: bool = False


class BrokerHeartbeat(Message, tag=HEARTBEAT):
    """broker -> worker, every heartbeat interval; `registered` answers a READY."""
    registered: bool = False


class RunJob(Message, tag=JOB):
    request_id: RequestId
    attempt: Annotated[int, Meta(ge=1)]     # 1, 2, ... (re-dispatch after a lost worker)
    dispatch_id: DispatchId                 # unique, echoed back in PROGRESS/RESULT/ERROR
    job: dict[str, Any]                     # protocol.job.Job.to_wire()
    # jobs the broker sent together for one batched call, this one included (the worker waits
    # a moment for the rest: docs/worker-protocol.md, dynamic batching)
    batch_of: BatchImages = 1


class AbortJob(Message, tag=ABORT):
    request_id: RequestId
    dispatch_id: DispatchId
    reason: Name = "cancelled"             # "cancelled" | "timeout" | "stuck" (the watchdog)


class ManageArgs(Struct, kw_only=True, omit_defaults=True):
    model_name: Optional[Name] = None         # load_model
    models: Optional[Names] = None            # cleanup: these, or None for all


class Manage(Message, tag=MANAGE):
    op_id: Count
    op: Name                                # MANAGE_LOAD_MODEL | MANAGE_CLEANUP | MANAGE_LIST_MODELS
    args: ManageArgs = field(default_factory=ManageArgs)


FromWorker = Union[Ready, WorkerHeartbeat, JobProgress, JobResult, JobFailed, ManageReply, Disconnect]
FromBroker = Union[BrokerHeartbeat, RunJob, AbortJob, Manage, Disconnect]


# --- codec -------------------------------------------------------------------------------------
def _fallback(obj: Any) -> Any:
    """msgpack has no numpy scalars or paths: Python numbers, strings."""
    if isinstance(obj, memoryview):
        return bytes(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        try:
            return obj.item()
        except Exception:
            pass
    return str(obj)


_encoder = msgspec.msgpack.Encoder(enc_hook=_fallback)
_from_worker = msgspec.msgpack.Decoder(FromWorker)
_from_broker = msgspec.msgpack.Decoder(FromBroker)


class _Envelope(Struct):
    """Just enough of any frame to say which version and type it claims."""
    t: Any = None
    v: Any = None
    worker_id: Any = None


_envelope = msgspec.msgpack.Decoder(_Envelope)


# msgspec raises RecursionError (not a MsgspecError) for a frame nested deeper than it
# recurses, e.g. 100,000 maps inside each other: garbage like any other, never a crash
_UNDECODABLE = (msgspec.MsgspecError, RecursionError)


def encode(message: Message) -> bytes:
    """One frame for any message, either direction."""
    return _encoder.encode(message)


def decode_from_worker(frame: bytes) -> FromWorker:
    """The broker's decoder for a backend frame. Raises WorkerProtocolError (WorkerVersionError
    for a frame of another protocol version that does not decode as this one's)."""
    try:
        return _from_worker.decode(frame)
    except _UNDECODABLE as exc:
        raise _explain(frame, exc) from None


def decode_from_broker(frame: bytes) -> FromBroker:
    """The worker's decoder for a frame from the broker; raises WorkerProtocolError."""
    try:
        return _from_broker.decode(frame)
    except _UNDECODABLE as exc:
        raise _explain(frame, exc) from None


def _explain(frame: bytes, exc: Exception) -> WorkerProtocolError:
    try:
        env = _envelope.decode(frame)
    except _UNDECODABLE:
        return WorkerProtocolError(f"not a worker-protocol map: {exc}")
    if env.v is not None and env.v != PROTOCOL_VERSION:
        worker_id = env.worker_id if isinstance(env.worker_id, str) else None
        return WorkerVersionError(f"protocol version {env.v!r} ({exc})", str(env.t), env.v, worker_id)
    return WorkerProtocolError(f"bad {env.t} message: {exc}")
