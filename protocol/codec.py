"""One frame in, one frame out: JSON (a UTF-8 object) or msgpack (a map), told apart by the
first byte. The reply goes back in the request's codec. Image bytes are msgpack binary, or
base64 strings in JSON."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import msgpack

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
    # JSON object, allowing leading whitespace and a UTF-8 BOM
    stripped = frame.lstrip(b" \t\r\n\xef\xbb\xbf")
    if stripped[:1] == b"{":
        return C.CODEC_JSON
    return None


def _depth_ok(obj: Any, depth: int = 0) -> bool:
    if depth > _MAX_DEPTH:
        return False
    if isinstance(obj, dict):
        return all(_depth_ok(v, depth + 1) for v in obj.values())
    if isinstance(obj, list):
        return all(_depth_ok(v, depth + 1) for v in obj)
    return True


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def decode(frame: bytes) -> tuple[dict, str]:
    """Decode a request body. Raises ProtocolError(malformed_message) for anything else."""
    codec = sniff(frame)
    if codec is None:
        raise ProtocolError(C.MALFORMED_MESSAGE, "body is neither a JSON object nor a msgpack map")
    try:
        if codec == C.CODEC_JSON:
            obj = json.loads(frame.decode("utf-8-sig"), parse_constant=_reject_constant)
        else:
            obj = msgpack.unpackb(frame, raw=False, strict_map_key=False, max_bin_len=len(frame))
    except (ValueError, UnicodeDecodeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, RecursionError, TypeError) as exc:
        raise ProtocolError(C.MALFORMED_MESSAGE, f"cannot decode {codec} body: {exc}") from None
    except Exception as exc:  # msgpack raises a few odd types on truncated input
        raise ProtocolError(C.MALFORMED_MESSAGE, f"cannot decode {codec} body: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(C.MALFORMED_MESSAGE, f"{codec} body is not an object/map")
    if not _depth_ok(obj):
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


def encode(obj: dict, codec: str) -> bytes:
    """Encode a reply in the given codec (bytes become base64 in JSON)."""
    if codec == C.CODEC_MSGPACK:
        return msgpack.packb(obj, use_bin_type=True, default=_json_default_msgpack)
    try:
        return json.dumps(obj, default=_json_default, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:
        return json.dumps(_finite(obj), default=_json_default, separators=(",", ":")).encode()


def _json_default_msgpack(obj: Any):
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, memoryview):
        return bytes(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")
