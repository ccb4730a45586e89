"""The broker <-> worker protocol on the backend ROUTER (the product's own; docs/worker-protocol.md).

Every message is one msgpack map frame after the ROUTER's identity frame:
`{"v": PROTOCOL_VERSION, "t": <type>, ...fields}`. Constants and small builders only: no sockets.

Worker -> broker: READY, HEARTBEAT, PROGRESS, RESULT, ERROR, MANAGE_REPLY, DISCONNECT.
Broker -> worker: JOB, ABORT, MANAGE, HEARTBEAT, DISCONNECT.
"""

from __future__ import annotations

from typing import Any

import msgpack

PROTOCOL_VERSION = 1

# worker -> broker
READY = "READY"            # worker_id, host, pid, device, device_type, device_name,
                           # memory_total_mb, capabilities[], worker_types[], simulated, telemetry
HEARTBEAT = "HEARTBEAT"    # both ways; from a worker it carries telemetry + busy/current job
PROGRESS = "PROGRESS"      # request_id, dispatch_id, stage, step, total_steps
RESULT = "RESULT"          # request_id, dispatch_id, data, warnings, execution_time
ERROR = "ERROR"            # request_id, dispatch_id, code, message, details
MANAGE_REPLY = "MANAGE_REPLY"  # op_id, success, data, error, code
DISCONNECT = "DISCONNECT"  # both ways; `reason`

# broker -> worker
JOB = "JOB"                # request_id, attempt (1, 2, ...), dispatch_id (unique, echoed back),
                           # job (protocol.job.Job.to_wire())
ABORT = "ABORT"            # request_id, dispatch_id, reason ("cancelled" | "timeout")
MANAGE = "MANAGE"          # op_id, op ("load_model" | "cleanup"), args

MANAGE_LOAD_MODEL = "load_model"
MANAGE_CLEANUP = "cleanup"

# The broker hands a worker at most this many jobs at once: one running plus one prefetched,
# so a worker never idles between jobs, yet everything else stays in the broker's queue where
# it can still be routed to whichever worker frees up first.
MAX_JOBS_PER_WORKER = 2


class WorkerProtocolError(ValueError):
    """A backend frame that is not a valid worker-protocol message."""


def _fallback(obj: Any) -> Any:
    """msgpack has no sets, numpy scalars or paths: lists, Python numbers, strings."""
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if isinstance(obj, memoryview):
        return bytes(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        try:
            return obj.item()
        except Exception:
            pass
    return str(obj)


def pack(msg_type: str, **fields: Any) -> bytes:
    fields["v"] = PROTOCOL_VERSION
    fields["t"] = msg_type
    return msgpack.packb(fields, use_bin_type=True, default=_fallback)


def unpack(frame: bytes) -> dict:
    """Decode one backend frame. Raises WorkerProtocolError for garbage; the version is left
    for the caller to check (a READY with another version is refused with a log line)."""
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types on bad input
        raise WorkerProtocolError(f"not msgpack: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise WorkerProtocolError("not a worker-protocol map (no 't')")
    return msg
