"""ETA of a queued job for its progress events: from the step times the workers measured
(heartbeat telemetry, `model@WxH` -> seconds per step) and the job's place in the queue.

A rough estimate by design: the jobs ahead are taken to cost what this one costs, shared over
the live workers; unknown step times (no worker has run this model yet) give no ETA rather
than a made-up one. Once a worker runs the job, its own PROGRESS carries the worker's eta_s.
"""

from __future__ import annotations

from typing import Iterable, Optional


def run_time_s(job, workers: Iterable) -> Optional[float]:
    """Seconds one job takes on the fastest worker that has measured its model and size."""
    times = [t for t in (w.step_time_s(job.models.base, job.width, job.height) for w in workers)
             if t is not None]
    if not times:
        return None
    steps = job.steps
    if job.init_image is not None and job.strength < 1.0:  # img2img runs strength x steps
        steps = max(1, round(job.steps * job.strength))
    return min(times) * steps


def queued_eta_s(job, position: Optional[int], workers: list) -> Optional[float]:
    """(jobs ahead + this one) x its run time / live workers; None when not estimable."""
    if position is None or not workers:
        return None
    one = run_time_s(job, workers)
    if one is None:
        return None
    return round((position // len(workers) + 1) * one, 3)
