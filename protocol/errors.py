"""Typed errors that cross the wire. Every failure a client sees carries one code from
protocol.constants.ERROR_CODES and, for validation, every problem with its field path."""

from __future__ import annotations

from contextlib import contextmanager
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

    def name_fields(self, client_path) -> None:
        """details["errors"] = [{field, message}] with each canonical field (details["field"]
        or details["errors"]) renamed by `client_path` to the path the client sent."""
        given = self.details.get("errors")
        if not isinstance(given, list):
            given = [{"field": self.details["field"], "message": self.message}] \
                if isinstance(self.details.get("field"), str) else []
        self.details["errors"] = [{"field": client_path(e["field"]), "message": e["message"]}
                                  for e in given]


@contextmanager
def about_field(canonical: str):
    """A JobError raised inside that names no field gets `canonical` (e.g. a model not found
    while resolving `models.refiner`)."""
    try:
        yield
    except JobError as exc:
        exc.details.setdefault("field", canonical)
        raise


def worker_field_errors(details: object) -> list[FieldError]:
    """The `errors` a worker's failure names (JobError.name_fields wrote them in the client's
    form), checked: it is data from another process."""
    given = details.get("errors") if isinstance(details, dict) else None
    if not isinstance(given, list):
        return []
    return [FieldError(e["field"], e["message"]) for e in given[:100]
            if isinstance(e, dict) and isinstance(e.get("field"), str)
            and isinstance(e.get("message"), str)]
