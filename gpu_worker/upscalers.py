"""Model upscalers (Real-ESRGAN / ESRGAN family and whatever else spandrel recognises as a
super-resolution model), found by name, loaded with spandrel, run tile by tile.

A request asks for one with `upscale_method`:
  "lanczos"                       PIL, no model (postprocess.upscale)
  "realesrgan" / "esrgan"         the worker's configured default (--upscaler NAME-or-PATH), else
                                  the only upscaler there is; several and no default -> error
  a name, e.g. "4x-UltraSharp"    the file of that stem in an upscaler folder, or a path inside
                                  the model root
Upscaler folders under the model root: upscalers/ (ours), ESRGAN/ and RealESRGAN/ (A1111),
upscale_models/ (ComfyUI). `.safetensors` always; `.pth` only with --allow-pickle (the same
rule as every other weight file).

Large images are upscaled in overlapping tiles (TILE_PX input pixels each), so memory stays
bounded whatever the image size; the overlap is cut away so tile seams do not show.
"""

from __future__ import annotations

import logging
import os
import sys
import types

from protocol import constants as C
from protocol.errors import JobError

log = logging.getLogger(__name__)

UPSCALER_FOLDERS = ("upscalers", "ESRGAN", "RealESRGAN", "upscale_models")
DEFAULT_ALIASES = ("realesrgan", "real-esrgan", "esrgan")
BUILT_IN = ("lanczos",)
TILE_PX = 256
TILE_OVERLAP_PX = 16


def import_spandrel():
    """spandrel, also where torchvision is missing. spandrel declares torchvision but only two
    architectures it does not use for upscaling (LaMa inpainting, RestoreFormer faces) import
    it; PyPI's Linux torchvision is a CUDA build that cannot load beside the CPU torch wheel.
    Without torchvision those two imports get placeholders that raise if ever called, and the
    placeholders are removed again so nothing else sees a torchvision."""
    try:
        import spandrel
        return spandrel
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("torchvision"):
            raise JobError(C.UNSUPPORTED_FEATURE, "model upscalers need the 'spandrel' package, which "
                                                  "is not installed on this worker") from None
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    for name in names:
        sys.modules.pop(name, None)
    for name in list(sys.modules):
        if name == "spandrel" or name.startswith("spandrel."):
            del sys.modules[name]  # the half-imported package from the first try

    def unavailable(*_args, **_kwargs):
        raise RuntimeError("this spandrel architecture needs torchvision, which is not installed")

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.rotate = functional.normalize = unavailable
    functional.InterpolationMode = types.SimpleNamespace(BILINEAR="bilinear", NEAREST="nearest")
    placeholders = {"torchvision": types.ModuleType("torchvision"),
                    "torchvision.transforms": types.ModuleType("torchvision.transforms"),
                    "torchvision.transforms.functional": functional}
    sys.modules.update(placeholders)
    try:
        import spandrel
    finally:
        for name in names:
            if sys.modules.get(name) is placeholders[name]:
                del sys.modules[name]
    log.info("spandrel imported without torchvision (its LaMa and RestoreFormer architectures are off)")
    return spandrel


