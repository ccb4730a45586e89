"""The seam between the worker transport (sockets, heartbeats) and what runs a job.

Two implementations: `gpu_worker.executor.DiffusersExecutor` (real pipelines) and
`gpu_worker.sim_executor.SimulatedExecutor` (a simulation for routing tests and benchmarks,
named as such everywhere). The transport calls `run` on its busy thread and `telemetry` from
its heartbeat thread, so `telemetry` must be cheap and thread-safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Union

from protocol.errors import JobError
from protocol.job import Job

# progress(stage, step, total_steps, *, eta_s=None, preview=None): stage is one of
# protocol.constants.STAGES; eta_s (seconds left, from measured step times) and preview (JPEG
# bytes of the current latents, only for jobs with `preview`) are optional keywords
ProgressFn = Callable[..., None]
# should_abort(): True once the job was cancelled or timed out; checked at every step
AbortFn = Callable[[], bool]


@dataclass
class BatchMember:
    """One job of a batched call (dynamic batching): the job with its own progress and abort."""
    job: Job
    progress: ProgressFn
    should_abort: AbortFn


Outcome = Union[dict, JobError]   # one job's reply data (as run() returns it), or its error


class Executor(Protocol):
    def describe(self) -> dict:
        """Static facts for READY: {device, device_type, device_name, memory_total_mb,
        capabilities: [features from Job.features the executor can run], worker_types: [...],
        simulated: bool}."""

    def telemetry(self) -> dict:
        """Live facts for HEARTBEAT: {memory: {total_mb, used_mb, free_mb}, rss_mb,
        cache_budget_mb, models_loaded: [{name, kind, size_mb}], models_loading: [names],
        step_time_s: {"model@WxH": seconds per step, moving average}, load_time_s: {name: s}}."""

    def run(self, job: Job, progress: ProgressFn, should_abort: AbortFn) -> dict:
        """Run a job. Returns the reply `data` (generated_images, processing_metrics,
        features_used) plus `warnings: [str]` (the transport moves them to the envelope).
        Raises protocol.errors.JobError with a catalogue code on failure; `cancelled` when
        should_abort() turned True (the transport then sends cancelled/timeout as it knows)."""

    def run_batch(self, members: list[BatchMember]) -> list[Outcome]:
        """Optional (dynamic batching): run compatible jobs (protocol.batching.batch_key) as one
        call. One outcome per member, in order; a failure or abort of one member is its own
        outcome and never the others'. An executor without it runs every job alone."""

    def load_model(self, name: str) -> dict:
        """Load a base model into the cache ahead of use. Returns {model, load_time_s}."""

    def list_models(self) -> dict:
        """Every model file this worker can load: {kind: [{name, size_mb, loaded}]} for each
        kind in protocol.constants.MODEL_KINDS. Called on the transport's IO thread: fast and
        thread-safe (a directory listing and the cache's snapshot)."""

    def cleanup(self, models: list[str] | None = None) -> dict:
        """Unload the named models (all when None) and free device memory.
        Returns {unloaded: [...], memory: {...}}."""
