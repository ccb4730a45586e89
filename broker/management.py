"""Management messages on the frontend: status, initialize, model load, cleanup, cancel.

Runs on the broker's loop thread (called from Broker._on_frontend). Model load and cleanup
are forwarded to workers as MANAGE messages; the client's reply is sent when every targeted
worker answered, or fails with worker_lost / timeout when one does not.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

from protocol import constants as C
from protocol import normalize
from protocol import worker_protocol as W
from protocol.errors import ProtocolError
from protocol.replies import error_reply, final_reply

from broker.jobs import QUEUED
from broker.registry import WorkerRecord

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 600.0     # a real SDXL load from a slow disk can take minutes
CLEANUP_TIMEOUT_S = 60.0
_op_ids = itertools.count(1)


@dataclass
class ManageOp:
    op_id: int
    op: str
    peer: object
    reply_type: str
    request_id: str | None
    waiting: set[str]
    deadline: float
    started: float
    results: dict[str, dict] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def _param(parsed, *names, default=None):
    params = getattr(parsed, "params", None) or {}
    for name in names:
        if params.get(name) not in (None, "", []):
            return params[name]
    return default


def handle(broker, peer, parsed) -> None:
    kind = parsed.message_type
    if kind in (C.STATUS, C.STATUS_LEGACY):
        broker.send_to(peer, final_reply(parsed.reply_type, parsed.request_id, success=True,
                                         data=broker.status(), warnings=parsed.warnings or ()))
    elif kind == C.INITIALIZE:
        _initialize(broker, peer, parsed)
    elif kind in (C.MODEL_LOAD, C.MODEL_LOAD_LEGACY):
        _model_load(broker, peer, parsed)
    elif kind == C.CLEANUP:
        _cleanup(broker, peer, parsed)
    elif kind == C.CANCEL:
        _cancel(broker, peer, parsed)
    else:
        broker.send_to(peer, error_reply(parsed.reply_type or "error_response", parsed.request_id,
                                         ProtocolError(C.UNKNOWN_MESSAGE_TYPE,
                                                       f"unknown message type {kind!r}")))


def _initialize(broker, peer, parsed) -> None:
    live = broker.registry.live()
    devices = [{"worker_id": w.worker_id, "device": w.device, "device_type": w.device_type,
                "device_name": w.device_name, "memory": w.memory, "simulated": w.simulated}
               for w in live]
    data = {"ready": bool(live), "devices": devices,
            "models_loaded": {w.worker_id: sorted(w.models_loaded) for w in live},
            "workers": len(live), "schedulers": list(normalize.SCHEDULER_NAMES)}
    warnings = list(parsed.warnings or [])
    if not live:
        warnings.append("no worker is registered yet")
    broker.send_to(peer, final_reply(parsed.reply_type, parsed.request_id, success=True,
                                     data=data, warnings=warnings))


def _fail(broker, peer, parsed, code: str, message: str) -> None:
    broker.send_to(peer, error_reply(parsed.reply_type, parsed.request_id,
                                     ProtocolError(code, message), warnings=parsed.warnings or ()))


def _model_load(broker, peer, parsed) -> None:
    name = _param(parsed, "model_name", "model")
    if not name:
        _fail(broker, peer, parsed, C.VALIDATION_ERROR, "model_load_request needs data.model_name")
        return
    device = _param(parsed, "device")
    live = broker.registry.live()
    if device:
        live = [w for w in live if device in (w.device, w.device_type, w.worker_id)]
        if not live:
            _fail(broker, peer, parsed, C.VALIDATION_ERROR, f"no registered worker on device {device}")
            return
    if not live:
        _fail(broker, peer, parsed, C.UNSUPPORTED_FEATURE, "no worker is registered to load onto")
        return
    # best worker: already holds it, else most free memory, then fewest jobs
    worker = min(live, key=lambda w: (name not in w.models_loaded, -w.memory["free_mb"], len(w.jobs),
                                      w.worker_id))
    _send_op(broker, peer, parsed, W.MANAGE_LOAD_MODEL, [worker], W.ManageArgs(model_name=str(name)),
             LOAD_TIMEOUT_S)
    worker.loading = True


def _cleanup(broker, peer, parsed) -> None:
    wanted = _param(parsed, "workers", "worker_ids", "worker_id", "device")
    models = _param(parsed, "models", "model_names", "model_name")
    if isinstance(wanted, str):
        wanted = [wanted]
    if isinstance(models, str):
        models = [models]
    live = broker.registry.live()
    targets = live if not wanted else [w for w in live if {w.worker_id, w.device} & set(wanted)]
    if wanted and not targets:
        _fail(broker, peer, parsed, C.VALIDATION_ERROR, f"no registered worker matches {wanted}")
        return
    if not targets:
        broker.send_to(peer, final_reply(parsed.reply_type, parsed.request_id, success=True,
                                         data={"workers": {}}, warnings=["no worker is registered"]))
        return
    _send_op(broker, peer, parsed, W.MANAGE_CLEANUP, targets,
             W.ManageArgs(models=[str(m) for m in models] if models else None), CLEANUP_TIMEOUT_S)


def _send_op(broker, peer, parsed, op: str, workers: list[WorkerRecord], args: W.ManageArgs,
             timeout_s: float) -> None:
    now = broker.clock()
    op_id = next(_op_ids)
    broker.manage_ops[op_id] = ManageOp(op_id, op, peer, parsed.reply_type, parsed.request_id,
                                        {w.worker_id for w in workers}, now + timeout_s, now)
    frame = W.encode(W.Manage(op_id=op_id, op=op, args=args))
    for w in workers:
        broker.backend.send_multipart([w.identity, frame])
    log.info("%s %s -> %s", op, args, ", ".join(w.worker_id for w in workers))


def on_reply(broker, worker: WorkerRecord, msg: W.ManageReply) -> None:
    op = broker.manage_ops.get(msg.op_id)
    if op is None or worker.worker_id not in op.waiting:
        return
    op.waiting.discard(worker.worker_id)
    if op.op == W.MANAGE_LOAD_MODEL:
        worker.loading = False
    if msg.success:
        op.results[worker.worker_id] = msg.data or {}
    else:
        op.failures[worker.worker_id] = f"{msg.code}: {msg.error}"
        op.results[worker.worker_id] = {"error": msg.error, "error_code": msg.code}
    broker._dirty = True
    if not op.waiting:
        complete(broker, op, msg.code)


def on_worker_lost(broker, worker: WorkerRecord) -> None:
    for op in list(broker.manage_ops.values()):
        if worker.worker_id in op.waiting:
            op.waiting.discard(worker.worker_id)
            op.failures[worker.worker_id] = "worker_lost: worker lost before it answered"
            if not op.waiting:
                complete(broker, op, C.WORKER_LOST)


def expire(broker, now: float) -> None:
    for op in list(broker.manage_ops.values()):
        if now >= op.deadline:
            for worker_id in op.waiting:
                op.failures[worker_id] = "timeout: no answer"
            op.waiting.clear()
            complete(broker, op, C.TIMEOUT)


def complete(broker, op: ManageOp, last_code: str | None) -> None:
    """Send the op's one final reply (all answers in, or failures recorded) and forget it."""
    broker.manage_ops.pop(op.op_id, None)
    elapsed = broker.clock() - op.started
    if op.op == W.MANAGE_LOAD_MODEL:
        worker_id, result = next(iter(op.results.items()), (next(iter(op.failures), None), {}))
        worker = broker.registry.get(worker_id) if worker_id else None
        data = {**result, "worker_id": worker_id, "device": worker.device if worker else None}
    else:
        data = {"workers": op.results}
    if op.failures:
        code = last_code if last_code in C.ERROR_CODES else C.INTERNAL_ERROR
        message = "; ".join(f"{w}: {why}" for w, why in sorted(op.failures.items()))
        reply = error_reply(op.reply_type, op.request_id, ProtocolError(code, message),
                            execution_time=elapsed)
        reply["data"] = data
    else:
        reply = final_reply(op.reply_type, op.request_id, success=True, data=data,
                            execution_time=elapsed)
    broker.send_to(op.peer, reply)


def _cancel(broker, peer, parsed) -> None:
    target = _param(parsed, "target_request_id", "cancel_request_id", "request_id",
                    default=parsed.request_id)
    state = broker.jobs.get(str(target)) if target is not None else None
    if state is None:
        _fail(broker, peer, parsed, C.VALIDATION_ERROR,
              f"no queued or running job with request_id {target!r}")
        return
    was = "queued" if state.state == QUEUED else "running"
    broker.abort(state, "cancelled")
    broker.finish(state, error_reply(state.reply_type, state.request_id, ProtocolError(
        C.CANCELLED, f"cancelled while {was}"), warnings=state.warnings,
        execution_time=broker.clock() - state.accepted_at))
    log.info("job %s cancelled while %s", state.request_id, was)
    broker.send_to(peer, final_reply(parsed.reply_type, parsed.request_id, success=True,
                                     data={"request_id": state.request_id, "cancelled": True,
                                           "state": was}))
