"""Typed errors that cross the wire. Every failure a client sees carries one code from
protocol.constants.ERROR_CODES and, for validation, every problem with its field path."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol import constants as C


@dataclass(frozen=True)
class FieldError:
    field: str  # dotted path as the client sent it, e.g. "lora_weights[1]" or "data.dimensions.width"
    message: str

    def to_dict(self) -> dict:
        return {"field": self.field, "message": self.message}


class ProtocolError(Exception):
    """An error with a wire code. Raised anywhere; turned into one final error reply."""

    def __init__(self, code: str, message: str, errors: list[FieldError] | None = None):
        assert code in C.ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.errors: list[FieldError] = list(errors or [])


class ValidationFailed(ProtocolError):
    """All validation problems of one request, never just the first."""

    def __init__(self, errors: list[FieldError], message: str | None = None):
        summary = message or "; ".join(f"{e.field}: {e.message}" for e in errors) or "invalid request"
        super().__init__(C.VALIDATION_ERROR, summary, errors)


@dataclass
class JobError(Exception):
    """Raised by an executor for a job that failed in a way the client should hear about."""

    code: str
    message: str
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        assert self.code in C.ERROR_CODES, self.code
        super().__init__(self.message)
