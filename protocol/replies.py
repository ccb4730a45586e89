"""Builders for the contract's reply envelopes: final (success or error) and progress."""

from __future__ import annotations

import time
from typing import Any, Iterable

from protocol import constants as C
from protocol.errors import FieldError, ProtocolError


def final_reply(
    message_type: str,
    request_id: str | None,
    *,
    success: bool,
    data: Any = None,
    error: str | None = None,
    error_code: str | None = None,
    errors: Iterable[FieldError | dict] = (),
    warnings: Iterable[str] = (),
    execution_time: float = 0.0,
) -> dict:
    """The one final reply every request gets (CONTRACT.md "Replies")."""
    if error_code is not None:
        assert error_code in C.ERROR_CODES, error_code
    return {
        "message_type": message_type,
        "request_id": request_id,
        "final": True,
        "success": success,
        "error": error,
        "error_code": error_code,
        "errors": [e.to_dict() if isinstance(e, FieldError) else dict(e) for e in errors],
        "warnings": list(warnings),
        "execution_time": float(execution_time),
        "timestamp": time.time(),
        "data": data,
    }


def error_reply(message_type: str, request_id: str | None, exc: ProtocolError,
                warnings: Iterable[str] = (), execution_time: float = 0.0) -> dict:
    return final_reply(message_type, request_id, success=False, error=exc.message,
                       error_code=exc.code, errors=exc.errors, warnings=warnings,
                       execution_time=execution_time)


def progress_message(request_id: str, stage: str, *, step: int = 0, total_steps: int = 0,
                     queue_position: int | None = None, worker_id: str | None = None,
                     eta_s: float | None = None, preview: bytes | None = None) -> dict:
    """A progress event; `eta_s` and `preview` (JPEG bytes: msgpack binary, base64 in JSON)
    only when known, so streams without previews stay as they were."""
    assert stage in C.STAGES, stage
    message = {
        "message_type": C.PROGRESS,
        "request_id": request_id,
        "final": False,
        "stage": stage,
        "step": step,
        "total_steps": total_steps,
        "queue_position": queue_position,
        "worker_id": worker_id,
    }
    if eta_s is not None:
        message["eta_s"] = eta_s
    if preview is not None:
        message["preview"] = preview
    return message
