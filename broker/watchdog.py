"""The stuck-job watchdog: which workers hold jobs but have shown no progress on them for
`--stuck-job-s`. A pure function of the worker records and the time; BrokerCore.tick acts on
what it finds (aborts the jobs there, re-queues them within --max-attempts, marks the worker
unhealthy), so every rule here is tested without sleeping.

Progress is judged per worker, not per job: a worker runs one job and may hold one more
prefetched behind it, which cannot move while the first is stuck. The registry stamps
WorkerRecord.progress_at when
- a worker that held no job is given one (the clock starts there);
- its heartbeat (every interval, streaming job or not) reports its work differently from the
  one before: busy or not, the job it runs, the step it reached, the models it is loading,
  its count of jobs answered. During a model load the step stays 0, but each model's load
  shows in models_loading as it begins;
- it sends PROGRESS, RESULT or ERROR for a job, or answers a management operation (a job
  queued on the worker behind a long model_load_request waited, it did not stall).
Not judged: a worker holding no job, and one running a model_load_request (that operation
has its own timeout).

Why the default is 300 s: the longest silent stretch of a healthy worker is one model load
(a first SDXL load from a slow or network disk, ~7 GB at 50 MB/s, is ~140 s; a single-file
checkpoint converted on load, longer) or one CPU step or VAE decode at 1024x1024 (under a
minute on a small CPU). 300 s stays above all of these with room; an operator who knows the
hardware can lower it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from broker.registry import WorkerRecord

DEFAULT_STUCK_JOB_S = 300.0


@dataclass(frozen=True)
class Stall:
    worker: WorkerRecord
    silent_s: float          # seconds since it last showed progress
    doing: str               # what its last heartbeat said it was doing, for the logs

    def reason(self) -> str:
        return f"no progress for {self.silent_s:.0f} s ({self.doing})"


def describe_work(worker: WorkerRecord) -> str:
    """What the worker last said it was doing, e.g. "running r1 at step 0, loading base"."""
    if worker.current_job is None:
        what = "running nothing"
    else:
        what = f"running {worker.current_job} at step {worker.current_step}"
    loading = worker.telemetry.models_loading
    if loading:
        what += f", loading {', '.join(loading)}"
    return what


def stalled(workers: Iterable[WorkerRecord], now: float, stuck_job_s: float) -> list[Stall]:
    """The live workers that hold jobs and have shown no progress for `stuck_job_s` (0: the
    watchdog is off)."""
    if stuck_job_s <= 0:
        return []
    found = []
    for worker in workers:
        if worker.lost or not worker.jobs or worker.loading:
            continue
        silent_s = now - worker.progress_at
        if silent_s >= stuck_job_s:
            found.append(Stall(worker, silent_s, describe_work(worker)))
    return found
