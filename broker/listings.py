"""What the listing messages answer (list_models, list_queue, list_history), built from the
broker's state as plain dicts in the contract's reply style (protocol/reply_models.py has
their schemas). Pure functions: the broker calls them on its loop thread."""

from __future__ import annotations

from typing import Callable

from protocol import constants as C
from protocol import normalize

from broker.jobs import QUEUED, JobState
from broker.metrics import outcome_of

LIST_MODELS_TIMEOUT_S = 10.0   # workers answer from their IO thread: a directory listing


PROMPT_SHOWN_CHARS = 200        # list_queue with include_prompts: the start of each prompt


def _everyone(state) -> bool:
    return True


def queue_view(jobs: dict, queue, now: float, include_prompts: bool = False,
               prompt_visible: Callable[[JobState], bool] = _everyone) -> dict:
    """Jobs on workers first (oldest first; a worker holds at most one running and one
    prefetched, stage "dispatched" until it starts), then queued ones in serving order, running
    ones with their step. Prompts only when asked (`include_prompts`: an operator's dashboard),
    and only of the jobs `prompt_visible` says the asker may read (broker.access)."""
    rows = []
    for state in jobs.values():
        queued = state.state == QUEUED
        stage = "queued"
        if not queued:   # sent to a worker; "dispatched" until it reports a stage (prefetched)
            stage = state.stage or "dispatched"
        rows.append({
            "request_id": state.request_id,
            "priority": state.job.priority,
            "state": "queued" if queued else "running",
            "position": queue.position(state.request_id) if queued else None,
            "worker_id": None if queued else state.worker_id,
            "stage": stage,
            "age_s": round(max(now - state.accepted_at, 0.0), 3),
            "attempt": state.attempt,
            "step": 0 if queued else state.step,
            "total_steps": 0 if queued else state.total_steps,
        })
        if include_prompts and prompt_visible(state):
            rows[-1]["prompt"] = state.job.prompt[:PROMPT_SHOWN_CHARS]
    running = sorted((r for r in rows if r["state"] == "running"), key=lambda r: -r["age_s"])
    waiting = sorted((r for r in rows if r["state"] == "queued"),
                     key=lambda r: (r["position"] is None, r["position"] or 0))
    return {"jobs": running + waiting, "queued": len(waiting), "running": len(running)}


def history_view(journal, limit: int) -> dict:
    """The newest finished jobs still in the journal (reply TTL), newest first."""
    jobs = []
    for request_id, finished_at, reply in journal.recent(limit):
        data = reply.get("data") if isinstance(reply.get("data"), dict) else {}
        metrics = data.get("processing_metrics") if isinstance(data.get("processing_metrics"), dict) else {}
        jobs.append({
            "request_id": request_id,
            "outcome": outcome_of(reply),
            "error_code": reply.get("error_code"),
            "finished_at": round(float(finished_at), 3),
            "total_time": metrics.get("total_time", reply.get("execution_time")),
            "queue_time": metrics.get("queue_time"),
            "inference_time": metrics.get("inference_time"),
            "worker_id": metrics.get("worker_id"),
            "images": [image.get("path") for image in data.get("generated_images") or []
                       if isinstance(image, dict) and image.get("path")],
        })
    return {"jobs": jobs, "reply_ttl_s": float(journal.reply_ttl_s)}


def models_view(results: dict[str, dict], devices: dict[str, str]) -> dict:
    """Per worker what it can load ({worker_id: {"models": {kind: [...]}}} as the workers
    answered), and the pool's view by kind: each model once, with who can load it and who
    holds it now."""
    workers = []
    pool: dict[str, dict[str, dict]] = {kind: {} for kind in C.MODEL_KINDS}
    for worker_id in sorted(results):
        listing = (results[worker_id] or {}).get("models") or {}
        models = {kind: list(listing.get(kind) or []) for kind in C.MODEL_KINDS}
        workers.append({"worker_id": worker_id, "device": devices.get(worker_id) or "?",
                        "models": models})
        for kind, entries in models.items():
            for entry in entries:
                name = str(entry.get("name"))
                row = pool[kind].setdefault(name, {"name": name, "size_mb": 0.0, "workers": [],
                                                   "loaded_on": []})
                row["size_mb"] = max(row["size_mb"], float(entry.get("size_mb") or 0.0))
                row["workers"].append(worker_id)
                if entry.get("loaded"):
                    row["loaded_on"].append(worker_id)
    return {"models": {kind: sorted(rows.values(), key=lambda r: r["name"])
                       for kind, rows in pool.items()},
            "workers": workers,
            "schedulers": list(normalize.SCHEDULER_NAMES)}
