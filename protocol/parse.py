"""The broker's one entry point for a decoded request body: which message it is, who to answer,
and (for generation) the canonical Job. Validation reports every problem with the field path as
the client wrote it; nothing but a ProtocolError ever leaves this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import ValidationError

from protocol import constants as C
from protocol import models as M
from protocol import rule_texts as R
from protocol import rules, translate
from protocol.request_ids import message_type_of as _message_type
from protocol.request_ids import request_id_of as _request_id
from protocol.errors import FieldError, ProtocolError, ValidationFailed
from protocol.job import Job

log = logging.getLogger(__name__)

ERROR_REPLY_TYPE = "error_response"  # the reply type for a body whose type is unknown
# fields that change delivery, not the job
_TRANSPORT_ONLY = ("stream", "preview", "preview_size", "preview_every_steps", "preview_interval_ms")
_TRANSPORT_ONLY_SET = frozenset(_TRANSPORT_ONLY)
_STR_ONLY = frozenset({str})
_GENERATION = frozenset({C.GENERATE_FLAT, C.GENERATE_NESTED, C.GENERATE_LEGACY_ACTION})


@dataclass(frozen=True)
class ParsedRequest:
    message_type: str  # as received (legacy generate bodies -> "generate"; load_model as sent)
    reply_type: str  # protocol.constants.REPLY_TYPE[message_type]
    # the request's id: the one the client sent, or for a generation request that sent none a
    # new one (also job.request_id); None only for a management message that sent none
    request_id: Optional[str]
    job: Optional[Job]  # the three generation forms
    params: dict = field(default_factory=dict)  # management messages' validated fields
    warnings: list[str] = field(default_factory=list)


def peek(body: Any) -> tuple[str, Optional[str]]:
    """(reply message_type, request_id) from any decoded body, never raises; used to address
    error replies. Unknown types -> reply type "error_response"."""
    try:
        if not isinstance(body, dict):
            return ERROR_REPLY_TYPE, None
        mt = _message_type(body)
        reply = C.REPLY_TYPE.get(mt, ERROR_REPLY_TYPE) if isinstance(mt, str) else ERROR_REPLY_TYPE
        return reply, _request_id(body, mt)
    except Exception:  # a body is data from anyone: addressing an error must not fail
        return ERROR_REPLY_TYPE, None


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


# pydantic error types that say a value has the wrong type, worded by the table's type rules
_TYPE_RULES = {
    "int_type": R.INTEGER, "int_from_float": R.INTEGER, "int_parsing": R.INTEGER,
    "float_type": R.NUMBER, "float_parsing": R.NUMBER, "finite_number": R.FINITE,
    "bool_type": R.BOOLEAN, "bool_parsing": R.BOOLEAN, "string_type": R.STRING,
    "bytes_type": R.STRING, "list_type": R.LIST, "model_type": R.OBJECT,
    "model_attributes_type": R.OBJECT, "dict_type": R.OBJECT, "missing": R.MISSING,
}
_NO_RULE = object()
_RULE_AT: dict[tuple, Any] = {}  # (model class, loc with indices as 0) -> its Rule or _NO_RULE


def _levels(annotation: Any):
    """`annotation` and what Optional / Union / Annotated wrap around it, not list items."""
    yield annotation
    for arg in typing.get_args(annotation) if typing.get_origin(annotation) is not list else ():
        yield from _levels(arg)


def _marker(annotation: Any, metadata) -> Optional[R.Rule]:
    for item in metadata:
        if isinstance(item, R.Rule):
            return item
    for level in _levels(annotation):
        for item in getattr(level, "__metadata__", ()):
            if isinstance(item, R.Rule):
                return item
    return None


def _item_type(annotation: Any) -> Any:
    for level in _levels(annotation):
        if typing.get_origin(level) is list:
            return typing.get_args(level)[0]
    return None


def _rule_at(cls: type, loc: tuple) -> Optional[R.Rule]:
    """The rule marked on the type of the field at `loc` (pydantic's error location) in `cls`.
    Runs only for a refused request; cached per location."""
    key = (cls, tuple(0 if isinstance(p, int) else p for p in loc))
    found = _RULE_AT.get(key)
    if found is None:
        annotation, metadata, model = None, (), cls
        for part in loc:
            if isinstance(part, int):
                annotation, metadata = _item_type(annotation), ()
            else:
                info = model.model_fields.get(part) if model is not None else None
                if info is None:
                    annotation = None
                    break
                annotation, metadata = info.annotation, info.metadata
            model = next((a for a in _levels(annotation)
                          if isinstance(a, type) and issubclass(a, M.Edge)), None)
        rule = _marker(annotation, metadata) if annotation is not None else None
        found = _RULE_AT[key] = rule if rule is not None else _NO_RULE
    return None if found is _NO_RULE else found


def _message(err: dict, cls: type) -> str:
    """An error in the table's words (protocol.rule_texts): our validators raise them, type
    errors have one rule each, a bound error takes the rule marked on the field's type."""
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid"))
    if kind == "value_error":
        return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg
    rule = _TYPE_RULES.get(kind)
    if rule is not None:
        return rule.message
    if kind == "literal_error":
        return R.LITERAL(expected=str((err.get("ctx") or {}).get("expected", "")))
    rule = _rule_at(cls, tuple(err.get("loc", ())))
    return rule.message if rule is not None else msg  # tests/protocol/test_rule_texts.py: never


def _field_errors(exc: ValidationError, cls: type) -> list[FieldError]:
    return [FieldError(_path(e["loc"]), _message(e, cls))
            for e in exc.errors(include_url=False, include_input=False)]


# per request model: its field names, and the fields that hold request models as
# (name, model class, holds a list of them, the class's field names when it holds no request
# models itself, else None); the unknown-field walk reads the raw body
_Shape = tuple[frozenset, tuple[tuple[str, type, bool, Optional[frozenset]], ...]]
_SHAPES: dict[type, _Shape] = {}


def _edge_in(annotation: Any) -> tuple[Optional[type], bool]:
    if isinstance(annotation, type) and issubclass(annotation, M.Edge):
        return annotation, False
    is_list = typing.get_origin(annotation) is list
    for arg in typing.get_args(annotation):
        cls, inner_list = _edge_in(arg)
        if cls is not None:
            return cls, is_list or inner_list
    return None, False


def _children(cls: type) -> list[tuple[str, type, bool]]:
    out = []
    for name, info in cls.model_fields.items():
        child, is_list = _edge_in(info.annotation)
        if child is not None:
            out.append((name, child, is_list))
    return out


def _shape(cls: type) -> _Shape:
    shape = _SHAPES.get(cls)
    if shape is None:
        children = tuple((name, child, is_list,
                          None if _children(child) else frozenset(child.model_fields))
                         for name, child, is_list in _children(cls))
        shape = _SHAPES[cls] = (frozenset(cls.model_fields), children)
    return shape


def _add_unknown(body: dict, known: frozenset, path: str, out: list[str]) -> None:
    out.extend(f"{path}.{k}" if path else str(k) for k in sorted(body.keys() - known, key=str))


def _unknown_fields(body: dict, cls: type, path: str, out: list[str]) -> None:
    """Keys of a (validated) body that its model does not know, with their paths, in field
    order (stable warnings). A child model without request models of its own (most of them)
    is checked here rather than by a call per child: this walk runs on every request."""
    known, children = _SHAPES.get(cls) or _shape(cls)
    if not known.issuperset(body):
        _add_unknown(body, known, path, out)
    for name, child, is_list, leaf_known in children:
        value = body.get(name)
        if value is None:
            continue
        if not is_list:
            if leaf_known is None:
                _unknown_fields(value, child, f"{path}.{name}" if path else name, out)
            elif not leaf_known.issuperset(value):
                _add_unknown(value, leaf_known, f"{path}.{name}" if path else name, out)
            continue
        for i, item in enumerate(value):
            if leaf_known is None:
                _unknown_fields(item, child, f"{path}.{name}[{i}]" if path else f"{name}[{i}]", out)
            elif not leaf_known.issuperset(item):
                _add_unknown(item, leaf_known, f"{path}.{name}[{i}]" if path else f"{name}[{i}]",
                             out)


def _unknown_warnings(body: dict, cls: type) -> list[str]:
    names: list[str] = []
    _unknown_fields(body, cls, "", names)
    if not names:
        return []
    if len(names) == 1:
        return [f"unknown field '{names[0]}' ignored"]
    return [f"unknown fields ignored: {', '.join(names)}"]


def parse_request(body: dict, *, default_model_base: Optional[str] = None,
                  allow_pickle: bool = False) -> ParsedRequest:
    """Validate + translate. Raises protocol.errors.ValidationFailed (every problem, each with its
    field path as the client wrote it) or ProtocolError(UNKNOWN_MESSAGE_TYPE / MALFORMED_MESSAGE).
    Never any other exception, whatever the body."""
    try:
        return _parse(body, default_model_base, allow_pickle)
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError(C.MALFORMED_MESSAGE, "body nests too deeply") from None
    except Exception as exc:  # a bug here must cost one request, never the broker
        log.exception("parse_request failed unexpectedly")
        raise ProtocolError(C.INTERNAL_ERROR, f"cannot parse request: {type(exc).__name__}") from None


def _parse(body: Any, default_model_base: Optional[str], allow_pickle: bool) -> ParsedRequest:
    if not isinstance(body, dict):
        raise ProtocolError(C.MALFORMED_MESSAGE, "body is not an object/map")
    mt = _message_type(body)
    if not isinstance(mt, str) or mt not in M.REQUEST_MODELS:
        known = ", ".join(sorted(M.REQUEST_MODELS))
        if mt is None:
            raise ProtocolError(C.UNKNOWN_MESSAGE_TYPE,
                                f"no message_type (or legacy action); known: {known}")
        shown = mt[:100] if isinstance(mt, str) else type(mt).__name__
        raise ProtocolError(C.UNKNOWN_MESSAGE_TYPE, f"unknown message_type {shown!r}; known: {known}")
    # set(map(type, ...)) runs in C; only a body with other key types needs the exact check
    if set(map(type, body)) != _STR_ONLY and any(not isinstance(k, str) for k in body):
        raise ProtocolError(C.MALFORMED_MESSAGE, "body keys must be strings")

    errors: list[FieldError] = []
    model = None
    try:
        model = M.REQUEST_MODELS[mt].model_validate(body, context={"allow_pickle": allow_pickle})
    except ValidationError as exc:
        errors.extend(_field_errors(exc, M.REQUEST_MODELS[mt]))
    errors.extend(rules.cross_field_errors(mt, body, default_model_base))
    if errors:
        raise ValidationFailed(_dedupe(errors))

    warnings = _unknown_warnings(body, type(model))
    reply_type = C.REPLY_TYPE[mt]
    # the one place that decides a request's id: what the client sent, else (generation) a new one
    request_id = _request_id(body, mt)
    if request_id is None and mt in _GENERATION:
        request_id = translate.new_request_id()
    job = None
    params: dict = {}
    if mt == C.GENERATE_FLAT:
        job = translate.flat_to_job(model, request_id=request_id,
                                    default_model_base=default_model_base)
    elif mt == C.GENERATE_NESTED:
        job = translate.nested_to_job(model, request_id=request_id,
                                      default_model_base=default_model_base, warnings=warnings)
    elif mt == C.GENERATE_LEGACY_ACTION:
        job = translate.legacy_to_job(model, request_id=request_id,
                                      default_model_base=default_model_base)
    elif mt in (C.MODEL_LOAD, C.MODEL_LOAD_LEGACY):
        data = model.data or M.ModelLoadData()
        params = {"model_name": data.model_name or model.model_name,
                  "device": data.device or model.device}
    elif mt == C.CLEANUP:
        data = model.data or M.CleanupData()
        workers = data.workers if data.workers is not None else model.workers
        models = data.models if data.models is not None else model.models
        params = {"workers": list(workers) if workers is not None else None,
                  "models": list(models) if models is not None else None}
    elif mt == C.CANCEL:
        target = model.data.request_id if model.data and model.data.request_id else model.request_id
        params = {"request_id": target}
    elif mt == C.LIST_QUEUE:
        params = {"include_prompts": bool(model.data and model.data.include_prompts)}
    elif mt == C.LIST_HISTORY:
        params = {"limit": (model.data.limit if model.data and model.data.limit
                            else C.DEFAULT_HISTORY_LIMIT)}
    return ParsedRequest(message_type=mt, reply_type=reply_type, request_id=request_id, job=job,
                         params=params, warnings=warnings)


def _dedupe(errors: list[FieldError]) -> list[FieldError]:
    seen: set[FieldError] = set()
    out = []
    for e in errors:
        if e not in seen:
            seen.add(e)
            out.append(e)
    return out


_JSON_SCALARS = frozenset((str, int, float, bool, type(None)))


def _canonical(obj: Any) -> Any:
    """The body as JSON can hold it: str keys (sorted as strings by the encoder), bytes as their
    hash, anything else as its repr. Exact types first: a decoded body is nearly all of them."""
    kind = type(obj)
    if kind in _JSON_SCALARS:
        return obj
    if kind is dict:
        return {k if type(k) is str else str(k): v if type(v) in _JSON_SCALARS else _canonical(v)
                for k, v in obj.items()}
    if kind is list or kind is tuple:
        return [v if type(v) in _JSON_SCALARS else _canonical(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$bytes": hashlib.sha256(bytes(obj)).hexdigest()}
    if isinstance(obj, (str, int, float, bool)):
        return obj
    return repr(obj)


# built once (json.dumps builds an encoder per call). The text must not change: journals on
# disk hold fingerprints of finished requests, and a resend is matched against them.
_FINGERPRINT_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def body_fingerprint(body: dict) -> str:
    """Stable hash of a request body minus transport-only fields (stream, preview, ...), for the
    broker's duplicate_request_id check (same id + different body)."""
    trimmed = {k: v for k, v in body.items() if k not in _TRANSPORT_ONLY} \
        if isinstance(body, dict) else body
    data = trimmed.get("data") if isinstance(trimmed, dict) else None
    if isinstance(data, dict) and isinstance(data.get("metadata"), dict) \
            and not _TRANSPORT_ONLY_SET.isdisjoint(data["metadata"]):
        meta = {k: v for k, v in data["metadata"].items() if k not in _TRANSPORT_ONLY_SET}
        trimmed = {**trimmed, "data": {**data, "metadata": meta}}
    text = _FINGERPRINT_ENCODER.encode(_canonical(trimmed))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
