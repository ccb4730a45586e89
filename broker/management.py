"""Management operations forwarded to workers (model load, cleanup): which workers an operation
targets, the table of operations waiting for answers, and the one reply each gets.

No sockets and no broker state beyond the pending table: broker.core.BrokerCore asks these
functions whom to send a MANAGE to, records the operation here, feeds every MANAGE_REPLY, lost
worker and timeout back in, and sends the reply of each operation this hands back as complete.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

from protocol import constants as C
from protocol import normalize
from protocol import worker_protocol as W
from protocol.errors import ProtocolError
from protocol.replies import error_reply, final_reply

from broker import listings
from broker.jobs import Peer
from broker.registry import WorkerRecord

LOAD_TIMEOUT_S = 600.0     # a real SDXL load from a slow disk can take minutes
CLEANUP_TIMEOUT_S = 60.0


@dataclass
class ManageOp:
    op_id: int
    op: str                        # W.MANAGE_LOAD_MODEL | W.MANAGE_CLEANUP
    peer: Peer
    reply_type: str
    request_id: str | None
    waiting: set[str]              # worker ids that have not answered
    deadline: float
    started: float
    results: dict[str, dict] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    last_code: str | None = None   # the error code of the last failure recorded

    @property
    def done(self) -> bool:
        return not self.waiting


class PendingOps:
    """Management operations sent to workers and not yet answered, by op_id."""

    def __init__(self) -> None:
        self._ops: dict[int, ManageOp] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._ops)

    def start(self, op: str, peer: Peer, reply_type: str, request_id: str | None,
              worker_ids: set[str], now: float, timeout_s: float) -> ManageOp:
        pending = ManageOp(next(self._ids), op, peer, reply_type, request_id, set(worker_ids),
                           now + timeout_s, now)
        self._ops[pending.op_id] = pending
        return pending

    def answer(self, worker_id: str, reply: W.ManageReply) -> ManageOp | None:
        """Record a worker's MANAGE_REPLY. Returns the operation it answered (None for an op
        unknown or not waiting for this worker); a done one is forgotten here."""
        op = self._ops.get(reply.op_id)
        if op is None or worker_id not in op.waiting:
            return None
        op.waiting.discard(worker_id)
        if reply.success:
            op.results[worker_id] = reply.data or {}
        else:
            op.failures[worker_id] = f"{reply.code}: {reply.error}"
            op.results[worker_id] = {"error": reply.error, "error_code": reply.code}
            op.last_code = reply.code
        if op.done:
            del self._ops[op.op_id]
        return op

    def worker_lost(self, worker_id: str) -> list[ManageOp]:
        """A worker that will never answer: its pending answers become failures. Returns the
        operations this completed."""
        return self._fail_waiting(lambda op: worker_id in op.waiting and {worker_id},
                                  "worker_lost: worker lost before it answered", C.WORKER_LOST)

    def expire(self, now: float) -> list[ManageOp]:
        """Operations past their deadline, completed with a timeout for whoever is silent."""
        return self._fail_waiting(lambda op: now >= op.deadline and set(op.waiting),
                                  "timeout: no answer", C.TIMEOUT)

    def abandon_all(self, why: str) -> list[ManageOp]:
        """Every pending operation, failed for each silent worker with `why` (broker stopping)."""
        return self._fail_waiting(lambda op: set(op.waiting), why, C.INTERNAL_ERROR)

    def _fail_waiting(self, silent: Callable[[ManageOp], set[str] | bool], why: str,
                      code: str) -> list[ManageOp]:
        completed = []
        for op in list(self._ops.values()):
            worker_ids = silent(op)
            if not worker_ids:
                continue
            for worker_id in worker_ids:
                op.waiting.discard(worker_id)
                op.failures[worker_id] = why
            op.last_code = code
            if op.done:
                del self._ops[op.op_id]
                completed.append(op)
        return completed


def reply_for(op: ManageOp, now: float, device_of: Callable[[str], str | None]) -> dict:
    """The client's one final reply for a completed operation (`device_of`: a worker's device)."""
    elapsed = now - op.started
    if op.op == W.MANAGE_LIST_MODELS:   # what the others answered, even if one did not
        answered = {w: r for w, r in op.results.items() if w not in op.failures}
        return final_reply(op.reply_type, op.request_id, success=True,
                           data=listings.models_view(answered, {w: device_of(w) for w in answered}),
                           warnings=[f"worker {w} did not list its models: {why}"
                                     for w, why in sorted(op.failures.items())],
                           execution_time=elapsed)
    if op.op == W.MANAGE_LOAD_MODEL:
        worker_id, result = next(iter(op.results.items()), (next(iter(op.failures), None), {}))
        data = {**result, "worker_id": worker_id,
                "device": device_of(worker_id) if worker_id else None}
    else:
        data = {"workers": op.results}
    if op.failures:
        code = op.last_code if op.last_code in C.ERROR_CODES else C.INTERNAL_ERROR
        message = "; ".join(f"{w}: {why}" for w, why in sorted(op.failures.items()))
        reply = error_reply(op.reply_type, op.request_id, ProtocolError(code, message),
                            execution_time=elapsed)
        reply["data"] = data
        return reply
    return final_reply(op.reply_type, op.request_id, success=True, data=data,
                       execution_time=elapsed)


# --- whom an operation targets (pure functions of the request and the live workers) -------------
def param(parsed, *names, default=None):
    """The first of `names` the management request set in its params."""
    params = getattr(parsed, "params", None) or {}
    for name in names:
        if params.get(name) not in (None, "", []):
            return params[name]
    return default


def initialize_data(live: list[WorkerRecord]) -> dict:
    devices = [{"worker_id": w.worker_id, "device": w.device, "device_type": w.device_type,
                "device_name": w.device_name, "memory": w.memory, "simulated": w.simulated}
               for w in live]
    return {"ready": bool(live), "devices": devices,
            "models_loaded": {w.worker_id: sorted(w.models_loaded) for w in live},
            "workers": len(live), "schedulers": list(normalize.SCHEDULER_NAMES)}


def load_target(parsed, live: list[WorkerRecord]) -> WorkerRecord | ProtocolError:
    """The worker a model_load_request goes to (already holds it, else most free memory, then
    fewest jobs), or the error to answer with."""
    name = param(parsed, "model_name", "model")
    if not name:
        return ProtocolError(C.VALIDATION_ERROR, "model_load_request needs data.model_name")
    device = param(parsed, "device")
    if device:
        live = [w for w in live if device in (w.device, w.device_type, w.worker_id)]
        if not live:
            return ProtocolError(C.VALIDATION_ERROR, f"no registered worker on device {device}")
    if not live:
        return ProtocolError(C.UNSUPPORTED_FEATURE, "no worker is registered to load onto")
    return min(live, key=lambda w: (name not in w.models_loaded, -w.memory["free_mb"], len(w.jobs),
                                    w.worker_id))


def load_args(parsed) -> W.ManageArgs:
    return W.ManageArgs(model_name=str(param(parsed, "model_name", "model")))


def cleanup_targets(parsed, live: list[WorkerRecord]) -> list[WorkerRecord] | ProtocolError:
    """The workers a cleanup_request goes to (all live ones unless it names some)."""
    wanted = param(parsed, "workers", "worker_ids", "worker_id", "device")
    if isinstance(wanted, str):
        wanted = [wanted]
    targets = live if not wanted else [w for w in live if {w.worker_id, w.device} & set(wanted)]
    if wanted and not targets:
        return ProtocolError(C.VALIDATION_ERROR, f"no registered worker matches {wanted}")
    return targets


def cleanup_args(parsed) -> W.ManageArgs:
    models = param(parsed, "models", "model_names", "model_name")
    if isinstance(models, str):
        models = [models]
    return W.ManageArgs(models=[str(m) for m in models] if models else None)
