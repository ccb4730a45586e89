"""Progress previews: a small picture of the current latents, made without a second model.

SDXL's VAE latents map to RGB almost linearly, so one 4x3 matrix (the approximation A1111's
"Approx cheap" and ComfyUI's latent2rgb previews use) turns a 128x128 latent into a 128x128
colour image in well under a millisecond; it is then resized to `preview_size` and sent as a
JPEG in the PROGRESS message. `PreviewThrottle` keeps the cost and the traffic bounded: at
most one preview every `every_steps` steps and `min_interval_s` seconds; `PreviewCadence` is
the worker's default for both (--preview-every-steps, --preview-interval-ms), which a request's
`preview_every_steps` / `preview_interval_ms` override.
"""

from __future__ import annotations

import io
import time

import numpy as np

from protocol import constants as C

# SDXL latent channel -> (R, G, B) weights and bias, as ComfyUI's latent_formats.SDXL has them
SDXL_LATENT_RGB_FACTORS = np.array([
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
], dtype=np.float32)
SDXL_LATENT_RGB_BIAS = np.array([0.1084, -0.0175, -0.0011], dtype=np.float32)

PREVIEW_EVERY_STEPS = C.DEFAULT_PREVIEW_EVERY_STEPS                # a preview at most every N steps ...
PREVIEW_MIN_INTERVAL_S = C.DEFAULT_PREVIEW_INTERVAL_MS / 1000.0   # ... and one per this many seconds
PREVIEW_JPEG_QUALITY = 75


def latents_to_rgb(latents) -> np.ndarray:
    """(C, H, W) latents of one image (a torch tensor or array) -> (H, W, 3) uint8 RGB."""
    array = latents.detach().float().cpu().numpy() if hasattr(latents, "detach") else np.asarray(latents, np.float32)
    if array.ndim == 4:
        array = array[0]
    channels = array.shape[0]
    if channels == SDXL_LATENT_RGB_FACTORS.shape[0]:
        rgb = np.einsum("chw,cr->hwr", array, SDXL_LATENT_RGB_FACTORS) + SDXL_LATENT_RGB_BIAS
    else:  # not an SDXL latent space: show the first three channels, normalised
        rgb = np.moveaxis(array[:3] if channels >= 3 else np.repeat(array[:1], 3, axis=0), 0, -1)
        rgb = rgb / max(float(np.abs(rgb).max()), 1e-6)
    return ((np.clip(rgb, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def encode_preview(latents, size_px: int) -> bytes:
    """A JPEG of the latents' RGB approximation, its longest side `size_px` pixels."""
    from PIL import Image

    image = Image.fromarray(latents_to_rgb(latents), "RGB")
    scale = size_px / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
    return buffer.getvalue()


class PreviewThrottle:
    """Decides which steps get a preview: every `every_steps`, not closer than
    `min_interval_s`, and always the first step (so a viewer sees something at once)."""

    def __init__(self, every_steps: int = PREVIEW_EVERY_STEPS,
                 min_interval_s: float = PREVIEW_MIN_INTERVAL_S, clock=time.monotonic):
        self.every_steps = max(1, int(every_steps))
        self.min_interval_s = float(min_interval_s)
        self._clock = clock
        self._last_at: float | None = None

    def due(self, step: int) -> bool:
        now = self._clock()
        if self._last_at is not None and (step % self.every_steps != 0
                                          or now - self._last_at < self.min_interval_s):
            return False
        self._last_at = now
        return True


class PreviewCadence:
    """The worker's default cadence, and the throttle of one job (the job's own cadence fields
    win over the defaults)."""

    def __init__(self, every_steps: int | None = None, interval_ms: float | None = None):
        self.every_steps = PREVIEW_EVERY_STEPS if every_steps is None else max(1, int(every_steps))
        self.interval_ms = C.DEFAULT_PREVIEW_INTERVAL_MS if interval_ms is None \
            else max(0.0, float(interval_ms))

    def throttle_for(self, job) -> PreviewThrottle:
        every = getattr(job, "preview_every_steps", None)
        interval_ms = getattr(job, "preview_interval_ms", None)
        return PreviewThrottle(self.every_steps if every is None else every,
                               (self.interval_ms if interval_ms is None else interval_ms) / 1000.0)


def simulated_preview(step: int, total_steps: int, size_px: int) -> bytes:
    """A SIMULATED worker's preview: noise fading into a flat colour as the steps go by (no
    latents exist there), encoded like a real one so clients and the dashboard see the same."""
    rng = np.random.default_rng(step)
    side = 16
    done = step / max(total_steps, 1)
    noise = rng.standard_normal((4, side, side)).astype(np.float32)
    flat = np.zeros((4, side, side), np.float32)
    flat[0] = 0.8  # a warm grey through the SDXL factors
    return encode_preview((1 - done) * noise + done * flat, size_px)