class Upscalers:
    """Finds upscaler files under a model root (through its ModelResolver's path rules)."""

    def __init__(self, resolver, default: str | None = None):
        self.resolver = resolver
        self.default = default

    def available(self) -> list[str]:
        names = []
        for folder in UPSCALER_FOLDERS:
            full = os.path.join(self.resolver.models_dir, folder)
            if os.path.isdir(full):
                for entry in sorted(os.listdir(full)):
                    stem, suffix = os.path.splitext(entry)
                    if suffix == ".safetensors" or (self.resolver.allow_pickle and suffix == ".pth"):
                        names.append(stem)
        return names

    def request_names(self) -> list[str]:
        """What upscale_method may name here without a path (the broker routes by it,
        Telemetry.upscalers): the files' stems, plus "realesrgan" when the default resolves."""
        found = self.available()
        return ([DEFAULT_ALIASES[0]] if self.default or len(found) == 1 else []) + found

    def resolve(self, method: str) -> tuple[str, str]:
        """(name, real path) of the upscaler `method` asks for."""
        wanted = method.strip()
        if wanted.lower() in DEFAULT_ALIASES:
            if self.default:
                wanted = self.default
            else:
                found = self.available()
                if len(found) != 1:
                    raise JobError(
                        C.UNSUPPORTED_FEATURE,
                        f"upscale_method {method!r} needs a default upscaler: "
                        + (f"this worker has several ({', '.join(found)}) and no --upscaler set; name one"
                           if found else "this worker has none configured (put a Real-ESRGAN .safetensors "
                                         f"under {os.path.join(self.resolver.models_dir, 'upscalers')}/ "
                                         "or set --upscaler); or use upscale_method 'lanczos'"),
                        {"field": "upscale_method"})
                wanted = found[0]
        if wanted.lower().endswith((".safetensors", ".pth")) or os.sep in wanted or "/" in wanted:
            path = self.resolver.inside_root(wanted, "upscaler path")
            if os.path.isfile(path):
                self.resolver.check_suffix(path, "upscaler")
                self.resolver.check_weight_file(path, "upscaler")
                return os.path.splitext(os.path.basename(path))[0], path
        for folder in UPSCALER_FOLDERS:
            for suffix in (".safetensors", ".pth"):
                candidate = os.path.join(self.resolver.models_dir, folder, wanted + suffix)
                if os.path.isfile(candidate):
                    path = self.resolver.inside_root(candidate, "upscaler")
                    self.resolver.check_suffix(path, "upscaler")
                    self.resolver.check_weight_file(path, "upscaler")
                    return wanted, path
        known = ", ".join((*BUILT_IN, *DEFAULT_ALIASES[:1], *self.available()))
        raise JobError(C.MODEL_NOT_FOUND if wanted != method.strip() or "/" in wanted else C.UNSUPPORTED_FEATURE,
                       f"unknown upscale_method {method!r}: no upscaler of that name under "
                       f"{', '.join(f + '/' for f in UPSCALER_FOLDERS)} in {self.resolver.models_dir}; "
                       f"available: {known}", {"field": "upscale_method"})


def load(path: str):
    """A spandrel descriptor for a super-resolution model file; anything else is refused."""
    spandrel = import_spandrel()
    try:
        descriptor = spandrel.ModelLoader().load_from_file(path)
    except spandrel.UnsupportedModelError:
        raise JobError(C.VALIDATION_ERROR, f"upscaler {path}: spandrel recognises no model "
                                           "architecture in this file") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise JobError(C.VALIDATION_ERROR, f"upscaler {path} is not a readable model file: {exc}") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose != "SR":
        raise JobError(C.VALIDATION_ERROR, f"upscaler {path} is a {descriptor.architecture.name} "
                                           f"{descriptor.purpose} model, not a super-resolution model")
    return descriptor.eval()


def run_tiled(descriptor, image, tile_px: int = TILE_PX, overlap_px: int = TILE_OVERLAP_PX):
    """The model's output for a PIL image, computed in overlapping tiles."""
    import numpy as np
    import torch
    from PIL import Image

    scale = descriptor.scale
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    pixels = pixels.permute(2, 0, 1).unsqueeze(0)
    _, _, height, width = pixels.shape
    device = next(descriptor.model.parameters()).device
    out = torch.zeros((1, 3, height * scale, width * scale))
    with torch.inference_mode():
        for top in range(0, height, tile_px):
            for left in range(0, width, tile_px):
                bottom, right = min(top + tile_px, height), min(left + tile_px, width)
                # read a margin around the tile, keep only the tile's own part of the output
                t0, l0 = max(top - overlap_px, 0), max(left - overlap_px, 0)
                b0, r0 = min(bottom + overlap_px, height), min(right + overlap_px, width)
                tile = descriptor(pixels[:, :, t0:b0, l0:r0].to(device)).float().cpu().clamp(0, 1)
                out[:, :, top * scale:bottom * scale, left * scale:right * scale] = tile[
                    :, :, (top - t0) * scale:(bottom - t0) * scale, (left - l0) * scale:(right - l0) * scale]
    array = (out[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)
