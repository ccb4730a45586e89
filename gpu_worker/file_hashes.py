"""A1111 short hashes of model files, for the `Model hash` / `Lora hashes` infotext fields.

A1111 (and civitai) identify a model file by the first 10 hex digits of its sha256 ("AutoV2").
Hashing a multi-GB checkpoint takes seconds, so each result is cached by (real path, size,
mtime): a file replaced in place is hashed again, an unchanged one never twice.
"""

from __future__ import annotations

import hashlib
import os
import threading

SHORT_HASH_DIGITS = 10
_CHUNK_BYTES = 1 << 20

_lock = threading.Lock()
_cache: dict[tuple[str, int, int], str] = {}


def sha256_of(path: str) -> str:
    """The full sha256 of a file, cached by path, size and mtime."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns)
    with _lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(real, "rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
    value = digest.hexdigest()
    with _lock:
        _cache[key] = value
    return value


def short_hash(path: str) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's sha256."""
    return sha256_of(path)[:SHORT_HASH_DIGITS]


def weights_file(path: str) -> str | None:
    """The file a model's hash is taken from: the file itself, or for a diffusers folder its
    UNet (or, for a VAE/ControlNet folder, its only) .safetensors weights; None if there is none."""
    if os.path.isfile(path):
        return path
    for folder in (os.path.join(path, "unet"), path):
        if os.path.isdir(folder):
            weights = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            if weights:
                return os.path.join(folder, weights[0])
    return None


def model_short_hash(path: str) -> str | None:
    weights = weights_file(path)
    return short_hash(weights) if weights else None


def cache_size() -> int:
    with _lock:
        return len(_cache)
