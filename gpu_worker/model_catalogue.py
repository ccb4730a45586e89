"""What this worker can load, for `list_models`: every model file under its models dir, by the
kind a request names it as (base, refiner, vae, lora, controlnet, embedding, upscaler), with
its size on disk and whether it is in the cache now. Only reads the filesystem and the cache's
thread-safe snapshot, so the transport answers it at once, even while a job runs."""

from __future__ import annotations

import logging
import os

from protocol import constants as C

log = logging.getLogger(__name__)

# the resolver's kind -> the listing's kind, and the resolver method that finds its files
_RESOLVER_KINDS = {"base": "base", "refiner": "refiner", "vae": "vae", "lora": "lora",
                   "controlnet": "controlnet", "textual_inversion": "embedding"}
_RESOLVE = {"base": "base", "refiner": "refiner", "vae": "vae", "lora": "lora",
            "controlnet": "controlnet", "embedding": "textual_inversion"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf")


def size_mb(path: str) -> float:
    """A file's size, or the weights under a folder (a diffusers layout), in MB."""
    if os.path.isfile(path):
        return round(os.path.getsize(path) / 2**20, 3)
    total = 0
    for folder, _dirs, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files
                     if f.endswith(_WEIGHT_SUFFIXES))
    return round(total / 2**20, 3)


def catalogue(resolver, upscalers, loaded: list[dict]) -> dict[str, list[dict]]:
    """{kind: [{name, size_mb, loaded}]} for every kind in C.MODEL_KINDS (empty lists too)."""
    loaded_names = {str(entry.get("name")) for entry in loaded}
    found: dict[str, list[dict]] = {kind: [] for kind in C.MODEL_KINDS}
    for resolver_kind, names in resolver.available().items():
        kind = _RESOLVER_KINDS.get(resolver_kind)
        if kind is None:
            continue
        for name in names:
            found[kind].append(_entry(name, lambda n=name: getattr(resolver, _RESOLVE[kind])(n).path,
                                      loaded_names))
    if upscalers is not None:
        for name in upscalers.available():
            found["upscaler"].append(_entry(name, lambda n=name: upscalers.resolve(n)[1], loaded_names))
    return found


def _entry(name: str, path_of, loaded_names: set[str]) -> dict:
    try:
        size = size_mb(path_of())
    except Exception as exc:   # listed but not loadable as it is (e.g. a half-copied folder)
        log.debug("list_models: %s: %s", name, exc)
        size = 0.0
    return {"name": name, "size_mb": size, "loaded": name in loaded_names}
