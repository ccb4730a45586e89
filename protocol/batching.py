"""Which jobs may share one pipeline call (dynamic batching, docs/worker-protocol.md).

Two jobs are batch-compatible when `batch_key` gives both the same non-None key: everything
that shapes the diffusers call is equal (models, LoRA set and weights, textual inversions,
size, steps, scheduler and Karras, guidance, clip skip, refiner switch, the mode and its input
images and strength, the ControlNet set with its images, precision and memory switches), and
only what each image keeps for itself differs (prompts, seed, batch_size, output and
post-processing options, priority, timeout, stream). The broker uses it to hand one worker
several compatible jobs at once; the worker's busy thread uses it to take compatible jobs from
its local queue. Both sides use this one function, so they agree.

Not batchable (key None): jobs with <lora:...> prompt tags (their LoRA set depends on the prompt
text) and jobs asking for latent previews (a preview shows one job's own latents).
"""

from __future__ import annotations

import hashlib
import re
from typing import Hashable, Optional

from protocol.job import ImageRef, Job

_LORA_TAG = re.compile(r"<(?:lora|lyco):", re.IGNORECASE)


def _image_digest(image: Optional[ImageRef]) -> Optional[str]:
    """Equal inputs give equal digests (a path, a base64 string or raw bytes, as sent)."""
    if image is None:
        return None
    data = image if isinstance(image, bytes) else image.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def batch_key(job: Job) -> Optional[Hashable]:
    """The key of the pipeline call this job needs; None when it must run alone."""
    if job.preview:
        return None
    if not job.literal_prompt and any(
            _LORA_TAG.search(text) for text in (job.prompt, job.prompt_2, job.negative_prompt,
                                                 job.negative_prompt_2) if text):
        return None
    return (
        job.models.base, job.models.refiner, job.models.vae,
        tuple((lora.name, lora.path, float(lora.weight)) for lora in job.loras),
        tuple((ti.name, ti.path, ti.token) for ti in job.textual_inversions),
        job.width, job.height, job.steps, float(job.guidance_scale),
        job.scheduler, job.use_karras_sigmas, job.clip_skip, job.literal_prompt,
        float(job.refiner_switch) if job.models.refiner else None,
        job.mode, _image_digest(job.init_image), _image_digest(job.mask_image),
        float(job.strength) if job.init_image is not None else None,
        tuple((cn.type, _image_digest(cn.image), float(cn.weight), cn.model, cn.preprocess,
               cn.preprocess_resolution) for cn in job.controlnets),
        job.precision,   # frozen pydantic model: hashable, compared field by field
    )


def batch_images(job: Job) -> int:
    """How many images the job adds to a batched call (its batch_size)."""
    return job.batch_size
