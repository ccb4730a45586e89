"""Image inputs (init, mask, control images) -> PIL images.

An ImageRef is raw bytes (msgpack binary), a base64 string or `data:image/...;base64,` URI, or
a path that must stay under the worker's input root (CONTRACT.md "Guarantees"). Anything else
is a validation_error naming the field, never a crash.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re

from PIL import Image, UnidentifiedImageError

from protocol import constants as C
from protocol import rule_texts as R
from protocol.errors import JobError

_DATA_URI = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)
_BASE64_CHARS = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")
# Text longer than any path is base64 even when its first bytes are not a known signature.
_MAX_PATH_CHARS = 4096
_MAX_PIXELS = 4096 * 4096  # far above the 2048x2048 bound; stops decompression bombs


def _invalid(field: str, message: str) -> JobError:
    """A validation_error whose errors[] entry carries the rule's words (protocol.rule_texts),
    with `field` named as the client sent it on the way out (JobError.name_fields)."""
    return JobError(C.VALIDATION_ERROR, f"{field}: {message}",
                    {"errors": [{"field": field, "message": message}]})


def resolve_input_path(path: str, input_dir: str | None, field: str) -> str:
    """The real path of `path` (relative to, or absolute inside, input_dir); outside -> error."""
    if not input_dir:
        raise _invalid(field, R.INPUT_NO_ROOT.message)
    root = os.path.realpath(input_dir)
    candidate = path if os.path.isabs(path) else os.path.join(root, path)
    real = os.path.realpath(candidate)
    if os.path.commonpath([root, real]) != root:
        raise _invalid(field, R.INPUT_OUTSIDE_ROOT(path=repr(path), root=root))
    if not os.path.isfile(real):
        raise _invalid(field, R.INPUT_MISSING(path=repr(path), root=root))
    return real


def _open(data: bytes | str, field: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        if image.width * image.height > _MAX_PIXELS:
            raise _invalid(field, R.IMAGE_TOO_LARGE(width=image.width, height=image.height))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _invalid(field, R.IMAGE_UNREADABLE(reason=f"{exc.__class__.__name__}: {exc}")) from None
    return image


def decode_image(ref: bytes | str, *, input_dir: str | None, field: str, mode: str = "RGB") -> Image.Image:
    """Decode one ImageRef into a PIL image converted to `mode`."""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return _open(bytes(ref), field).convert(mode)
    if not isinstance(ref, str) or not ref.strip():
        raise _invalid(field, R.IMAGE.message)
    text = ref.strip()
    match = _DATA_URI.match(text)
    if match:
        return _open(_b64decode(text[match.end():], field), field).convert(mode)
    if _is_probably_base64(text) or len(text) > _MAX_PATH_CHARS:
        return _open(_b64decode(text, field), field).convert(mode)
    return _open(resolve_input_path(text, input_dir, field), field).convert(mode)


def _is_probably_base64(text: str) -> bool:
    """Long text of base64 characters only that decodes to an image signature."""
    if len(text) < 64 or not _BASE64_CHARS.match(text):
        return False
    try:
        head = base64.b64decode(text[:64] + "=" * (-len(text[:64]) % 4), validate=False)
    except (binascii.Error, ValueError):
        return False
    return head.startswith((b"\x89PNG", b"\xff\xd8", b"RIFF", b"GIF8", b"BM"))


def _b64decode(text: str, field: str) -> bytes:
    compact = "".join(text.split())
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid(field, R.IMAGE_NOT_BASE64(reason=str(exc))) from None


def looks_like_edge_map(image: Image.Image, share: float = 0.97) -> bool:
    """Whether an image is already an edge map (grey, nearly every pixel black or white), so the
    canny preprocessor would only find the edges of its edges."""
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.int16)
    if np.abs(array - array[..., :1]).max() > 8:  # colour: a photo or a drawing, not edges
        return False
    grey = array[..., 0]
    return float(((grey < 32) | (grey > 223)).mean()) >= share


def canny_edges(image: Image.Image, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """The canny ControlNet's preprocessor: OpenCV edges as a 3-channel image."""
    import cv2
    import numpy as np

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low_threshold, high_threshold)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))
