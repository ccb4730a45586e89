"""One frame in, one frame out: JSON (a UTF-8 object) or msgpack (a map), told apart by the
first byte. The reply goes back in the request's codec. Image bytes are msgpack binary, or
base64 strings in JSON."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import msgpack

try:  # parses request bodies ~3x faster than json (see _json_body), encodes replies ~5x
    import orjson
except ImportError:  # the stdlib parser alone gives the same objects, only slower
    orjson = None

from protocol import constants as C
from protocol.errors import ProtocolError

# msgpack maps start with 0x80-0x8f (fixmap), 0xde (map16) or 0xdf (map32)
_MSGPACK_MAP_FIRST = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_MAX_DEPTH = 64  # deeper bodies are malformed, not a RecursionError


def sniff(frame: bytes) -> str | None:
    """The codec of a frame by its first byte, or None when it is neither."""
    if not frame:
        return None
    first = frame[0]
    if first in _MSGPACK_MAP_FIRST:
        return C.CODEC_MSGPACK
    if first == 0x7B:  # "{": the usual JSON frame, without copying it to strip a prefix
        return C.CODEC_JSON
    # JSON object, allowing leading whitespace and a UTF-8 BOM
    stripped = frame.lstrip(b" \t\r\n\xef\xbb\xbf")
    if stripped[:1] == b"{":
        return C.CODEC_JSON
    return None


# Bytes that can open a container: JSON "{" "["; msgpack fixmap/fixarray (0x80-0x9f) and
# array16/32, map16/32 (0xdc-0xdf). A frame holding at most _MAX_DEPTH of them cannot nest
# deeper than _MAX_DEPTH, which is cheaper to count than to walk for small frames; big frames
# (image bytes) are walked, since the walk's cost follows the containers, not the bytes.
_JSON_OPENERS = (b"{", b"[")
_MSGPACK_OPENERS = bytes(range(0x80, 0xA0)) + bytes(range(0xDC, 0xE0))
_COUNT_OPENERS_UP_TO_BYTES = 8192
_CONTAINERS = (dict, list)


def _cannot_nest_too_deep(frame: bytes, codec: str) -> bool:
    """True when a small frame holds at most _MAX_DEPTH container-opening bytes (bytes inside
    strings or numbers only over-count, so True is always right; False proves nothing)."""
    if len(frame) > _COUNT_OPENERS_UP_TO_BYTES:
        return False
    if codec == C.CODEC_JSON:
        openers = frame.count(_JSON_OPENERS[0]) + frame.count(_JSON_OPENERS[1])
    else:
        openers = len(frame) - len(frame.translate(None, _MSGPACK_OPENERS))
    return openers <= _MAX_DEPTH


def _depth_ok(obj: Any) -> bool:
    """No value deeper than _MAX_DEPTH (the body itself is depth 0). Level by level, without
    recursion: only containers are carried to the next level."""
    level = [obj]
    for _depth in range(_MAX_DEPTH):
        level = [v for c in level for v in (c.values() if isinstance(c, dict) else c)
                 if isinstance(v, _CONTAINERS)]
        if not level:
            return True
    return not any(level)  # a non-empty container at the limit holds values past it


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# built once: json.loads(..., parse_constant=...) builds a new decoder on every call
_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _json_loads(text: str) -> Any:
    """json.loads(text, parse_constant=_reject_constant) without building a decoder per call."""
    if text.startswith("\ufeff"):  # what json.loads says about a second BOM
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _JSON_DECODER.decode(text)


# orjson turns an integer beyond 64 bits into a float (json keeps the int); such an integer
# has at least 19 digits, so a frame with no run of 19 digits parses the same in both
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGIT_RUN = b"0" * 19
_ORJSON_UP_TO_BYTES = 1 << 20  # bigger frames (image bytes in base64): stdlib, as before


def _json_body(frame: bytes) -> Any:
    """The frame's JSON value, as json.loads(frame.decode("utf-8-sig")) gives it. orjson
    parses it when it is sure to give the same objects; for anything orjson refuses (a BOM,
    NaN, 1e400, a lone surrogate, bad JSON) the stdlib parser decides and words the error."""
    if (orjson is not None and len(frame) <= _ORJSON_UP_TO_BYTES
            and _LONG_DIGIT_RUN not in frame.translate(_DIGITS_AS_ZERO)):
        try:
            return orjson.loads(frame)
        except orjson.JSONDecodeError:
            pass
    return _json_loads(frame.decode("utf-8-sig"))


def decode(frame: bytes) -> tuple[dict, str]:
    """Decode a request body. Raises ProtocolError(malformed_message) for anything else."""
    codec = sniff(frame)
    if codec is None:
        raise ProtocolError(C.MALFORMED_MESSAGE, "body is neither a JSON object nor a msgpack map")
    try:
        if codec == C.CODEC_JSON:
            obj = _json_body(frame)
        else:
            obj = msgpack.unpackb(frame, raw=False, strict_map_key=False, max_bin_len=len(frame))
    except (ValueError, UnicodeDecodeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, RecursionError, TypeError) as exc:
        raise ProtocolError(C.MALFORMED_MESSAGE, f"cannot decode {codec} body: {exc}") from None
    except Exception as exc:  # msgpack raises a few odd types on truncated input
        raise ProtocolError(C.MALFORMED_MESSAGE, f"cannot decode {codec} body: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(C.MALFORMED_MESSAGE, f"{codec} body is not an object/map")
    if not _cannot_nest_too_deep(frame, codec) and not _depth_ok(obj):
        raise ProtocolError(C.MALFORMED_MESSAGE, f"body nests deeper than {_MAX_DEPTH} levels")
    return obj, codec


def _json_default(obj: Any):
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    """NaN and infinities are not JSON; replace them with None rather than emit bad JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# built once: json.dumps(obj, default=..., ...) builds a new encoder on every call
_JSON_ENCODER = json.JSONEncoder(default=_json_default, allow_nan=False, separators=(",", ":"))
_JSON_ENCODER_NAN_AS_NULL = json.JSONEncoder(default=_json_default, separators=(",", ":"))


# orjson: a reply JSON-encodes ~5x faster than with the stdlib (it was the broker's largest
# single cost per request). The text can differ from json.dumps only in spelling (1e-5 for
# 1e-05, "é" unescaped), never in the value a JSON parser reads back; NaN becomes null in both.
_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS if orjson is not None else 0


def encode(obj: dict, codec: str) -> bytes:
    """Encode a reply in the given codec (bytes become base64 in JSON)."""
    if codec == C.CODEC_MSGPACK:
        return msgpack.packb(obj, use_bin_type=True, default=_json_default_msgpack)
    if orjson is not None:
        try:
            return orjson.dumps(obj, default=_json_default, option=_ORJSON_OPTIONS)
        except TypeError:   # e.g. an int beyond 64 bits: the stdlib encoder handles it
            pass
    try:
        return _JSON_ENCODER.encode(obj).encode()
    except ValueError:
        return _JSON_ENCODER_NAN_AS_NULL.encode(_finite(obj)).encode()


def _json_default_msgpack(obj: Any):
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, memoryview):
        return bytes(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")
