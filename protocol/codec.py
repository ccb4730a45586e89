"""One frame in, one frame out: JSON (a UTF-8 object) or msgpack (a map), told apart by the
first byte. The reply goes back in the request's codec. Image bytes are msgpack binary, or
base64 strings in JSON."""

from __future__ import annotations

import base64
from typing import Any

import msgpack
import orjson

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


_BOM = b"\xef\xbb\xbf"


def _json_body(frame: bytes) -> Any:
    """The frame's JSON value (orjson: NaN, Infinity, numbers beyond a double, lone surrogates
    and invalid UTF-8 are malformed; an integer beyond 64 bits reads as a float). One leading
    UTF-8 BOM is allowed, as sniff() allows it."""
    if frame.startswith(_BOM):
        frame = frame[len(_BOM):]
    return orjson.loads(frame)


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


# Replies: NaN and infinities become null; a str key is required unless it is an int, float,
# bool or None (OPT_NON_STR_KEYS writes those as strings); an int beyond 64 bits cannot be
# encoded (TypeError: the broker then answers internal_error, see broker/server.py).
_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def encode(obj: dict, codec: str) -> bytes:
    """Encode a reply in the given codec (bytes become base64 in JSON)."""
    if codec == C.CODEC_MSGPACK:
        return msgpack.packb(obj, use_bin_type=True, default=_json_default_msgpack)
    return orjson.dumps(obj, default=_json_default, option=_ORJSON_OPTIONS)


def _json_default_msgpack(obj: Any):
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, memoryview):
        return bytes(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")
