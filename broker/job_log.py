"""One INFO line per finished job, what an operator reads to follow the broker's work:

    job 3f2a… completed: flat txt2img+lora on cpu-0, queue 0.01s, inference 7.10s, total 7.75s

With `--log-format json` the same facts are also the record's `job` object (request_id, form,
mode, worker, queue_s, inference_s, total_s, outcome, error_code, images, attempts), so a log
pipeline needs no parsing of the message.
"""

from __future__ import annotations

import logging

from broker.metrics import outcome_of

log = logging.getLogger("broker.jobs")


def job_mode(job) -> str:
    """txt2img, img2img or inpaint, plus what the job adds on top: "img2img+lora+controlnet"."""
    base = ("inpaint" if job.mask_image is not None
            else "img2img" if job.init_image is not None else "txt2img")
    extras = [name for name, used in (("lora", job.loras), ("controlnet", job.controlnets),
                                      ("ti", job.textual_inversions), ("refiner", job.models.refiner))
              if used]
    return "+".join([base, *extras])


def finished_fields(state, reply: dict, now: float) -> dict:
    data = reply.get("data") if isinstance(reply.get("data"), dict) else {}
    processing = data.get("processing_metrics") if isinstance(data.get("processing_metrics"), dict) else {}
    inference_s = processing.get("inference_time")
    return {
        "request_id": state.request_id,
        "form": state.job.form,
        "mode": job_mode(state.job),
        "worker": processing.get("worker_id") or state.worker_id,
        "queue_s": round(state.dispatched_at - state.accepted_at, 3) if state.attempt else None,
        "inference_s": round(float(inference_s), 3) if isinstance(inference_s, (int, float)) else None,
        "total_s": round(max(now - state.accepted_at, 0.0), 3),
        "outcome": outcome_of(reply),
        "error_code": reply.get("error_code"),
        "images": len(data.get("generated_images") or []),
        "attempts": state.attempt,
    }


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.2f}s"


def log_finished(state, reply: dict, now: float) -> None:
    """The job's one line (called once, where the broker sends its final reply)."""
    job = finished_fields(state, reply, now)
    where = f" on {job['worker']}" if job["worker"] else " (never ran)"
    error = f", error {job['error_code']}" if job["error_code"] else ""
    log.info("job %s %s: %s %s%s, queue %s, inference %s, total %s%s", job["request_id"],
             job["outcome"], job["form"], job["mode"], where, _seconds(job["queue_s"]),
             _seconds(job["inference_s"]), _seconds(job["total_s"]), error, extra={"job": job})
