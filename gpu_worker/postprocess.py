"""After the pipeline: auto-contrast, upscaling, encoding, saving, hashing.

Files go under the output root only (`save_path` is relative to it; anything that would leave it
is a validation_error), each under a name no other job or worker can take (created with O_EXCL).
Every image carries the generation parameters ("infotext") where A1111-style tools read them: the
`parameters` text chunk of a PNG, the EXIF UserComment of a JPEG or WebP.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
from dataclasses import dataclass

from PIL import Image, ImageOps, PngImagePlugin

from gpu_worker.schedulers import a1111_sampler_name
from protocol import constants as C
from protocol import rule_texts as R
from protocol.errors import JobError

log = logging.getLogger(__name__)

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_EXTENSION = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
MAX_UPSCALE_FACTOR = C.MAX_UPSCALE_FACTOR  # one bound: protocol.constants
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286  # EXIF sub-IFD pointer, UserComment tag
_UNICODE_PREFIX = b"UNICODE\x00"



@dataclass(frozen=True)
class SavedImage:
    path: str
    sha256: str
    data: bytes
    width: int
    height: int
    format: str


def auto_contrast(image: Image.Image, cutoff_percent: float = 0.5) -> Image.Image:
    """Stretch each channel's histogram, ignoring the darkest/brightest `cutoff_percent`."""
    return ImageOps.autocontrast(image.convert("RGB"), cutoff=cutoff_percent)


def upscale(image: Image.Image, factor: float, method: str = "lanczos",
            model_upscale=None) -> Image.Image:
    """Lanczos is built in; any other method runs `model_upscale(image)` (a model upscaler's
    output at its own fixed scale, gpu_worker/upscalers.py), brought to `factor` with Lanczos."""
    if not (1.0 <= factor <= MAX_UPSCALE_FACTOR):
        raise JobError(C.VALIDATION_ERROR, f"upscale_factor: {R.UPSCALE_FACTOR.message}",
                       {"errors": [{"field": "upscale_factor", "message": R.UPSCALE_FACTOR.message}]})
    method = (method or "lanczos").lower()
    if factor == 1.0:
        return image
    wanted = (round(image.width * factor), round(image.height * factor))
    if method == "lanczos":
        return image.resize(wanted, Image.Resampling.LANCZOS)
    result = model_upscale(image)
    # the network has a fixed scale (usually 4x): bring it to the requested factor
    return result if result.size == wanted else result.resize(wanted, Image.Resampling.LANCZOS)


def a1111_parameters(*, prompt: str, negative_prompt: str, steps: int, scheduler: str,
                     use_karras_sigmas: bool, guidance_scale: float, seed: int, width: int,
                     height: int, model: str, model_hash: str | None = None,
                     extra: dict | None = None) -> str:
    """The `parameters` text A1111 writes: prompt, `Negative prompt:` line, then key: value pairs."""
    sampler = a1111_sampler_name(scheduler, use_karras_sigmas)
    pairs = {"Steps": steps, "Sampler": sampler, "CFG scale": f"{guidance_scale:g}", "Seed": seed,
             "Size": f"{width}x{height}", "Model hash": model_hash, "Model": model}
    pairs.update(extra or {})
    pairs = {key: value for key, value in pairs.items() if value not in (None, "", [], ())}
    tail = ", ".join(f"{key}: {_a1111_value(value)}" for key, value in pairs.items())
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(tail)
    return "\n".join(lines)


def _a1111_value(value) -> str:
    if isinstance(value, dict):  # `Hashes: {...}` is JSON, as civitai and A1111 write it
        return json.dumps(value, separators=(", ", ": "))
    text = str(value)
    # A1111 quotes values holding its separators so parsers keep them whole
    return f'"{text}"' if ("," in text or ":" in text) and not text.startswith('"') else text


def save_folder(save_path: str) -> str:
    """`save_path` as a folder relative to the output root. The seed's default `outputs/`
    names the outputs folder, which the output root already is, so a leading `outputs`
    component is the root itself (never `<root>/outputs/`): "", ".", "outputs/" -> the root;
    "outputs/portraits" and "portraits" -> `<root>/portraits`. Backslashes (a Windows client's
    separator) count as slashes."""
    text = (save_path or "").strip()
    if os.path.isabs(text):   # refused by the caller's root check (and by validation before)
        return text
    parts = [part for part in text.replace("\\", "/").split("/") if part not in ("", ".")]
    if parts and parts[0] == "outputs":
        parts = parts[1:]
    return "/".join(parts) or "."


def output_folder(output_dir: str, save_path: str) -> str:
    """The folder for `save_path` under the output root, created; leaving the root is refused."""
    root = os.path.realpath(output_dir)
    relative = save_folder(save_path)
    candidate = relative if os.path.isabs(relative) else os.path.join(root, relative)
    real = os.path.realpath(candidate)
    if os.path.commonpath([root, real]) != root:
        raise JobError(C.VALIDATION_ERROR,
                       f"save_path {save_path!r} leaves the output root {root}", {"field": "save_path"})
    os.makedirs(real, exist_ok=True)
    return real


def encode_image(image: Image.Image, fmt: str, quality: int, parameters: str | None) -> bytes:
    if fmt not in _PIL_FORMAT:
        raise JobError(C.VALIDATION_ERROR, f"output_format {fmt!r}; expected one of {', '.join(_PIL_FORMAT)}",
                       {"field": "output_format"})
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if parameters:
            info.add_text("parameters", parameters)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        quality = max(C.MIN_QUALITY, min(C.MAX_QUALITY, int(quality)))
        extra = {"exif": exif_user_comment(parameters)} if parameters else {}
        image.convert("RGB").save(buffer, format=_PIL_FORMAT[fmt], quality=quality, **extra)
    return buffer.getvalue()


def exif_user_comment(text: str) -> Image.Exif:
    """EXIF holding `text` as UserComment, the way A1111 stores parameters in JPEG and WebP
    (piexif's "unicode" form: the 8-byte UNICODE prefix, then UTF-16 big-endian)."""
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE_PREFIX + text.encode("utf_16_be")
    return exif


def save_image(data: bytes, folder: str, *, stem: str, fmt: str) -> str:
    """Write `data` under a new unique name in `folder`; never overwrites."""
    safe_stem = _UNSAFE_NAME_CHARS.sub("_", stem).strip("._")[:120] or "image"
    extension = _EXTENSION[fmt]
    for attempt in range(1000):
        name = f"{safe_stem}.{extension}" if attempt == 0 else f"{safe_stem}-{attempt}.{extension}"
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return path
    raise JobError(C.INTERNAL_ERROR, f"cannot find a free file name for {safe_stem} in {folder}")


def finish_image(image: Image.Image, *, output_dir: str, save_path: str, fmt: str, quality: int,
                 stem: str, parameters: str | None) -> SavedImage:
    """Encode, save under a unique name and hash one final image."""
    data = encode_image(image, fmt, quality, parameters)
    path = save_image(data, output_folder(output_dir, save_path), stem=stem, fmt=fmt)
    log.debug("saved %s (%d bytes)", path, len(data))
    return SavedImage(path=path, sha256=hashlib.sha256(data).hexdigest(), data=data,
                      width=image.width, height=image.height, format=fmt)


def file_stem(request_id: str, index: int, seed: int) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}_{request_id}_{index}_{seed}"
